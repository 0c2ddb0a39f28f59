import json

import pytest

from streamlstm import InputError
from streamlstm.consumers.codec.wire import decode_tick, encode_prediction


def test_decodes_the_documented_message() -> None:
    tick = decode_tick(
        b"AAPL",
        b'{"stream": "AAPL", "ts": 1732406400000, "values": [189.2], "reset": false, "end": true}',
        input_size=1,
    )
    assert (tick.stream, tick.values, tick.ts, tick.reset, tick.end) == (
        "AAPL",
        (189.2,),
        1732406400000.0,
        False,
        True,
    )


def test_key_alone_single_value_and_iso_time() -> None:
    tick = decode_tick(b"s1", b'{"value": 3, "ts": "2024-11-24T00:00:00Z"}', input_size=1)
    assert tick.stream == "s1" and tick.values == (3.0,)
    assert tick.ts == 1732406400000.0


@pytest.mark.parametrize(
    ("key", "value", "field", "reason"),
    [
        (b"s", None, "value", "empty"),
        (b"s", b"{oops", "value", "not valid JSON"),
        (b"s", b"[1]", "value", "expected a JSON object"),
        (None, b'{"values": [1]}', "stream", "missing"),
        (b"a", b'{"stream": "b", "values": [1]}', "stream", "disagrees"),
        (b"s", b'{"values": [1, 2]}', "values", "expected 1 values, got 2"),
        (b"s", b'{"values": [NaN]}', "values", "NaN"),
        (b"s", b'{"values": [Infinity]}', "values", "NaN or infinity"),
        (b"s", b'{"values": ["1"]}', "values", "expected a number"),
        (b"s", b'{"values": [true]}', "values", "expected a number"),
        (b"s", b'{"values": 1}', "values", "expected a list"),
        (b"s", b"{}", "values", "missing"),
        (b"s", b'{"values": [1], "ts": "soon"}', "ts", "ISO-8601"),
        (b"s", b'{"values": [1], "reset": "yes"}', "reset", "true or false"),
        (b"\xff", b'{"values": [1]}', "key", "UTF-8"),
        (b"s", b'{"values": [1], "x": "' + b"y" * 70_000 + b'"}', "value", "limit"),
    ],
)
def test_rejections_name_field_and_reason(
    key: bytes | None, value: bytes | None, field: str, reason: str
) -> None:
    with pytest.raises(InputError) as info:
        decode_tick(key, value, input_size=1)
    assert info.value.field == field
    assert reason in info.value.reason


def test_single_value_needs_a_single_feature_model() -> None:
    with pytest.raises(InputError, match="one-feature"):
        decode_tick(b"s", b'{"value": 1}', input_size=2)


def test_encode_prediction_is_the_documented_object() -> None:
    body = json.loads(
        encode_prediction(
            stream="AAPL",
            ts=1732406400000.0,
            prediction=[190.1],
            partition=2,
            offset=17,
            step=5,
            ready=True,
            model="m@abc",
        )
    )
    assert body == {
        "stream": "AAPL",
        "ts": 1732406400000,
        "prediction": [190.1],
        "partition": 2,
        "offset": 17,
        "step": 5,
        "ready": True,
        "model": "m@abc",
    }

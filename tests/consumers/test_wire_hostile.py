"""Hostile input: decode_tick refuses what the engine or the encoder could not take.

Every message either decodes to a tick that steps and encodes to valid JSON,
or raises ``InputError`` naming the field; never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from streamlstm import InputError
from streamlstm.consumers.codec.wire import (
    DEFAULT_MAX_FUTURE_MS,
    MAX_STREAM_ID_BYTES,
    MIN_TS_MS,
    decode_tick,
    encode_prediction,
)

NOW_MS = 1_764_000_000_000.0  # 2025-11-24T16:00:00Z, injected: the tests read no clock


def _decode(key: bytes | None, value: bytes | None, **kw: object) -> object:
    kw.setdefault("input_size", 1)
    kw.setdefault("now_ms", NOW_MS)
    return decode_tick(key, value, **kw)  # type: ignore[arg-type]


def _rejected(key: bytes | None, value: bytes | None, **kw: object) -> InputError:
    with pytest.raises(InputError) as info:
        _decode(key, value, **kw)
    return info.value


def _encode(stream: str, ts: float | None = None) -> bytes:
    return encode_prediction(
        stream=stream,
        ts=ts,
        prediction=[1.0],
        partition=0,
        offset=0,
        step=1,
        ready=True,
        model="m",
    )


# -- the reported message -------------------------------------------------------


def test_a_lone_surrogate_stream_is_rejected_not_served() -> None:
    err = _rejected(None, b'{"stream":"\\ud800","values":[1.0]}')
    assert err.field == "stream"
    assert "UTF-8" in err.reason


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":"a\\udc80b","values":[1.0]}',
        b'{"stream":"\\udfff","values":[1.0]}',
        b'{"stream":"\\ud83d","values":[1.0]}',  # half of an emoji's surrogate pair
    ],
)
def test_other_lone_surrogates_are_rejected(body: bytes) -> None:
    assert _rejected(None, body).field == "stream"


def test_a_proper_surrogate_pair_is_text() -> None:
    tick = _decode(None, b'{"stream":"\\ud83d\\ude00","values":[1.0]}')
    assert tick.stream == "\U0001f600"  # type: ignore[attr-defined]
    assert json.loads(_encode(tick.stream))["stream"] == "\U0001f600"  # type: ignore[attr-defined]


def test_utf8_encoded_surrogates_in_the_value_are_not_json_text() -> None:
    # CESU-style bytes for U+D800: not UTF-8, so not a JSON text on this wire.
    err = _rejected(b"s", b'{"stream":"\xed\xa0\x80","values":[1.0]}')
    assert err.field == "value"


def test_utf16_json_is_not_accepted() -> None:
    body = '{"values": [1.0]}'.encode("utf-16")
    assert _rejected(b"s", body).field == "value"


def test_keys_that_are_not_utf8() -> None:
    for key in (b"\xff", b"\xed\xa0\x80", b"a\xc0\xafb", b"\xf4\x90\x80\x80"):
        err = _rejected(key, b'{"values":[1.0]}')
        assert (err.field, err.reason) == ("key", "not valid UTF-8")


# -- stream ids: empty, long, control characters ---------------------------------


def test_empty_stream_field_is_rejected() -> None:
    err = _rejected(b"s", b'{"stream":"","values":[1.0]}')
    assert (err.field, err.reason) == ("stream", "must be a non-empty string")


def test_empty_key_without_stream_is_missing() -> None:
    err = _rejected(b"", b'{"values":[1.0]}')
    assert err.field == "stream" and "missing" in err.reason


def test_stream_ids_have_a_byte_limit() -> None:
    assert MAX_STREAM_ID_BYTES == 256
    ok = "é" * (MAX_STREAM_ID_BYTES // 2)  # 2 bytes each: exactly the limit
    assert _decode(None, json.dumps({"stream": ok, "values": [1.0]}).encode())
    err = _rejected(None, json.dumps({"stream": ok + "x", "values": [1.0]}).encode())
    assert err.field == "stream" and "257 bytes" in err.reason and "256" in err.reason
    err = _rejected(b"k" * 257, b'{"values":[1.0]}')
    assert err.field == "key" and "257 bytes" in err.reason
    # The limit is a parameter.
    assert _rejected(b"abcd", b'{"values":[1.0]}', max_stream_id_bytes=3).field == "key"
    assert _decode(b"abc", b'{"values":[1.0]}', max_stream_id_bytes=3)


@pytest.mark.parametrize("char", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"])
def test_control_characters_in_ids_are_rejected(char: str) -> None:
    body = json.dumps({"stream": f"a{char}b", "values": [1.0]}).encode()
    err = _rejected(None, body)
    assert err.field == "stream" and "control character" in err.reason
    err = _rejected(f"a{char}b".encode(), b'{"values":[1.0]}')
    assert err.field == "key" and "control character" in err.reason


def test_ordinary_unicode_ids_are_fine() -> None:
    for stream in ("AAPL", "sensor 7", "温度/3", "a\u00a0b", "Ω-1", "\U0001f600"):
        tick = _decode(stream.encode(), json.dumps({"stream": stream, "values": [1.0]}).encode())
        assert tick.stream == stream  # type: ignore[attr-defined]


# -- values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"values":[[1.0]]}', "expected a number"),
        (b'{"values":[{"a":1}]}', "expected a number"),
        (b'{"values":[null]}', "expected a number, got null"),
        (b'{"values":[false]}', "expected a number, got boolean"),
        (b'{"value":true}', "expected a number, got boolean"),
        (b'{"value":null}', "expected a number, got null"),
        (b'{"values":null}', "expected a list of numbers, got null"),
        (b'{"values":{"0":1}}', "expected a list of numbers, got object"),
        (b'{"values":[-Infinity]}', "NaN or infinity"),
        (b'{"values":[3.5e38]}', "float32"),
        (b'{"values":[-1e300]}', "float32"),
        (b'{"values":[1' + b"0" * 400 + b"]}", "float32"),
        (b'{"values":[-1' + b"0" * 400 + b"]}", "float32"),
        (b'{"values":[1e400]}', "NaN or infinity"),
    ],
)
def test_values_the_engine_could_not_take(body: bytes, reason: str) -> None:
    err = _rejected(b"s", body)
    assert err.field in ("values", "value")
    assert reason in err.reason


def test_float32_bound_is_where_float32_overflows() -> None:
    big = float(np.finfo(np.float32).max)
    assert _decode(b"s", json.dumps({"values": [big]}).encode())
    assert _decode(b"s", json.dumps({"values": [-big]}).encode())
    # The largest float64 that still rounds to a finite float32, and the next one up.
    edge = 2.0**128 - 2.0**103
    below = float(np.nextafter(edge, 0.0))
    assert np.isfinite(np.float32(below))
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(edge))
    assert _decode(b"s", json.dumps({"values": [below]}).encode())
    assert "float32" in _rejected(b"s", json.dumps({"values": [edge]}).encode()).reason


def test_huge_integer_literals_do_not_escape_as_other_errors() -> None:
    # Past Python's int-string limit (4300 digits), json raises ValueError, not JSONDecodeError.
    err = _rejected(b"s", b'{"values":[' + b"9" * 5000 + b"]}")
    assert err.field in ("value", "values")


def test_deep_nesting_is_rejected_not_a_recursion_error() -> None:
    body = b'{"values":' + b"[" * 60_000 + b"]" * 60_000 + b"}"
    err = _rejected(b"s", body, max_value_bytes=1 << 20)
    assert err.field in ("value", "values")


# -- top level and flags -----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"null", b"1", b'"x"', b"true", b"[]", b"1.5"])
def test_top_level_must_be_an_object(body: bytes) -> None:
    err = _rejected(b"s", body)
    assert (err.field, err.reason.split(",")[0]) == ("value", "expected a JSON object")


@pytest.mark.parametrize("flag", ["reset", "end"])
@pytest.mark.parametrize("raw", ["1", "0", '"true"', "[]", "{}", "1.0"])
def test_flags_must_be_booleans(flag: str, raw: str) -> None:
    err = _rejected(b"s", f'{{"values":[1.0],"{flag}":{raw}}}'.encode())
    assert err.field == flag and "true or false" in err.reason


# -- timestamps ------------------------------------------------------------------------


def test_plausible_epoch_ms_is_accepted() -> None:
    for ts in (MIN_TS_MS, NOW_MS, NOW_MS - 86_400_000 * 365 * 30, NOW_MS + DEFAULT_MAX_FUTURE_MS):
        tick = _decode(b"s", json.dumps({"values": [1.0], "ts": ts}).encode())
        assert tick.ts == ts  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("ts", "hint"),
    [
        (NOW_MS / 1000, "seconds"),
        (int(NOW_MS // 1000), "seconds"),
        (NOW_MS * 1000, "microseconds"),
        (NOW_MS * 1_000_000, "nanoseconds"),
        (0, "before"),
        (-1, "before"),
        (NOW_MS + DEFAULT_MAX_FUTURE_MS + 1, "future"),
        (1e300, "future"),
        (1 << 70, "future"),
        pytest.param(10**400, "future", id="int-past-float64"),  # found by the fuzz campaign
        pytest.param(-(10**400), "before", id="negative-int-past-float64"),
    ],
)
def test_implausible_ts_is_rejected_with_a_hint(ts: float, hint: str) -> None:
    err = _rejected(b"s", json.dumps({"values": [1.0], "ts": ts}).encode())
    assert err.field == "ts"
    assert hint in err.reason


@pytest.mark.parametrize("raw", ["true", "[1]", '{"a":1}', "NaN", "Infinity", "-Infinity"])
def test_ts_of_the_wrong_kind(raw: str) -> None:
    err = _rejected(b"s", f'{{"values":[1.0],"ts":{raw}}}'.encode())
    assert err.field == "ts"


def test_ts_future_tolerance_and_now_are_parameters() -> None:
    body = json.dumps({"values": [1.0], "ts": NOW_MS + 120_000}).encode()
    assert _decode(b"s", body)
    assert _rejected(b"s", body, max_future_ms=60_000).field == "ts"
    assert _decode(b"s", body, now_ms=NOW_MS + 60_000, max_future_ms=60_000)


def test_iso_ts_gets_the_same_bounds() -> None:
    ok = _decode(b"s", b'{"values":[1.0],"ts":"2025-11-24T00:00:00Z"}')
    assert ok.ts == 1_763_942_400_000.0  # type: ignore[attr-defined]
    for raw in ("1970-01-01T00:00:00Z", "1900-01-01", "0001-01-01T00:00:00+00:00"):
        err = _rejected(b"s", json.dumps({"values": [1.0], "ts": raw}).encode())
        assert err.field == "ts" and "before" in err.reason
    for raw in ("2099-01-01T00:00:00Z", "9999-12-31T23:59:59+00:00"):
        err = _rejected(b"s", json.dumps({"values": [1.0], "ts": raw}).encode())
        assert err.field == "ts" and "future" in err.reason
    for raw in ("", "\ud800", "2025-13-01", "x" * 1000):
        err = _rejected(b"s", json.dumps({"values": [1.0], "ts": raw}).encode())
        assert err.field == "ts" and "ISO-8601" in err.reason


def test_without_now_ms_the_wall_clock_bounds_the_future() -> None:
    import time

    now = time.time() * 1000
    assert decode_tick(b"s", json.dumps({"values": [1], "ts": now}).encode(), input_size=1)
    with pytest.raises(InputError, match="future"):
        decode_tick(b"s", json.dumps({"values": [1], "ts": now + 2e8}).encode(), input_size=1)


# -- encoding never fails on what decoding accepted ---------------------------------------


@pytest.mark.parametrize(
    "ts", [None, 1e11, 1_732_406_400_000.0, 1_732_406_400_000.5, 2.0**80, float("inf"), 1e300]
)
def test_encode_prediction_takes_any_ts(ts: float | None) -> None:
    body = json.loads(_encode("s", ts))
    if ts is not None and ts == ts and abs(ts) < 2.0**53:
        assert body["ts"] == ts
    assert body["stream"] == "s"


def test_encode_prediction_names_an_unencodable_stream() -> None:
    with pytest.raises(InputError) as info:
        _encode("\ud800")
    assert info.value.field == "stream"


def test_encode_prediction_non_finite_predictions_are_null() -> None:
    prediction: list[Any] = [float("nan"), float("inf"), np.float32(2.5)]
    out = encode_prediction(
        stream="s",
        ts=None,
        prediction=prediction,
        partition=0,
        offset=0,
        step=1,
        ready=False,
        model="m",
        score=float("nan"),
    )
    body = json.loads(out)
    assert body["prediction"] == [None, None, 2.5] and body["score"] is None

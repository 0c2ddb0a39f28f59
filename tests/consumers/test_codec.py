"""The per-poll codec, without a broker: every record ends as one prediction or one dead letter."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import orjson
import pytest

from streamlstm import StepResult
from streamlstm.consumers.codec.native import codec_module
from streamlstm.consumers.codec.poll import Batch, decode_poll, encode_outputs
from streamlstm.kernels import DISABLE_ENV
from tests.helpers.codec_records import Read, Rec, Sink


@pytest.fixture(autouse=True)
def _the_c_codec_is_built() -> None:
    # These polls parse untrusted bytes through the C codec where it is built; a build
    # that silently failed would leave them testing wire.py alone. Only an explicit
    # STREAMLSTM_NATIVE=0 runs them without it.
    if os.environ.get(DISABLE_ENV) != "0":
        assert codec_module() is not None, (
            "streamlstm.consumers.codec._codec is not built: reinstall with a C compiler "
            "(make clean)"
        )


def _result(n: int, outputs: int = 1) -> StepResult:
    ones = np.ones(n, dtype=bool)
    return StepResult(
        np.arange(n * outputs, dtype=np.float32).reshape(n, outputs),
        np.arange(1, n + 1, dtype=np.int64),
        ones,
        ones,
    )


def _encode(batch: Batch, result: StepResult | None, **kwargs: Any) -> tuple[Sink, Any]:
    sink = Sink()
    encoded = encode_outputs(
        batch,
        result,
        sink,
        output_topic="out",
        dlq_topic="dlq",
        model_id="m",
        has_score=False,
        **kwargs,
    )
    return sink, encoded


def test_a_poll_decodes_to_arrays_and_bad_records_are_set_aside() -> None:
    tp = ("in", 0)
    records = {
        tp: [
            Rec("in", 0, 5, b"a", b'{"values": [1.5], "ts": 1700000000000}'),
            Rec("in", 0, 6, b"b", b"not json"),
            Rec("in", 0, 7, None, b'{"stream": "c", "value": 2.0}'),
        ],
        ("in", 1): [Rec("in", 1, 0, b"x", b'{"values": [0.0]}')],  # revoked meanwhile
    }
    batch = decode_poll(
        records, assigned={tp}, input_size=1, max_value_bytes=1024, received=time.time()
    )
    assert batch is not None
    assert batch.ids == ["a", "c"]
    np.testing.assert_array_equal(batch.features(), [[1.5], [2.0]])
    np.testing.assert_array_equal(batch.timestamps(), [1_700_000_000_000, np.nan])
    assert [letter.record.offset for letter in batch.bad] == [6]
    assert batch.count == 3 and batch.next_offsets == {tp: 8}
    assert decode_poll(records, assigned=set(), input_size=1, max_value_bytes=9, received=0) is None


def test_every_record_ends_as_one_prediction_or_one_dead_letter() -> None:
    tp = ("in", 3)
    msgs = [Rec("in", 3, i, f"s{i}".encode(), b'{"values": [1.0]}') for i in range(4)]
    msgs.append(Rec("in", 3, 4, b"s4", b'{"values": [1.0, 2.0]}'))
    batch = decode_poll({tp: msgs}, assigned={tp}, input_size=1, max_value_bytes=99, received=0)
    assert batch is not None
    sink, encoded = _encode(batch, _result(4))
    outputs = sink.on("out")
    assert [orjson.loads(v)["offset"] for _, _, v, _, _ in outputs] == [0, 1, 2, 3]
    assert [r[2] for r in sink.on("dlq")] == [msgs[4].value]
    assert encoded.produced == 4 and len(encoded.dead) == 1


def test_each_record_names_the_input_partition_it_answers() -> None:
    # Exactly-once mode sends a record with its input partition's transactional producer.
    a, b = ("in", 2), ("in", 5)
    polled = {
        a: [Rec("in", 2, 0, b"x", b'{"values": [1.0]}'), Rec("in", 2, 1, b"x", b"{")],
        b: [Rec("in", 5, 7, b"y", b'{"values": [1.0]}')],
    }
    batch = decode_poll(polled, assigned={a, b}, input_size=1, max_value_bytes=99, received=0)
    assert batch is not None
    sink, _ = _encode(batch, _result(2))
    assert [(r[0], s) for r, s in zip(sink.records, sink.sources, strict=True)] == [
        ("out", 2),
        ("out", 5),
        ("dlq", 2),
    ]


def test_a_prediction_that_cannot_be_encoded_becomes_a_dead_letter_not_a_crash() -> None:
    # A stream id that is not valid UTF-8 text (a lone surrogate) got past decoding once
    # and stopped the daemon in the encoder; whatever slips through, one tick never stops
    # the others.
    tp = ("in", 0)
    good = Rec("in", 0, 0, b"ok", b"{}")
    bad = Rec("in", 0, 1, None, b'{"stream": "\\ud800", "values": [1.0]}')
    batch = Batch(received=0.0, ids=["ok", "\ud800"], records=[good, bad], count=2)
    batch.values = np.ones((2, 1))
    batch.ts = np.full(2, np.nan)
    batch.offsets, batch.partitions = np.arange(2), np.zeros(2, dtype=np.int64)
    batch.next_offsets = {tp: 2}
    sink, encoded = _encode(batch, _result(2))
    assert [r[1] for r in sink.on("out")] == [b"ok"]
    (letter,) = sink.on("dlq")
    headers = dict(letter[3])
    assert headers["streamlstm-field"] == b"prediction"
    assert b"encoded" in headers["streamlstm-error"]
    assert letter[2] == bad.value and encoded.produced == 1


def test_dead_letters_keep_headers_and_timestamp_and_always_fit() -> None:
    tp = ("in", 2)
    huge = b'{"values": [' + b"1.0," * 200_000 + b"1.0]}"
    own = (("trace-id", b"abc"), ("streamlstm-error", b"forged"))
    msg = Rec("in", 2, 9, b"k", huge, timestamp=1_600_000_000_123, headers=own)
    batch = decode_poll({tp: [msg]}, assigned={tp}, input_size=1, max_value_bytes=64, received=0)
    assert batch is not None
    sink, _ = _encode(batch, None, dlq_max_record_bytes=1000)
    ((topic, key, value, headers, ts),) = sink.records
    assert topic == "dlq" and key == b"k" and ts == 1_600_000_000_123
    assert value is not None and 500 < len(value) < 1000 and huge.startswith(value)
    names = [name for name, _ in headers]
    assert names[0] == "trace-id"  # the record's own headers first, ours not forgeable
    assert names.count("streamlstm-error") == 1
    values = dict(headers)
    assert values["streamlstm-error"] != b"forged"
    assert int(values["streamlstm-truncated"]) == len(huge) + 1
    assert values["streamlstm-source-offset"] == b"9"


def test_predictions_sent_at_once_name_their_input_partitions_too() -> None:
    a, b = ("in", 2), ("in", 5)
    polled = {
        a: [Rec("in", 2, 0, b"x", b'{"values": [1.0]}'), Rec("in", 2, 1, b"x", b"{")],
        b: [Rec("in", 5, 7, b"y", b'{"values": [1.0]}')],
    }
    batch = decode_poll(polled, assigned={a, b}, input_size=1, max_value_bytes=99, received=0)
    assert batch is not None
    sink, at_once = Sink(), Sink()

    def many(topic: str, keys: Any, values: Any, timestamps_ms: Any, sources: Any) -> None:
        for key, value, stamp, source in zip(keys, values, timestamps_ms, sources, strict=True):
            at_once(topic, key, value, (), stamp, source=source)

    encode_outputs(
        batch,
        _result(2),
        sink,
        output_topic="out",
        dlq_topic="dlq",
        model_id="m",
        has_score=False,
        many=many,
    )
    assert [(r[0], r[1], s) for r, s in zip(at_once.records, at_once.sources, strict=True)] == [
        ("out", b"x", 2),
        ("out", b"y", 5),
    ]
    assert [(r[0], s) for r, s in zip(sink.records, sink.sources, strict=True)] == [("dlq", 2)]


def test_records_without_topic_and_partition_take_them_from_the_poll() -> None:
    a, b = ("in", 2), ("in", 5)
    polled = {
        a: [Read(0, b"x", b'{"values": [1.0]}'), Read(1, b"x", b"{", headers=(("h", b"1"),))],
        b: [Read(7, b"y", b'{"values": [1.0]}')],
    }
    batch = decode_poll(polled, assigned={a, b}, input_size=1, max_value_bytes=99, received=0)
    assert batch is not None
    np.testing.assert_array_equal(batch.partitions, [2, 5])
    assert batch.record(1).topic == "in" and batch.record(1).partition == 5
    (letter,) = batch.bad
    assert (letter.record.topic, letter.record.partition, letter.record.offset) == ("in", 2, 1)
    sink, encoded = _encode(batch, _result(2))
    assert [(r[0], s) for r, s in zip(sink.records, sink.sources, strict=True)] == [
        ("out", 2),
        ("out", 5),
        ("dlq", 2),
    ]
    headers = dict(sink.on("dlq")[0][3])
    assert headers["h"] == b"1" and headers["streamlstm-source-partition"] == b"2"
    assert headers["streamlstm-source-topic"] == b"in" and encoded.produced == 2

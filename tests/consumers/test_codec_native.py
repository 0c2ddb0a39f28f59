"""The C codec (``_codec.c``) against the Python reference: same verdicts, same bytes.

Each test runs a poll through ``decode_poll`` / ``encode_outputs`` twice, with
the C codec and with ``STREAMLSTM_NATIVE=0`` (``wire.decode_tick`` and
``wire.encode_prediction`` per tick), and asserts identical results.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm import ConfigError, StepResult
from streamlstm.consumers.codec import native as native_codec
from streamlstm.consumers.codec import poll as codec
from streamlstm.consumers.codec import wire
from streamlstm.consumers.codec.native import CODEC_PATH_ENV, codec_module
from streamlstm.consumers.codec.poll import Batch, decode_poll, encode_outputs
from streamlstm.kernels import DISABLE_ENV
from tests.helpers import fuzz_strategies as fuzz
from tests.helpers.codec_records import Read, Rec, Sink

NOW_MS = 1_764_000_000_000

HOSTILE_VALUES: list[bytes | None] = [
    None,
    b"",
    b"{}",
    b"[]",
    b"null",
    b"1",
    b'"x"',
    b"{",
    b'{"values": [1.0]',
    b'{"values": [1.0]}}',
    b'{"values": [1.0]} x',
    b' \t\r\n{"values":[1.0]} \n',
    b'{"values": [1.0], "values": [2.0]}',
    b'{"values": [1.0], "value": 2.0}',
    b'{"value": 2.0}',
    b'{"value": "2.0"}',
    b'{"value": true}',
    b'{"value": null}',
    b'{"values": []}',
    b'{"values": [1, 2]}',
    b'{"values": [[1]]}',
    b'{"values": [1,]}',
    b'{"values": [,1]}',
    b'{"values": 1}',
    b'{"values": null}',
    b'{"values": [01]}',
    b'{"values": [1.]}',
    b'{"values": [.5]}',
    b'{"values": [-]}',
    b'{"values": [+1]}',
    b'{"values": [1e]}',
    b'{"values": [1e+]}',
    b'{"values": [NaN]}',
    b'{"values": [Infinity]}',
    b'{"values": [-Infinity]}',
    b'{"values": [1e400]}',
    b'{"values": [-1e400]}',
    b'{"values": [3.4e38]}',
    b'{"values": [3.4028235e38]}',
    b'{"values": [3.40282356779733661637539395458142568448e38]}',
    b'{"values": [340282356779733661637539395458142568448]}',
    b'{"values": [340282346638528859811704183484516925440]}',
    b'{"values": [1' + b"0" * 80 + b"]}",
    b'{"values": [-0]}',
    b'{"values": [-0.0]}',
    b'{"values": [0e5]}',
    b'{"values": [-0E-5]}',
    b'{"values": [12345678901234567890]}',
    b'{"values": [123456789012345678901234567890]}',
    b'{"values": [0.1000000000000000055511151231257827]}',
    b'{"values": [2.2250738585072011e-308]}',
    b'{"values": [4.9e-324]}',
    b'{"values": [1e-400]}',
    b'{"values": [1.0], "stream": ""}',
    b'{"values": [1.0], "stream": null}',
    b'{"values": [1.0], "stream": 5}',
    b'{"values": [1.0], "stream": "a\\u0000b"}',
    b'{"values": [1.0], "stream": "a\\nb"}',
    b'{"values": [1.0], "stream": "a\\"b"}',
    b'{"values": [1.0], "stream": "\\ud800"}',
    b'{"values": [1.0], "stream": "\xc3\xa9t\xc3\xa9"}',
    b'{"values": [1.0], "stream": "\xc2\x85"}',
    b'{"values": [1.0], "stream": "\xff"}',
    b'{"values": [1.0], "stream": "a\x7fb"}',
    b'{"values": [1.0], "stream": "a\tb"}',
    b'{"values": [1.0], "stream": "' + b"s" * 256 + b'"}',
    b'{"values": [1.0], "stream": "' + b"s" * 257 + b'"}',
    b'{"values": [1.0], "stream": "k"}',
    b'{"values": [1.0], "stream": "other"}',
    b'{"values": [1.0], "ts": null}',
    b'{"values": [1.0], "ts": 1764000000000}',
    b'{"values": [1.0], "ts": 1764000000000.5}',
    b'{"values": [1.0], "ts": 1764000000}',
    b'{"values": [1.0], "ts": 1764000000000000}',
    b'{"values": [1.0], "ts": 1764000000000000000}',
    b'{"values": [1.0], "ts": 99999999999}',
    b'{"values": [1.0], "ts": 100000000000}',
    b'{"values": [1.0], "ts": 1764086400000}',
    b'{"values": [1.0], "ts": 1764086400001}',
    b'{"values": [1.0], "ts": 1e400}',
    b'{"values": [1.0], "ts": -1e400}',
    b'{"values": [1.0], "ts": "2025-11-24T16:00:00Z"}',
    b'{"values": [1.0], "ts": "yesterday"}',
    b'{"values": [1.0], "ts": true}',
    b'{"values": [1.0], "ts": [1]}',
    b'{"values": [1.0], "reset": true, "end": false}',
    b'{"values": [1.0], "reset": null, "end": true}',
    b'{"values": [1.0], "reset": 1}',
    b'{"values": [1.0], "end": "true"}',
    b'{"values": [1.0], "extra": {"nested": [1, 2]}}',
    b'{"values": [1.0], "Values": [2.0]}',
    b'{"values": [1.0], "valu\\u0065s": [2.0]}',
    b'{"values" : [ 1.0 ] , "ts" : 1764000000000 }',
    b'\xef\xbb\xbf{"values": [1.0]}',
    b'{"values": [1.0]}\x00',
    b"\x00" * 10,
    b"[" * 5000 + b"]" * 5000,
    b'{"values": [' + b"1.0," * 20000 + b"1.0]}",
]
KEYS: list[bytes | None] = [None, b"", b"k", b"other", b"\xff", b"a\nb", b"s" * 257, "é".encode()]


def _both(monkeypatch: pytest.MonkeyPatch, run: Any) -> tuple[Any, Any]:
    assert codec_module() is not None, "the C extension is not built"
    native = run()
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert codec_module() is None
    reference = run()
    monkeypatch.delenv(DISABLE_ENV)
    return native, reference


def _same_batches(a: Batch, b: Batch) -> None:
    assert a.ids == b.ids
    # Bit for bit: the sign of zero and the last bit of every value and time.
    assert a.values.shape == b.values.shape
    assert a.values.tobytes() == b.values.tobytes()
    assert a.ts.tobytes() == b.ts.tobytes()
    for name in ("resets", "ends", "offsets", "partitions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [r.offset for r in a.records] == [r.offset for r in b.records]
    assert [(d.record.offset, d.field, d.reason) for d in a.bad] == [
        (d.record.offset, d.field, d.reason) for d in b.bad
    ]
    assert (a.count, a.next_offsets) == (b.count, b.next_offsets)


def _hostile_poll(
    monkeypatch: pytest.MonkeyPatch, make: Callable[..., Any], partition: int
) -> tuple[Batch, Batch]:
    """The hostile corpus as one poll of ("in", ``partition``), each record
    ``make(offset, key, value)``: decoded by C and by the reference."""
    pairs = list(itertools.product(KEYS, HOSTILE_VALUES))

    def poll() -> Batch:
        batch = decode_poll(
            {("in", partition): [make(i, k, v) for i, (k, v) in enumerate(pairs)]},
            assigned={("in", partition)},
            input_size=1,
            max_value_bytes=64 * 1024,
            received=NOW_MS / 1000.0,
        )
        assert batch is not None
        return batch

    return _both(monkeypatch, poll)


def test_hostile_records_get_the_same_verdicts_and_reasons(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    native, reference = _hostile_poll(monkeypatch, lambda i, k, v: Rec("in", 0, i, k, v), 0)
    _same_batches(native, reference)
    # The corpus exercises both verdicts (and the C path takes the common shape).
    assert len(native.ids) > 100 and len(native.bad) > 100


def test_records_as_read_get_the_verdicts_of_consumer_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What kafka.internals.lean_records hands out: the poll's key says topic and partition.
    read = _hostile_poll(monkeypatch, Read, 4)
    consumed = _hostile_poll(monkeypatch, lambda i, k, v: Rec("in", 4, i, k, v), 4)
    for batch in (*read, consumed[1]):
        _same_batches(batch, consumed[0])
    assert {(d.record.topic, d.record.partition) for d in read[0].bad} == {("in", 4)}


def test_random_numbers_parse_to_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    texts = [
        repr(float(x)) for x in rng.standard_normal(3000) * 10.0 ** rng.integers(-40, 40, 3000)
    ]
    digits = rng.integers(0, 25, 2000)
    texts += [f"{x:.{d}e}" for x, d in zip(rng.standard_normal(2000), digits, strict=True)]
    texts += [str(int(x)) for x in rng.integers(-(2**62), 2**62, 1000)]
    texts += ["".join(map(str, rng.integers(0, 10, 30))).lstrip("0") or "0" for _ in range(500)]
    msgs = [
        Rec("in", 1, i, f"s{i % 7}".encode(), f'{{"values": [{t}, {t}], "ts": {NOW_MS}}}'.encode())
        for i, t in enumerate(texts)
    ]

    def run() -> Batch:
        batch = decode_poll(
            {("in", 1): msgs},
            assigned={("in", 1)},
            input_size=2,
            max_value_bytes=4096,
            received=NOW_MS / 1000.0,
        )
        assert batch is not None
        return batch

    native, reference = _both(monkeypatch, run)
    _same_batches(native, reference)


@pytest.mark.parametrize("adaptive", [False, True])
def test_outputs_are_byte_identical_to_encode_prediction(
    monkeypatch: pytest.MonkeyPatch, adaptive: bool
) -> None:
    rng = np.random.default_rng(3)
    n = 4000
    ids = [f"s-{i}" for i in range(n - 4)] + ['quo"te', "back\\slash", "été", "\ud800"]
    msgs = [Rec("in", i % 3, 10 + i, None, b"{}") for i in range(n)]
    special = [0.0, -0.0, 1e-7, 5e-5, 1e16, 3e38, np.nan, np.inf, -np.inf, 1e-45]
    predictions = (rng.standard_normal((n, 2)) * 10.0 ** rng.integers(-8, 8, (n, 1))).astype(
        np.float32
    )
    predictions[: len(special), 0] = special
    scores = rng.standard_normal(n) * 10.0 ** rng.integers(-20, 20, n)
    scores[::5] = np.nan
    ts = np.full(n, float(NOW_MS))
    ts[::3] = np.nan
    ts[1::7] += 0.25
    ts[2::11] = 2.0**60
    batch = Batch(received=0.0, ids=ids, records=msgs, count=n)
    batch.values, batch.ts = np.zeros((n, 1)), ts
    batch.offsets = np.array([m.offset for m in msgs], dtype=np.int64)
    batch.partitions = np.array([m.partition for m in msgs], dtype=np.int64)
    result = StepResult(
        predictions,
        rng.integers(0, 10**12, n),
        rng.random(n) < 0.5,
        np.ones(n, dtype=bool),
        scores=scores,
        skipped=rng.random(n) < 0.05,
        threshold=0.5,  # "anomaly": true, false or null (a NaN score)
        # Each stream's own threshold: flags that the fixed one would not give.
        flags=np.where(np.isnan(scores), np.nan, rng.random(n) < 0.5) if adaptive else None,
    )
    if adaptive:
        assert result.flags is not None
        assert np.any((result.flags == 0) & (scores > 0.5))

    def run() -> tuple[tuple[Sink, Sink], Any]:
        sink, many = Sink(), Sink()

        def add_many(topic: str, keys: Any, values: Any, timestamps_ms: Any, sources: Any) -> None:
            for record in zip(keys, values, timestamps_ms, sources, strict=True):
                many(topic, *record[:2], (), record[2], source=record[3])

        encoded = encode_outputs(
            batch,
            result,
            sink,
            output_topic="out",
            dlq_topic="dlq",
            model_id='model "7"',
            has_score=True,
            many=add_many,
        )
        return (sink, many), encoded

    (native, native_encoded), (reference, reference_encoded) = _both(monkeypatch, run)
    assert native[1].records == reference[1].records and native[1].sources == reference[1].sources
    assert [r[:3] for r in native[0].records] == [r[:3] for r in reference[0].records]
    assert native_encoded.produced == reference_encoded.produced > 3000
    # Each output's "anomaly" is its row's flag (the stream's own where it adapts).
    written = [orjson.loads(r[2]) for r in reference[1].records]
    flags = result.flags if result.flags is not None else (scores > 0.5) * 1.0
    assert [out["anomaly"] for out in written] == [
        None if np.isnan(scores[i]) else bool(flags[i])
        for i in (out["offset"] - 10 for out in written)
    ]
    assert reference[1].records[0][2] == orjson.dumps(
        {
            "stream": "s-0",
            "ts": None,
            "prediction": [0.0, float(predictions[0, 1])],
            "partition": 0,
            "offset": 10,
            "step": int(result.steps[0]),
            "ready": bool(result.ready[0]),
            "model": 'model "7"',
            "score": None,
            "anomaly": None,
        }
    )


def test_well_formed_ticks_never_take_the_per_tick_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The C path's cost is measured by `bench kafka` (CPU us per tick of the parent);
    # here: well-formed ticks are decoded in C, none one at a time in Python.
    msgs = [
        Rec(
            "in",
            0,
            i,
            f"stream-{i}".encode(),
            b'{"stream":"stream-%d","ts":%d,"values":[0.5]}' % (i, NOW_MS),
        )
        for i in range(1000)
    ]
    msgs.append(Rec("in", 0, 1000, b"odd", b'{"values": [0.5], "stream": "odd", "x": 1}'))
    calls: list[bytes | None] = []
    per_tick = wire.decode_tick

    def counted(key: bytes | None, value: bytes | None, **kwargs: Any) -> Any:
        calls.append(key)
        return per_tick(key, value, **kwargs)

    monkeypatch.setattr(codec, "decode_tick", counted)
    batch = decode_poll(
        {("in", 0): msgs},
        assigned={("in", 0)},
        input_size=1,
        max_value_bytes=999,
        received=NOW_MS / 1000.0,
    )
    assert batch is not None and len(batch.ids) == 1001
    assert calls == [b"odd"]  # only the tick with an unexpected field went the slow way


# -- the C functions themselves, with arguments no caller in the daemon passes -------------


def _native() -> Any:
    native = codec_module()
    assert native is not None, "the C codec is not built: pip install -e . (or make venv)"
    return native


def _encode_args(ids: list[Any], rows: list[int], outputs: int = 1) -> list[Any]:
    """encode_predictions' arguments for ``len(ids)`` answered ticks, no event times."""
    n = len(ids)
    return [
        ids,
        np.array(rows, dtype=np.int64),
        np.full(n, np.nan),
        orjson.dumps(np.zeros(n * outputs), option=orjson.OPT_SERIALIZE_NUMPY),
        outputs,
        np.zeros(n, dtype=np.int64),
        np.zeros(n, dtype=np.bool_),
        np.zeros(n, dtype=np.int64),
        np.arange(n, dtype=np.int64),
        None,
        None,
        b'"m"',
    ]


def test_rows_left_to_python_keep_their_references_to_none() -> None:
    # An id that is not text leaves its row to Python: value None. Each None the C code
    # puts in a list must be a reference it took, or every poll with such a row frees one
    # reference to None too many (Python 3.11: "deallocating None" after a long run).
    native = _native()
    ids: list[Any] = [7, b"bytes", "\ud800"]  # not str; not str; not UTF-8-encodable
    ok = _encode_args(ids, [0, 1, 2, 0])
    out_of_range = _encode_args(ids, [0, 1, 2, 3])  # the last row fails after three Nones
    calls = 2000
    before = sys.getrefcount(None)
    for _ in range(calls):
        keys, values, stamps = native.encode_predictions(*ok)
        assert values == [None] * 4 and stamps == [None] * 4
        assert keys == [None, None, None, None]
        del keys, values, stamps
        with pytest.raises(IndexError):
            native.encode_predictions(*out_of_range)
    drift = sys.getrefcount(None) - before
    assert abs(drift) < calls // 10, f"None's refcount moved by {drift} over {calls} calls"


def test_the_codec_loaded_is_the_one_asked_for() -> None:
    # `make test-sanitize` sets STREAMLSTM_CODEC_PATH to its ASan/UBSan build: every test
    # here must run on that build, not on the in-place one.
    path = os.environ.get(CODEC_PATH_ENV)
    loaded = Path(_native().__file__).resolve()
    if path:
        assert loaded == Path(path).resolve()
    else:
        assert loaded.parent == Path(codec.__file__).resolve().parent  # beside the daemon


def _decode_args(records: list[Any], input_size: int = 1) -> list[Any]:
    n = len(records)
    return [
        records,
        input_size,
        4096,
        wire.MAX_STREAM_ID_BYTES,
        wire.MIN_TS_MS,
        NOW_MS + 1000.0,
        np.zeros((n, input_size)),
        np.zeros(n),
        np.zeros(n, dtype=np.uint8),
        np.zeros(n, dtype=np.int64),
    ]


_RECORDS = [Rec("in", 0, i, b"k", b'{"values": [1.5]}') for i in range(3)]


@pytest.mark.parametrize(
    ("position", "array", "error", "match"),
    [
        (6, np.zeros((3, 1), dtype=np.float32), TypeError, "features must be a float64"),
        (7, np.zeros(3, dtype=np.int64), TypeError, "ts must be a float64"),
        # bool would take the flag bits 2 and 4 as values no bool has
        (8, np.zeros(3, dtype=np.bool_), TypeError, "flags must be a uint8"),
        (9, np.zeros(3, dtype=np.uint64), TypeError, "offsets must be a int64"),
        (9, np.zeros(3, dtype=np.int32), TypeError, "offsets must be a int64"),
        (9, np.zeros(3, dtype=">i8"), TypeError, "offsets must be a int64"),
        (6, np.zeros((3, 2)), ValueError, "features has 6 items, not 3"),
        (7, np.zeros(4), ValueError, "ts has 4 items, not 3"),
        (7, np.zeros(3)[::-1], ValueError, "contiguous"),
        (7, np.frombuffer(bytearray(25), offset=1), ValueError, "not aligned"),
        (8, b"\0\0\0", BufferError, "writable"),
    ],
)
def test_decode_ticks_checks_each_array_by_type_and_size(
    position: int, array: Any, error: type[Exception], match: str
) -> None:
    args = _decode_args(list(_RECORDS))
    args[position] = array
    with pytest.raises(error, match=match):
        _native().decode_ticks(*args)


def test_decode_ticks_accepts_its_own_arrays() -> None:
    # The check above fails for the right reason: the same call with the right arrays works.
    args = _decode_args(list(_RECORDS))
    assert _native().decode_ticks(*args) == ["k", "k", "k"]
    assert args[6].tolist() == [[1.5]] * 3 and args[8].tolist() == [1, 1, 1]
    assert args[9].tolist() == [0, 1, 2]


def test_sizes_that_overflow_are_refused_not_wrapped() -> None:
    native = _native()
    # 4 records x 2^62 values per row: the byte count wraps to 0 in 64 bits.
    args = _decode_args([_RECORDS[0]] * 4)
    args[1] = 2**62
    with pytest.raises(OverflowError, match="decode_ticks: the arrays' size"):
        native.decode_ticks(*args)
    ids = ["a", "b"]
    args = _encode_args(ids, [0, 1])
    args[4] = 2**62 + 1  # outputs: 2 x (2^62 + 1) predictions overflows
    with pytest.raises(OverflowError, match="encode_predictions: the arrays' size"):
        native.encode_predictions(*args)
    args[4] = 2**40  # fits, but far more numbers than the text holds: refused before sizing
    with pytest.raises(ValueError, match="predictions do not match"):
        native.encode_predictions(*args)


@pytest.mark.parametrize(
    ("position", "array", "error", "match"),
    [
        (1, np.array([0, 1], dtype=np.int32), TypeError, "rows must be a int64"),
        (1, np.array([0.0, 1.0]), TypeError, "rows must be a int64"),
        (2, np.zeros(2, dtype=np.float32), TypeError, "ts must be a float64"),
        (2, np.zeros(3), ValueError, "ts has 3 items, not 2"),
        (5, np.zeros(2, dtype=np.uint64), TypeError, "steps must be a int64"),
        (6, np.zeros(2, dtype=np.int64), TypeError, "ready must be a bool"),
        (7, np.zeros(1, dtype=np.int64), ValueError, "partitions has 1 items, not 2"),
        (8, np.zeros(2, dtype=np.float64), TypeError, "offsets must be a int64"),
        (10, np.zeros(2, dtype=np.uint8), TypeError, "anomaly must be a int8"),
        (10, np.zeros(3, dtype=np.int8), ValueError, "anomaly has 3 items, not 2"),
        (8, np.frombuffer(bytearray(17), dtype=np.int64, offset=1), ValueError, "not aligned"),
    ],
)
def test_encode_predictions_checks_each_array_by_type_and_size(
    position: int, array: Any, error: type[Exception], match: str
) -> None:
    args = _encode_args(["a", "b"], [0, 1])
    assert _native().encode_predictions(*args)[0] == [b"a", b"b"]
    args[position] = array
    with pytest.raises(error, match=match):
        _native().encode_predictions(*args)


class _Hostile:
    """A record whose attributes run Python code: ``action`` when ``key`` is read."""

    def __init__(self, offset: int, action: Callable[[], None]) -> None:
        self.offset = offset
        self.value = b'{"values": [2.5], "stream": "s"}'
        self._action = action

    @property
    def key(self) -> bytes | None:
        self._action()
        return None


def test_a_record_that_changes_the_list_cannot_free_what_decode_ticks_reads() -> None:
    # The list held the only reference to each record; reading one's key clears the list.
    # The record must outlive its attribute reads, and the rows past it are never read.
    records: list[Any] = []
    records += [_Hostile(i, records.clear) for i in range(3)]
    args = _decode_args(records)
    with pytest.raises(RuntimeError, match="records changed size"):
        _native().decode_ticks(*args)
    assert records == []


def test_a_record_that_swaps_itself_out_is_still_read_whole() -> None:
    # Same size, other records: the call goes on with the record it holds.
    records: list[Any] = []

    def swap() -> None:
        records[0] = Rec("in", 0, 99, b"x", b"{}")

    records += [_Hostile(5, swap)]
    args = _decode_args(records)
    assert _native().decode_ticks(*args) == ["s"]
    assert args[9].tolist() == [5]


# -- property: any bytes, C and the reference agree ----------------------------------------

_VALUES = st.one_of(fuzz.values_bytes, st.sampled_from(HOSTILE_VALUES))
_KEYS = st.one_of(fuzz.keys, st.sampled_from(KEYS))


@settings(
    max_examples=fuzz.EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=12), st.integers(1, 3))
def test_any_poll_gets_the_verdicts_of_the_reference(
    pairs: list[tuple[bytes | None, bytes | None]], input_size: int
) -> None:
    msgs = [Rec("in", 2, i, k, v) for i, (k, v) in enumerate(pairs)]

    def poll() -> Batch:
        batch = decode_poll(
            {("in", 2): msgs},
            assigned={("in", 2)},
            input_size=input_size,
            max_value_bytes=256,
            received=NOW_MS / 1000.0,
        )
        assert batch is not None
        return batch

    with pytest.MonkeyPatch.context() as monkeypatch:
        native, reference = _both(monkeypatch, poll)
    _same_batches(native, reference)


TIMES = [float(NOW_MS), NOW_MS + 0.25, 2.0**53, 2.0**53 + 2.0, 1e-5, 0.0, -0.0]
_FLOATS = st.one_of(
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1e-4, 9.999e-5, 1e16, 3e38, 1e-45, math.nan, math.inf]),
)


@settings(max_examples=fuzz.EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(fuzz.stream_ids, st.text(min_size=1)),
            st.lists(_FLOATS, min_size=2, max_size=2),
            # event times as decoded: NaN (None) or finite, within int64 milliseconds
            st.one_of(st.none(), st.floats(-(2.0**62), 2.0**62), st.sampled_from(TIMES)),
            st.one_of(st.none(), st.floats(allow_nan=True)),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_any_outputs_are_the_bytes_of_the_reference(
    rows: list[tuple[str, list[float], float | None, float | None]],
) -> None:
    n = len(rows)
    msgs = [Rec("in", i % 2, i, None, b"{}") for i in range(n)]
    batch = Batch(received=0.0, ids=[r[0] for r in rows], records=msgs, count=n)
    batch.values = np.zeros((n, 1))
    batch.ts = np.array([math.nan if r[2] is None else r[2] for r in rows])
    batch.offsets = np.arange(n, dtype=np.int64)
    batch.partitions = np.array([m.partition for m in msgs], dtype=np.int64)
    scores = np.array([math.nan if r[3] is None else r[3] for r in rows])
    result = StepResult(
        np.array([r[1] for r in rows], dtype=np.float32),
        np.arange(n, dtype=np.int64),
        np.arange(n) % 2 == 0,
        np.ones(n, dtype=bool),
        scores=scores,
        threshold=0.0,
    )

    def run() -> tuple[list[Any], list[Any]]:
        sink = Sink()
        encode_outputs(
            batch,
            result,
            sink,
            output_topic="out",
            dlq_topic="dlq",
            model_id="m\u2028",
            has_score=True,
        )
        return sink.on("out"), [(r[1], r[2]) for r in sink.on("dlq")]

    with pytest.MonkeyPatch.context() as monkeypatch:
        native, reference = _both(monkeypatch, run)
    assert native == reference


def test_a_codec_path_that_names_no_build_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The sanitizer run must not pass on the in-place build because its own was not found.
    monkeypatch.setattr(native_codec, "_codec_tried", False)
    monkeypatch.setattr(native_codec, "_codec", None)
    monkeypatch.setenv(CODEC_PATH_ENV, str(tmp_path / "_codec.so"))
    with pytest.raises(ConfigError, match="no extension module"):
        codec_module()


CONTROL_CASES: list[tuple[bytes | None, Any]] = [
    (b"s1", (("streamlstm-control", b"reset"),)),
    (b"s2", [("trace", b"x"), ("streamlstm-control", b"delete")]),
    (b"s3", (("streamlstm-control", b"pause"),)),  # no such control: a dead letter
    (b"s4", (("streamlstm-control", b"reset"), ("streamlstm-control", b"reset"))),
    (None, (("streamlstm-control", b"reset"),)),  # names no stream
    (b"\xff", (("streamlstm-control", b"delete"),)),
    (b"s5", (("other", b"reset"),)),  # any other header: a tick like any other
    (b"s6", [["streamlstm-control", b"reset"]]),  # laid out oddly: wire reads it all the same
    (b"s7", (("streamlstm-control", "reset"),)),  # a str value is no control
]


def test_control_records_are_placed_among_the_ticks_the_same_with_and_without_c(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tick = b'{"values": [1.0]}'
    msgs = [Rec("in", 0, 0, b"t", tick)]
    for i, (key, headers) in enumerate(CONTROL_CASES, start=1):
        # A control's value is ignored: a tick's here, which the C codec must not take.
        msgs.append(Rec("in", 0, 2 * i - 1, key, tick, headers=headers))
        msgs.append(Rec("in", 0, 2 * i, b"t", tick))

    def poll() -> Batch:
        batch = decode_poll(
            {("in", 0): msgs}, assigned={("in", 0)}, input_size=1, max_value_bytes=99, received=0
        )
        assert batch is not None
        return batch

    native, reference = _both(monkeypatch, poll)
    _same_batches(native, reference)
    assert native.controls == reference.controls
    assert [(c.stream, c.op, c.offset, c.before) for c in native.controls] == [
        ("s1", "reset", 1, 1),
        ("s2", "delete", 3, 2),
        ("s6", "reset", 15, 9),
    ]
    refused = {d.record.offset: (d.field, d.reason) for d in native.bad}
    assert refused[5] == ("headers", "streamlstm-control must be reset or delete, got b'pause'")
    assert refused[7] == ("headers", "streamlstm-control given 2 times")
    assert refused[9][0] == "key" and refused[11][0] == "key"
    # Another header leaves a tick.
    assert 13 in {r.offset for r in native.records}
    assert refused[17][0] == "headers" and 15 not in refused
    assert [r.offset for r in native.control_records] == [1, 3, 15]

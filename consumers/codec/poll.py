"""The per-poll codec: a poll's records to one step request, a step's results to records.

Pure: no I/O, no event loop. ``decode_poll`` turns the records of one
``getmany`` into a :class:`Batch` (valid ticks in arrays, bad ones set aside
with their field and reason); ``encode_outputs`` hands one prediction per
answered tick and one dead letter per refused one to a sink (the poll's
``Outbox.add``, and ``Outbox.add_many`` for the predictions at once). Every
record of a poll ends as exactly one of the two.

Each is one call into C per poll where the extension is built (``_codec.c``:
no Python object per tick beyond the ids and the output records). C takes
only the common, well-formed case; every record it is not sure of goes
through ``wire.decode_tick`` / ``wire.encode_prediction``, which stay the
reference: verdicts, reasons and output bytes are theirs either way
(``tests/consumers/test_codec_native.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streamlstm import StepResult
from streamlstm.consumers.codec.native import codec_module
from streamlstm.consumers.codec.wire import (
    DEFAULT_MAX_FUTURE_MS,
    MAX_STREAM_ID_BYTES,
    MIN_TS_MS,
    Tick,
    control_of,
    decode_tick,
    encode_control_ack,
)
from streamlstm.control import Control
from streamlstm.errors import InputError

__all__ = [
    "Batch",
    "Consumed",
    "DeadLetter",
    "Encoded",
    "ManySink",
    "Record",
    "Sink",
    "add_dead_letter",
    "consumed",
    "dead_letter_headers",
    "decode_poll",
    "encode_outputs",
]

logger = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


class Record(Protocol):
    """What the codec reads of a consumed record (aiokafka's ``ConsumerRecord``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Sink(Protocol):
    """Where records go (``Outbox.add``): ``source`` is the input partition the record
    answers (exactly-once mode sends it with that partition's transactional producer)."""

    def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        timestamp_ms: int | None,
        *,
        source: int,
    ) -> None: ...


#: A dead letter's key is cut to this when the record must be cut to fit.
_MAX_DEAD_KEY_BYTES = 1024
#: Dead-letter headers this daemon writes; an input's own headers of these names are dropped.
HEADER_PREFIX = "streamlstm-"


@dataclass(frozen=True)
class DeadLetter:
    """A refused record, the field at fault and why."""

    record: Any
    field: str
    reason: str


F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass
class Batch:
    """The decoded records of one poll: valid ticks as step arguments (row i, tick i), bad
    ones aside."""

    received: float  # wall time of the poll, seconds
    ids: list[str] = field(default_factory=list)
    values: F64 = field(default_factory=lambda: np.zeros((0, 1)))  # [N, input_size]
    ts: F64 = field(default_factory=lambda: np.zeros(0))  # epoch ms, NaN where none
    resets: Bools = field(default_factory=lambda: np.zeros(0, dtype=bool))
    ends: Bools = field(default_factory=lambda: np.zeros(0, dtype=bool))
    offsets: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    partitions: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    records: list[Any] = field(default_factory=list)  # the consumed record of each valid tick
    sources: list[Any] = field(default_factory=list)  # the TopicPartition of each
    count: int = 0  # every record of the poll, valid or not
    bad: list[DeadLetter] = field(default_factory=list)
    #: Per (topic, partition): the offset after the poll's last record there.
    next_offsets: dict[Any, int] = field(default_factory=dict)
    #: Control records (``wire.CONTROL_HEADER``), each placed among the ticks.
    controls: list[Control] = field(default_factory=list)
    #: The consumed record of each control (for its acknowledgement).
    control_records: list[Any] = field(default_factory=list)

    def gap_streams(self) -> list[str]:
        """The streams (named by their keys) of the refused records: holes in their
        histories, which the engine's quality figures must not pair a forecast across."""
        out = []
        for letter in self.bad:
            key = getattr(letter.record, "key", None)
            if isinstance(key, bytes) and key:
                with contextlib.suppress(UnicodeDecodeError):
                    out.append(key.decode())
        return out

    def features(self) -> F64:
        """``[N, input_size]`` float64: the valid ticks' values."""
        return self.values

    def record(self, i: int) -> Any:
        """Valid tick ``i``'s consumed record, with its topic and partition."""
        return consumed(self.records[i], self.sources[i] if self.sources else None)

    def timestamps(self) -> F64:
        """``[N]`` epoch ms; NaN for a tick without event time (the engine stamps it with
        its own clock: the wall clock here would collapse other streams' event time)."""
        return self.ts


@dataclass(frozen=True)
class Encoded:
    """What ``encode_outputs`` handed to the sink."""

    produced: int
    dead: list[DeadLetter]
    event_times: npt.NDArray[np.float64]  # seconds, of the answered ticks that carried one
    acknowledged: int = 0  # controls applied, each answered on the output topic


def decode_poll(
    records: Mapping[Any, Sequence[Any]],
    *,
    assigned: Collection[Any],
    input_size: int,
    max_value_bytes: int,
    received: float,
) -> Batch | None:
    """Decode a poll (``{TopicPartition: [record, ...]}``); None when nothing is still ours.

    Records of partitions no longer in ``assigned`` (revoked while the poll
    waited) are left out: their new owner reads them. A record's topic and
    partition are its key's: the records themselves may not carry them (see
    ``kafka.internals.lean_records``).
    """
    msgs: list[Any] = []
    sources: list[Any] = []
    next_offsets: dict[Any, int] = {}
    for tp, messages in records.items():
        if tp in assigned and messages:
            msgs += messages
            sources += [tp] * len(messages)
            next_offsets[tp] = messages[-1].offset + 1
    if not next_offsets:
        return None
    n = len(msgs)
    now_ms = received * 1000.0  # one wall-clock reading for the poll's plausibility checks
    values = np.empty((n, input_size), dtype=np.float64)
    ts = np.empty(n, dtype=np.float64)
    flags = np.zeros(n, dtype=np.uint8)  # bit 0: valid; 1: reset; 2: end
    offsets = np.empty(n, dtype=np.int64)
    partitions = _partitions(records, next_offsets, n)
    native = codec_module()
    ids: list[str | None]
    if native is not None:
        # Well-formed ticks in C; the rest (flag 0, id None) through decode_tick below.
        ids = native.decode_ticks(
            msgs,
            input_size,
            max_value_bytes,
            MAX_STREAM_ID_BYTES,
            MIN_TS_MS,
            now_ms + DEFAULT_MAX_FUTURE_MS,
            values,
            ts,
            flags,
            offsets,
        )
    else:
        ids = [None] * n
        offsets[:] = [msg.offset for msg in msgs]
    bad: list[DeadLetter] = []
    found: list[tuple[int, str, str]] = []  # controls: (row, stream, op)
    valid = (flags & 1).astype(bool)
    if not valid.all():
        for i in np.flatnonzero(~valid).tolist():
            msg = msgs[i]
            try:
                tick = _decide(msg, input_size, max_value_bytes, now_ms)
            except InputError as exc:
                bad.append(DeadLetter(consumed(msg, sources[i]), exc.field, exc.reason))
                continue
            if isinstance(tick, str):
                found.append((i, msg.key.decode(), tick))
                continue
            ids[i], values[i], valid[i] = tick.stream, tick.values, True
            ts[i] = np.nan if tick.ts is None else tick.ts
            flags[i] = 1 | (2 if tick.reset else 0) | (4 if tick.end else 0)
    controls = _place(found, valid, offsets, partitions)
    control_records = [consumed(msgs[i], sources[i]) for i, _, _ in found]
    if not valid.all():
        keep = valid.tolist()
        msgs = [msg for msg, ok in zip(msgs, keep, strict=True) if ok]
        sources = [tp for tp, ok in zip(sources, keep, strict=True) if ok]
        values, ts, flags = values[valid], ts[valid], flags[valid]
        offsets, partitions = offsets[valid], partitions[valid]
    return Batch(
        received=received,
        ids=[s for s in ids if s is not None],
        values=values,
        ts=ts,
        resets=(flags & 2).astype(bool),
        ends=(flags & 4).astype(bool),
        offsets=offsets,
        partitions=partitions,
        records=msgs,
        sources=sources,
        count=n,
        bad=bad,
        next_offsets=next_offsets,
        controls=controls,
        control_records=control_records,
    )


def _partitions(records: Mapping[Any, Sequence[Any]], taken: Mapping[Any, int], n: int) -> I64:
    """Each taken record's partition, in the order they were gathered: one span each."""
    partitions = np.empty(n, dtype=np.int64)
    start = 0
    for tp in taken:
        count = len(records[tp])
        partitions[start : start + count] = tp[1]  # (topic, partition), as TopicPartition
        start += count
    return partitions


def _decide(msg: Any, input_size: int, max_value_bytes: int, now_ms: float) -> Tick | str:
    """A record the C codec left to Python: a control (its op) or a tick; raises
    ``InputError`` for one that is neither."""
    op = control_of(msg.key, getattr(msg, "headers", None))
    if op is not None:
        return op
    return decode_tick(
        msg.key, msg.value, input_size=input_size, max_value_bytes=max_value_bytes, now_ms=now_ms
    )


def _place(
    found: list[tuple[int, str, str]], valid: Bools, offsets: I64, partitions: I64
) -> list[Control]:
    """The controls at rows ``found`` of a poll, each after the valid ticks before it."""
    if not found:
        return []
    counts = valid.astype(np.int64)
    before: I64 = np.cumsum(counts) - counts
    return [
        Control(stream, op, int(partitions[i]), int(offsets[i]), int(before[i]))
        for i, stream, op in found
    ]


@dataclass(frozen=True, slots=True)
class Consumed:
    """A consumed record with its topic and partition, for one that came without
    (``kafka.internals.lean_records``): what a dead letter reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None
    headers: Headers


def consumed(record: Any, tp: Any) -> Any:
    """``record`` of ``tp`` (``(topic, partition)``, as TopicPartition) with its topic and
    partition."""
    if hasattr(record, "topic"):
        return record  # aiokafka's ConsumerRecord, or a test's
    topic, partition = tp
    return Consumed(
        topic,
        partition,
        record.offset,
        record.key,
        record.value,
        getattr(record, "timestamp", None),
        tuple(getattr(record, "headers", None) or ()),
    )


def dead_letter_headers(record: Record, field_name: str, reason: str) -> list[tuple[str, bytes]]:
    """The record's own headers, then those that say why it was refused and where it came from."""
    own = [
        (str(k), bytes(v or b""))
        for k, v in (getattr(record, "headers", None) or ())
        if not str(k).startswith(HEADER_PREFIX)
    ]
    return [
        *own,
        ("streamlstm-error", reason.encode("utf-8", "backslashreplace")),
        ("streamlstm-field", field_name.encode("utf-8", "backslashreplace")),
        ("streamlstm-source-topic", record.topic.encode()),
        ("streamlstm-source-partition", str(record.partition).encode()),
        ("streamlstm-source-offset", str(record.offset).encode()),
    ]


class ManySink(Protocol):
    """Where a poll's predictions go at once (``Outbox.add_many``): record i is
    ``(keys[i], values[i], timestamps_ms[i])``, no headers, answering input partition
    ``sources[i]``."""

    def __call__(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        timestamps_ms: Sequence[int | None],
        sources: Sequence[int],
    ) -> None: ...


def encode_outputs(
    batch: Batch,
    result: StepResult | None,
    sink: Sink,
    *,
    output_topic: str,
    dlq_topic: str,
    model_id: str,
    has_score: bool,
    dlq_max_record_bytes: int = 1_040_000,
    many: ManySink | None = None,
    controls_applied: Sequence[bool] = (),
) -> Encoded:
    """Send one prediction per answered tick and one dead letter per refused record to ``sink``
    (the predictions to ``many`` at once, where given).

    A tick the engine refused, or whose prediction cannot be encoded, becomes
    a dead letter with the reason: one record never stops the others.
    """
    dead = list(batch.bad)
    produced = 0
    event_ts = batch.ts
    if result is not None:
        event_ts = event_ts[result.accepted]
        # Imported here: predictions builds on this module's Batch and DeadLetter.
        from streamlstm.consumers.codec.predictions import predictions

        keys, values, stamps, rows = predictions(batch, result, model_id, has_score, dead)
        sources = batch.partitions[rows].tolist()
        if many is not None:
            many(output_topic, keys, values, stamps, sources)
        else:
            for key, value, stamp, source in zip(keys, values, stamps, sources, strict=True):
                sink(output_topic, key, value, (), stamp, source=source)
        produced = len(values)
    for letter in dead:
        add_dead_letter(sink, dlq_topic, letter, dlq_max_record_bytes)
    acknowledged = _acknowledge(batch, controls_applied, sink, output_topic)
    event_times = event_ts[np.isfinite(event_ts)] / 1000.0
    return Encoded(produced, dead, event_times, acknowledged)


def encode_shadow(
    batch: Batch, result: StepResult, many: ManySink, *, topic: str, model_id: str, has_score: bool
) -> int:
    """The shadow model's predictions of the ticks it answered, to ``topic``; how many.
    A tick it refused is left out, never a dead letter: the served model's answers
    say what becomes of each record."""
    from streamlstm.consumers.codec.predictions import predictions

    refused: list[DeadLetter] = []
    keys, values, stamps, rows = predictions(batch, result, model_id, has_score, refused)
    many(topic, keys, values, stamps, batch.partitions[rows].tolist())
    return len(values)


def _acknowledge(batch: Batch, applied: Sequence[bool], sink: Sink, topic: str) -> int:
    """One acknowledgement per applied control, keyed by its stream; a control skipped
    by the skip rule was acknowledged when it was applied."""
    count = 0
    for control, record, done in zip(batch.controls, batch.control_records, applied, strict=True):
        if done:
            value = encode_control_ack(
                stream=control.stream,
                op=control.op,
                partition=control.partition,
                offset=control.offset,
            )
            stamp = getattr(record, "timestamp", None)
            sink(topic, control.stream.encode(), value, (), stamp, source=control.partition)
            count += 1
    return count


def add_dead_letter(sink: Sink, dlq_topic: str, letter: DeadLetter, max_bytes: int) -> None:
    """The original key, value, headers and timestamp, with why and where from.

    A record whose key, value and headers together are over ``max_bytes`` is
    cut to fit the dead-letter topic (a key over 1 KiB to 1 KiB, then the
    value), with ``streamlstm-truncated`` giving the original key and value
    size: a dead letter that cannot be sent would stop the daemon, which is
    what it is there to avoid.
    """
    msg = letter.record
    headers = dead_letter_headers(msg, letter.field, letter.reason)
    key, value = msg.key, msg.value
    headers_size = sum(len(k) + len(v) for k, v in headers) + 64
    original = len(value or b"") + len(key or b"")
    if original + headers_size > max_bytes:
        headers.append(("streamlstm-truncated", str(original).encode()))
        if key is not None and len(key) > _MAX_DEAD_KEY_BYTES:
            key = bytes(key[:_MAX_DEAD_KEY_BYTES])
        room = max(0, max_bytes - headers_size - len(key or b""))
        value = None if value is None else bytes(value[:room])
    timestamp = getattr(msg, "timestamp", None)
    stamp = timestamp if isinstance(timestamp, int) else None
    sink(dlq_topic, key, value, headers, stamp, source=msg.partition)

"""The per-poll codec: a poll's records to one step request, a step's results to records.

Pure: no I/O, no event loop. ``decode_poll`` turns the records of one
``getmany`` into a :class:`Batch` (valid ticks in arrays, bad ones set aside
with their field and reason); ``encode_outputs`` hands one prediction per
answered tick and one dead letter per refused one to a sink (the poll's
``Outbox.add``). Every record of a poll ends as exactly one of the two.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streamlstm import StepResult
from streamlstm.errors import InputError
from streamlstm.wire import decode_tick, encode_prediction

__all__ = [
    "Batch",
    "DeadLetter",
    "Encoded",
    "Record",
    "Sink",
    "add_dead_letter",
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


@dataclass
class Batch:
    """The decoded records of one poll: valid ticks as step arguments, bad ones aside."""

    received: float  # wall time of the poll, seconds
    ids: list[str] = field(default_factory=list)
    values: list[tuple[float, ...]] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)  # epoch ms, NaN where the tick had none
    resets: list[bool] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)  # the consumed record of each valid tick
    count: int = 0  # every record of the poll, valid or not
    bad: list[DeadLetter] = field(default_factory=list)
    #: Per (topic, partition): the offset after the poll's last record there.
    next_offsets: dict[Any, int] = field(default_factory=dict)

    def features(self) -> npt.NDArray[np.float64]:
        """``[N, input_size]`` float64: the valid ticks' values."""
        return np.asarray(self.values, dtype=np.float64)

    def timestamps(self) -> npt.NDArray[np.float64]:
        """``[N]`` epoch ms; NaN for a tick without event time (the engine stamps it with
        its own clock: the wall clock here would collapse other streams' event time)."""
        return np.asarray(self.ts, dtype=np.float64)


@dataclass(frozen=True)
class Encoded:
    """What ``encode_outputs`` handed to the sink."""

    produced: int
    dead: list[DeadLetter]
    event_times: npt.NDArray[np.float64]  # seconds, of the answered ticks that carried one


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
    waited) are left out: their new owner reads them.
    """
    batch = Batch(received=received)
    now_ms = received * 1000.0  # one wall-clock reading for the poll's plausibility checks
    for tp, messages in records.items():
        if tp not in assigned or not messages:
            continue
        for msg in messages:
            batch.count += 1
            try:
                tick = decode_tick(
                    msg.key,
                    msg.value,
                    input_size=input_size,
                    max_value_bytes=max_value_bytes,
                    now_ms=now_ms,
                )
            except InputError as exc:
                batch.bad.append(DeadLetter(msg, exc.field, exc.reason))
                continue
            batch.ids.append(tick.stream)
            batch.values.append(tick.values)
            batch.ts.append(np.nan if tick.ts is None else tick.ts)
            batch.resets.append(tick.reset)
            batch.ends.append(tick.end)
            batch.records.append(msg)
        batch.next_offsets[tp] = messages[-1].offset + 1
    return batch if batch.next_offsets else None


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
) -> Encoded:
    """Send one prediction per answered tick and one dead letter per refused record to ``sink``.

    A tick the engine refused, or whose prediction cannot be encoded, becomes
    a dead letter with the reason: one record never stops the others.
    """
    dead = list(batch.bad)
    produced = 0
    event_ts = np.asarray(batch.ts, dtype=np.float64)
    if result is not None:
        event_ts = event_ts[result.accepted]
        predictions = result.predictions.tolist()
        steps = result.steps.tolist()
        ready = result.ready.tolist()
        # A model with an anomaly score puts "score" (null while warming up) in every output.
        scores = result.scores.tolist() if has_score else None
        rejected = {r.index: r for r in result.rejections}
        skipped = result.skipped.tolist() if result.skipped.size else None
        for i, (stream, msg) in enumerate(zip(batch.ids, batch.records, strict=True)):
            if skipped is not None and skipped[i]:
                continue  # its state already reflected it: answered before a restart
            if i in rejected:
                dead.append(DeadLetter(msg, rejected[i].field, rejected[i].reason))
                continue
            ts = batch.ts[i]
            try:
                value = encode_prediction(
                    stream=stream,
                    ts=None if ts != ts else ts,
                    prediction=predictions[i],
                    partition=msg.partition,
                    offset=msg.offset,
                    step=steps[i],
                    ready=ready[i],
                    model=model_id,
                    score=None if scores is None else scores[i],
                )
                key = msg.key or stream.encode()
            except Exception as exc:  # never let one tick stop the poll
                logger.warning("cannot encode the prediction of %s", msg, exc_info=True)
                dead.append(DeadLetter(msg, "prediction", f"cannot be encoded: {exc}"))
                continue
            sink(output_topic, key, value, (), None if ts != ts else int(ts), source=msg.partition)
            produced += 1
    for letter in dead:
        add_dead_letter(sink, dlq_topic, letter, dlq_max_record_bytes)
    event_times = event_ts[np.isfinite(event_ts)] / 1000.0
    return Encoded(produced, dead, event_times)


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

"""Every use of aiokafka's private attributes, in one place, each behind a start-up check.

Two fast paths reach inside aiokafka, for the daemon's two largest per-record
costs in the parent process:

``lean_records`` (the consumer)
    ``getmany`` hands out the records as aiokafka's record batch reads them,
    not as ``ConsumerRecord`` (a Python call and an 11-field dataclass: about
    0.8 µs a record). See ``lean_records``.
``raw_append`` (``outbox.Outbox.add_many``)
    Records go straight into the record batch inside aiokafka's
    ``BatchBuilder``, past its Python ``append`` (keyword arguments, a
    serializer check, an offset count: about 0.3 µs a record). See ``raw_append``.

The private attributes used, and why:

``AIOKafkaConsumer._fetcher``
    The consumer's ``Fetcher``, to reach its buffer.
``Fetcher._records``
    Its buffer of fetched partitions (an ``OrderedDict``, partition ->
    ``FetchResult``), replaced by a subclass whose ``__setitem__`` sees each
    fetch as it is buffered.
``Fetcher._key_deserializer``, ``Fetcher._value_deserializer``
    Read only: with either set, records must be converted (no lean path).
``FetchResult._partition_records``
    The fetch's ``PartitionRecords``: the iterator ``getmany`` draws from.
``PartitionRecords._consumer_record(tp, record)``
    Its per-record conversion to ``ConsumerRecord``, looked up on each record:
    shadowed, for that instance only, by one that returns the record as read.
``BatchBuilder._builder``
    The record batch builder whose ``append(offset, timestamp, key, value,
    headers)`` (C where aiokafka's extensions are built) ``add_many`` calls.
``BatchBuilder._relative_offset``
    The builder's record count: read to check it, set after direct appends
    (as its own ``append`` counts them).
``BatchBuilder._closed``, ``_key_serializer``, ``_value_serializer``
    Read only: the direct append is taken on an open builder without serializers.
``BatchBuilder._build()``
    The start-up probe only: the bytes of its probe batches.

Checked on aiokafka 0.11.0, 0.12.0, 0.13.0 and 0.14.0 (both probes engaged;
0.14.0 is what constraints.txt pins, and tests/consumers/test_aiokafka_internals.py
fails if either path is not engaged on it). pyproject.toml bounds aiokafka below
the next minor version for that reason.

Each path is probed once per process (``probe``, from ``Server.start`` and
``start_client``): aiokafka's own objects are built through its public API, the
path is taken on them, and the result is compared with the public API's (the
same records read, the same batch bytes). Any difference or error, and the path
is not engaged: the public API is used, which gives the same results more
slowly. Which path is used is logged once; ``fast_paths`` reports it. The
environment variable ``STREAMLSTM_AIOKAFKA_FAST_PATHS`` names the paths that
may be engaged (comma-separated; default all; ``none`` for none), to fall back
without a release where an aiokafka misbehaves.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

__all__ = [
    "ENV",
    "FAST_PATHS",
    "LEAN_RECORDS",
    "RAW_APPEND",
    "batch_bytes",
    "fast_paths",
    "lean_records",
    "only",
    "probe",
    "raw_append",
    "seal",
]

logger = logging.getLogger(__name__)

LEAN_RECORDS = "lean_records"
RAW_APPEND = "raw_append"
FAST_PATHS = (LEAN_RECORDS, RAW_APPEND)
#: Comma-separated names of the fast paths that may be engaged (default: all; "none").
ENV = "STREAMLSTM_AIOKAFKA_FAST_PATHS"

#: Whether each path is engaged; None until probed (not engaged meanwhile).
_engaged: dict[str, bool | None] = dict.fromkeys(FAST_PATHS)
#: A plain bool for ``raw_append``, read once per open batch on the output path.
_raw_engaged = False
#: Set by ``only``: the paths allowed, instead of the environment's.
_allowed_override: frozenset[str] | None = None


def fast_paths() -> dict[str, bool]:
    """Whether each fast path is engaged in this process (False until ``probe`` ran)."""
    return {name: bool(engaged) for name, engaged in _engaged.items()}


def _allowed() -> frozenset[str]:
    if _allowed_override is not None:
        return _allowed_override
    setting = os.environ.get(ENV, "all").strip().lower()
    if setting == "all":
        return frozenset(FAST_PATHS)
    names = {n.strip() for n in setting.split(",") if n.strip()} - {"none"}
    unknown = names - set(FAST_PATHS)
    if unknown:
        logger.warning("%s names no such fast path: %s", ENV, ", ".join(sorted(unknown)))
    return frozenset(names & set(FAST_PATHS))


async def probe(producer: AIOKafkaProducer | None = None) -> dict[str, bool]:
    """Probe each fast path once per process (later calls return the verdicts).

    ``producer`` (started or not) makes the probe's record batches; without one, a
    throwaway producer that never connects does.
    """
    global _raw_engaged
    # No lock: nothing is awaited until the verdicts are in, so a second caller meanwhile
    # finds them.
    if all(engaged is not None for engaged in _engaged.values()):
        return fast_paths()
    allowed = _allowed()
    own = producer is None
    maker = AIOKafkaProducer(bootstrap_servers="localhost:1") if own else producer
    assert maker is not None
    try:
        checks: dict[str, Callable[[Callable[[], Any]], None]] = {
            LEAN_RECORDS: _check_lean,
            RAW_APPEND: _check_raw,
        }
        for name, check in checks.items():
            _engaged[name] = _verdict(name, allowed, check, maker.create_batch)
        _raw_engaged = bool(_engaged[RAW_APPEND])
    finally:
        if own:
            await maker.stop()
    return fast_paths()


def _verdict(
    name: str,
    allowed: frozenset[str],
    check: Callable[[Callable[[], Any]], None],
    create_batch: Callable[[], Any],
) -> bool:
    """Run ``check``; log (once per process and path) which way ``name`` goes."""
    version = _aiokafka_version()
    if name not in allowed:
        logger.info("aiokafka %s: fast path %s is off (%s): public API", version, name, ENV)
        return False
    try:
        check(create_batch)
    except Exception as exc:
        logger.warning(
            "aiokafka %s: fast path %s not engaged, its internals are not as checked "
            "(%r): public API (slower, same results)",
            version,
            name,
            exc,
        )
        return False
    logger.info("aiokafka %s: fast path %s engaged", version, name)
    return True


def _aiokafka_version() -> str:
    try:
        return metadata.version("aiokafka")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


@contextlib.contextmanager
def only(paths: Iterable[str]) -> Iterator[dict[str, bool]]:
    """Within: only ``paths`` may be engaged, probed again (tests and benches comparing
    a fast path with the public API); after: probed again as the environment says."""
    global _allowed_override
    _allowed_override = frozenset(paths)
    _forget()
    try:
        yield fast_paths()
    finally:
        _allowed_override = None
        _forget()


def _forget() -> None:
    global _raw_engaged
    _engaged.update(dict.fromkeys(FAST_PATHS))
    _raw_engaged = False


# -- lean_records -----------------------------------------------------------


def _as_read(tp: Any, record: Any) -> Any:
    return record


class _LeanResults(collections.OrderedDict[Any, Any]):
    """The fetcher's buffer of fetched partitions (``Fetcher._records``), each partition's
    records handed out as aiokafka read them (see ``lean_records``)."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        # A FetchError (no records) has no ``_partition_records``: left as it is.
        partition_records = getattr(result, "_partition_records", None)
        if partition_records is not None and hasattr(partition_records, "_consumer_record"):
            # An instance attribute wins over the class's method, for this buffer only.
            partition_records._consumer_record = _as_read
        super().__setitem__(tp, result)


def lean_records(consumer: AIOKafkaConsumer) -> bool:
    """Make a started consumer's ``getmany`` hand out the records as aiokafka's record
    batch reads them, not as ``ConsumerRecord``; True when it took.

    The records read keep ``offset``, ``timestamp``, ``key``, ``value`` and
    ``headers`` but have no ``topic`` or ``partition``: those are ``getmany``'s
    keys (the codec reads them there). Only the conversion is skipped:
    transactions (aborted batches, control records), CRC checks and positions
    stay aiokafka's. Where the path is not engaged (``probe``), or this
    consumer's fetcher is laid out otherwise or has deserializers, nothing
    changes (False): records stay ``ConsumerRecord``, and the codec takes both.
    """
    if not _engaged[LEAN_RECORDS]:
        return False
    fetcher = getattr(consumer, "_fetcher", None)
    buffered = getattr(fetcher, "_records", None)
    if not isinstance(buffered, collections.OrderedDict) or (
        getattr(fetcher, "_key_deserializer", None) or getattr(fetcher, "_value_deserializer", None)
    ):
        return False
    if not isinstance(buffered, _LeanResults):
        lean = _LeanResults()
        for tp, result in buffered.items():  # fetched before this call
            lean[tp] = result
        fetcher._records = lean  # type: ignore[union-attr]
    return True


def _check_lean(create_batch: Callable[[], Any]) -> None:
    """A fetch as the fetcher buffers it (``FetchResult`` around ``PartitionRecords`` of
    a real record batch) put into ``_LeanResults``: the records it hands out must be
    those ``ConsumerRecord``s hold, as read. Raises where anything differs."""
    from aiokafka.consumer.fetcher import (
        READ_UNCOMMITTED,
        FetchResult,
        PartitionRecords,
    )
    from aiokafka.record.memory_records import MemoryRecords

    sent = [
        (b"k0", b"v0", 1_700_000_000_000, [("h", b"x")]),
        (None, b"v1", 1_700_000_000_001, []),
        (b"k2", None, 1_700_000_000_002, []),
    ]
    builder = create_batch()
    for key, value, stamp, headers in sent:
        if builder.append(key=key, value=value, timestamp=stamp, headers=headers) is None:
            raise ValueError("a probe batch refused a record")
    raw = bytes(batch_bytes(builder))
    tp = TopicPartition("probe", 0)

    def fetched(lean: bool) -> list[Any]:
        records = PartitionRecords(
            tp, MemoryRecords(raw), [], 0, None, None, True, READ_UNCOMMITTED
        )
        result = FetchResult(tp, assignment=None, partition_records=records, backoff=0)
        buffer: collections.OrderedDict[Any, Any] = (
            _LeanResults() if lean else collections.OrderedDict()
        )
        buffer[tp] = result
        return list(buffer[tp]._partition_records)

    lean, plain = fetched(True), fetched(False)
    if any(type(r) is type(p) for r, p in zip(lean, plain, strict=True)):
        raise TypeError("PartitionRecords no longer converts records in _consumer_record")
    fields = ("offset", "timestamp", "key", "value", "headers")
    lean_rows = [tuple(_field(r, f) for f in fields) for r in lean]
    plain_rows = [tuple(_field(r, f) for f in fields) for r in plain]
    if lean_rows != plain_rows:
        raise ValueError(f"records read lean {lean_rows} != as ConsumerRecord {plain_rows}")
    # Time stamps and headers depend on the batch's format (a producer that has not met
    # a broker may build the old one): the offsets, keys and values never do.
    if [(r[0], r[2], r[3]) for r in plain_rows] != [
        (i, k, v) for i, (k, v, _, _) in enumerate(sent)
    ]:
        raise ValueError(f"the probe batch read back as {plain_rows}")


def _field(record: Any, name: str) -> Any:
    value = getattr(record, name)
    return [tuple(h) for h in value] if name == "headers" else value


# -- raw_append -------------------------------------------------------------


def raw_append(builder: Any, appended: int) -> Any:
    """The append of the record batch inside aiokafka's ``BatchBuilder``, or None.

    ``raw(offset, timestamp_ms, key, value, headers)`` appends one record at
    ``offset`` within the batch (the count of records in it so far), returning
    None when the batch is full, as the builder's own ``append`` does; ``seal``
    then leaves the builder's count as its own appends would. None where the
    path is not engaged, or this builder is not open, holds other than
    ``appended`` records, or has serializers: then use the public ``append``.
    """
    if not _raw_engaged:
        return None
    inner = getattr(builder, "_builder", None)
    if (
        inner is None
        or getattr(builder, "_closed", True) is not False
        or getattr(builder, "_relative_offset", None) != appended
        or getattr(builder, "_key_serializer", None) is not None
        or getattr(builder, "_value_serializer", None) is not None
    ):
        return None
    return getattr(inner, "append", None)


def seal(builder: Any, count: int) -> None:
    """After appends through ``raw_append``: the builder holds ``count`` records."""
    builder._relative_offset = count


def batch_bytes(builder: Any) -> bytes:
    """A ``BatchBuilder``'s record batch as it goes on the wire (closes the builder)."""
    return bytes(builder._build())


def _check_raw(create_batch: Callable[[], Any]) -> None:
    """The same records appended to two fresh builders, through ``raw_append`` and
    ``seal`` and through the public ``append``: the same count and the same bytes.
    Raises where anything differs."""
    records: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]] = [
        (b"k%d" % i, b"v" * (i * 7), 1_700_000_000_000 + i, []) for i in range(40)
    ]
    fast, public = create_batch(), create_batch()
    inner = _shape_raw(fast)
    appended = 0
    for key, value, stamp, headers in records:
        if inner(appended, stamp, key, value, headers) is None:
            break
        appended += 1
    seal(fast, appended)
    for key, value, stamp, headers in records[:appended]:
        if public.append(key=key, value=value, timestamp=stamp, headers=headers) is None:
            raise ValueError("the public append refused a record the direct one took")
    if appended == 0 or fast.record_count() != public.record_count():
        raise ValueError(f"{appended} records appended, counts differ")
    if batch_bytes(fast) != batch_bytes(public):
        raise ValueError("direct appends built other bytes than BatchBuilder.append")


def _shape_raw(builder: Any) -> Any:
    """``raw_append``'s checks on a fresh builder, as exceptions that say which failed."""
    inner = getattr(builder, "_builder", None)
    if inner is None or not callable(getattr(inner, "append", None)):
        raise AttributeError("BatchBuilder has no _builder with an append")
    if getattr(builder, "_closed", None) is not False:
        raise AttributeError("BatchBuilder has no _closed False when fresh")
    if getattr(builder, "_relative_offset", None) != 0:
        raise AttributeError("BatchBuilder has no _relative_offset 0 when fresh")
    for name in ("_key_serializer", "_value_serializer"):
        if not hasattr(builder, name) or getattr(builder, name) is not None:
            raise AttributeError(f"BatchBuilder has no {name} None")
    return inner.append

"""The changelog topic: where each stream's state outlives the process that held it.

One compacted topic per input topic and group (``<group>-<input>-changelog``
by default), with exactly the input's partition count: stream s's state goes
to the partition its ticks come from (an explicit partition, not a key hash),
keyed by the stream id, valued by its ``StreamState`` bytes; a tombstone
(null value) when a stream ends, expires or is evicted. Compaction keeps the
last record per stream, so a restore reads at most one record per stream and
per compaction lag.

``ensure_changelog`` creates or verifies the topic at start-up;
``read_partitions`` reads partitions to their ends for a restore (last record
per key wins, tombstones delete).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from streamlstm.consumers.engine.process import EngineClient
from streamlstm.consumers.engine.protocol import Change, LocalRestore, RestoreReport
from streamlstm.consumers.engine.spool import Spool
from streamlstm.consumers.kafka.outbox import Box
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.errors import BrokerError

__all__ = ["Changelog", "Restored", "ensure_changelog", "read_partitions"]

logger = logging.getLogger(__name__)


async def ensure_changelog(
    options: dict[str, Any], topic: str, *, partitions: int, replication_factor: int
) -> None:
    """Create the compacted changelog, or check that the one there fits; clear errors if not."""
    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
        if topic not in set(await admin.list_topics()):
            logger.info(
                "creating changelog %s: %d partitions, compacted, replication factor %d",
                topic,
                partitions,
                replication_factor,
            )
            await admin.create_topics(
                [
                    NewTopic(
                        topic,
                        partitions,
                        replication_factor,
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ]
            )
            return
        (described,) = await admin.describe_topics([topic])
        have = len(described.get("partitions", []))
        if have != partitions:
            raise BrokerError(
                f"changelog {topic} has {have} partitions, the input topic {partitions}: a "
                "stream's state must live in its input partition's number; recreate the "
                "changelog (or name another with --changelog-topic)"
            )
        policy = await _cleanup_policy(admin, topic)
        if policy is None:
            logger.warning("the broker does not describe %s's configs: compaction unchecked", topic)
        elif "compact" not in policy.split(","):
            raise BrokerError(
                f"changelog {topic} has cleanup.policy={policy}: it must be compact, or "
                "old states are deleted with time and streams restart from zero"
            )
    except KafkaError as exc:
        raise BrokerError(
            f"cannot create or check the changelog {topic}: {exc}; durable state needs a "
            "broker with topic configs and compaction, such as Apache Kafka (not Tansu); "
            "--state memory serves without it (state then dies with the process)"
        ) from exc
    finally:
        await admin.close()


async def _cleanup_policy(admin: AIOKafkaAdminClient, topic: str) -> str | None:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})]
    )
    for response in responses:
        for resource in getattr(response, "resources", []):
            # (error_code, error_message, resource_type, resource_name, configs)
            for entry in resource[4]:
                if entry[0] == "cleanup.policy":
                    return str(entry[1])
    return None


#: A state's bytes (``Restored`` has a field named ``bytes``).
Blob = bytes


@dataclass
class Restored:
    """One changelog partition read to its end."""

    partition: int
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: Where the states read go, in order: a spool file (for an engine that maps one)
    #: or ``values`` in memory; ``rows``: stream id -> the index there of its last state.
    spool: Spool | None = None
    values: list[Blob] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    #: Local checkpoints: the read began at the local checkpoint's offset (``tail``), and
    #: the keys whose last record read is a tombstone go from it (``deleted``); ``end``:
    #: the offset the read stopped at; ``refused``: why a local offset was not used.
    tail: bool = False
    end: int = -1
    deleted: set[str] = field(default_factory=set)
    refused: str = ""

    @property
    def streams(self) -> int:
        return len(self.rows)

    @property
    def states(self) -> dict[str, Blob]:
        """Stream id -> its last state's bytes (tombstoned ones gone); in-memory reads."""
        return {name: self.values[row] for name, row in self.rows.items()}


async def read_partitions(
    options: dict[str, Any],
    topic: str,
    partitions: list[int],
    *,
    isolation_level: str = "read_uncommitted",
    max_partition_fetch_bytes: int = 8 << 20,
    on_streams: Callable[[int], None] | None = None,
    spool: Callable[[int], Spool] | None = None,
    from_offsets: Mapping[int, int] | None = None,
) -> list[Restored]:
    """Every stream's last state in each changelog partition, from its start to its end
    offset as the read begins; one consumer (one connection) for them all.

    ``from_offsets`` (local checkpoints): a partition's read begins there instead (its
    ``tail``), where that offset lies between the partition's start and end; one
    outside (records it needed deleted, or another incarnation of the topic) is
    ``refused`` and the partition read whole.

    ``on_streams(count)``, if given, hears after each fetch how many streams have a
    state so far (all partitions together). ``spool(records)``, if given, makes
    each partition a ``Spool`` for at most that many records: its states are
    written there as they are read (``rows``), not kept in ``states``; the
    caller closes it. 8 MiB fetches read 100k states of 2 KiB fastest (1 MiB
    took 1.4x as long, 32 MiB 1.1x).
    """
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = AIOKafkaConsumer(
        **options,
        enable_auto_commit=False,
        isolation_level=isolation_level,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        fetch_max_bytes=max(max_partition_fetch_bytes, 64 << 20),
        fetch_max_wait_ms=50,  # an empty fetch at the end must not cost aiokafka's 500 ms
    )
    read = {tp: Restored(tp.partition) for tp in tps}
    started = time.perf_counter()
    # No cyclic collections while the read makes a few objects per record (none in a
    # cycle): they took 0.1-0.3 s of a 0.6 s read of 100k states.
    collecting = gc.isenabled()
    gc.disable()
    try:
        await consumer.start()
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = _begins(read, await consumer.beginning_offsets(tps), ends, from_offsets or {})
        # Explicit seeks: seek_to_beginning with read_committed was seen to land at the end.
        for tp, offset in begins.items():
            consumer.seek(tp, offset)
        most = sum(max(ends[tp] - begins[tp], 0) for tp in tps)
        for tp in tps:
            records = max(ends[tp] - begins[tp], 0)
            read[tp].spool = None if spool is None else spool(records)
        pending = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
        progress = started
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=100_000)
            for tp, messages in batch.items():
                _apply(read[tp], messages, ends[tp])
            if on_streams is not None:
                on_streams(sum(r.streams for r in read.values()))
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
            if pending and time.perf_counter() - progress > _PROGRESS_S:
                progress = time.perf_counter()
                _log_progress(topic, list(read.values()), most, progress - started)
    except BaseException as exc:
        for restored in read.values():
            if restored.spool is not None:
                await restored.spool.close()
        if isinstance(exc, KafkaError):
            raise BrokerError(f"cannot read the changelog {topic} {partitions}: {exc}") from exc
        raise
    finally:
        if collecting:
            gc.enable()
        await consumer.stop()
    seconds = time.perf_counter() - started
    for restored in read.values():
        restored.seconds = seconds / len(tps)  # read together: each its share
    return list(read.values())


def _begins(
    read: dict[Any, Restored],
    starts: dict[Any, int],
    ends: dict[Any, int],
    local: Mapping[int, int],
) -> dict[Any, int]:
    """Where each partition's read begins: its start, or its local checkpoint's offset."""
    begins = dict(starts)
    for tp, restored in read.items():
        restored.end = ends[tp]
        offset = local.get(tp.partition)
        if offset is None:
            continue
        if starts[tp] <= offset <= ends[tp]:
            begins[tp], restored.tail = offset, True
        else:
            restored.refused = (
                f"its offset {offset} is outside the changelog's {starts[tp]}..{ends[tp]}"
            )
    return begins


#: A large restore says how far it got this often (seconds).
_PROGRESS_S = 5.0


def _log_progress(topic: str, read: list[Restored], most: int, seconds: float) -> None:
    logger.info(
        "restoring from %s: %d of at most %d records (%.0f MB) in %.0f s",
        topic,
        sum(r.records for r in read),
        most,
        sum(r.bytes for r in read) / 1e6,
        seconds,
    )


def _apply(restored: Restored, messages: list[Any], end: int) -> None:
    """Last record per stream wins; a tombstone deletes."""
    if messages and messages[-1].offset >= end:  # only the last fetch can pass the end
        messages = [msg for msg in messages if msg.offset < end]
    spool = restored.spool
    first = spool.records if spool is not None else len(restored.values)
    values = _last_per_stream(restored.rows, messages, first, restored.deleted)
    if spool is not None:
        spool.add(values)
    else:
        restored.values += values
    restored.records += len(messages)
    restored.bytes += sum(map(len, values))


def _last_per_stream(
    rows: dict[str, int], messages: list[Any], first: int, deleted: set[str]
) -> list[bytes]:
    """The records' states to keep, in order (the i-th is number ``first + i``); ``rows``
    then names each stream's last one, a tombstone dropping its stream (and naming it in
    ``deleted`` until a later state)."""
    values: list[bytes | None] = [msg.value for msg in messages]
    names = [msg.key.decode("utf-8", "surrogateescape") if msg.key else "" for msg in messages]
    if None not in values:  # no tombstone (a compacted changelog's usual batch): no loop
        rows.update(zip(names, range(first, first + len(values)), strict=True))
        if deleted:
            deleted.difference_update(names)
        return values  # type: ignore[return-value]
    kept: list[bytes] = []
    for name, value in zip(names, values, strict=True):
        if value is None:
            rows.pop(name, None)
            deleted.add(name)
        else:
            rows[name] = first + len(kept)
            kept.append(value)
            deleted.discard(name)
    return kept


class Changelog:
    """The daemon's durable state: checkpoints out to the changelog, restores in from it."""

    def __init__(
        self,
        options: dict[str, Any],
        topic: str,
        *,
        engine: EngineClient,
        metrics: ServeMetrics,
        swap_state: str,
        isolation_level: str,
        local: bool = False,
    ) -> None:
        self.options = options
        self.topic = topic
        self._engine = engine
        self._metrics = metrics
        self._policy = swap_state
        self._isolation = isolation_level
        self._outbox: Callable[[], Box] | None = None
        #: Local checkpoints (``engine/local_checkpoints.py``): restores read the tail of
        #: each partition after its local checkpoint, and each durable checkpoint is
        #: written there.
        self.local = local
        #: The outbox of the checkpoint being committed (its batches' offsets, once
        #: acknowledged, are where its records end).
        self._written: Box | None = None
        #: The engine's totals of local checkpoint writes as of its last reply.
        self._local_written: tuple[int, float] = (0, 0.0)

    def attach(self, outbox: Callable[[], Box]) -> None:
        """Where checkpoints go: a new outbox each (the daemon's producer, or in
        exactly-once mode each partition's transactional producer)."""
        self._outbox = outbox

    async def write(self, records: list[Change]) -> list[Any]:
        """Queue one checkpoint's records; returns their acknowledgement futures."""
        assert self._outbox is not None, "attach an outbox first"
        outbox = self._outbox()
        states = size = 0
        for stream, partition, value in records:
            outbox.add(self.topic, stream.encode(), value, partition=partition, source=partition)
            if value is not None:
                states += 1
                size += len(value)
        self._metrics.checkpoint_records.labels("state").inc(states)
        self._metrics.checkpoint_records.labels("tombstone").inc(len(records) - states)
        self._metrics.checkpoint_bytes.inc(size)
        self._written = outbox
        return await outbox.send()

    async def checkpointed(self, checkpoint: Any, seconds: float) -> None:
        """A checkpoint is durable (its records acknowledged, its offsets committed): counted,
        and with local checkpoints, written there with the offsets its records end at."""
        self._metrics.checkpoints.inc()
        self._metrics.checkpoint_seconds.observe(seconds)
        written, self._written = self._written, None
        if not self.local:
            return
        reply = await self._engine.checkpointed(_record_ends(written))
        metrics, (records, seconds) = self._metrics, self._local_written
        metrics.local_checkpoint_records.inc(reply.written_total - records)
        metrics.local_checkpoint_write_seconds.inc(reply.write_seconds_total - seconds)
        metrics.local_checkpoint_unwritten.set(reply.unwritten)
        self._local_written = (reply.written_total, reply.write_seconds_total)

    async def restore(self, partitions: list[int]) -> None:
        """Read the partitions' states to their ends and load them into the engine."""
        engine = self._engine
        reserving: list[asyncio.Future[None]] = []

        def on_streams(count: int) -> None:
            # The engine makes room as the read goes (growing the store after it
            # cost a 100k restore ~0.2 s of page faults); by the streams read, not
            # by the records ahead, which an uncompacted changelog has many more of.
            reserving.append(asyncio.ensure_future(engine.reserve(count)))

        local: dict[int, int] = {}
        opening = time.perf_counter()
        if self.local:
            opened = await engine.open_local(partitions)
            local = opened.offsets
            for reason in opened.refused.values():
                self._metrics.local_checkpoint_discarded.labels(reason).inc()
        opening = time.perf_counter() - opening  # the local checkpoints read: restore time
        try:
            every = await read_partitions(
                self.options,
                self.topic,
                partitions,
                isolation_level=self._isolation,
                on_streams=on_streams,
                spool=engine.spool,
                from_offsets=local,
            )
        finally:
            for future in reserving:
                await future
        for restored in every:
            restored.seconds += opening / len(every)
        try:
            await self._load(every)
        finally:
            for restored in every:
                if restored.spool is not None:
                    await restored.spool.close()

    async def _load(self, every: list[Restored]) -> None:
        for restored in every:
            partition = restored.partition
            started = time.perf_counter()
            local = self._local_restore(restored)
            if restored.spool is not None:
                report = await self._engine.restore_spooled(
                    partition, restored.spool, restored.rows, self._policy, local
                )
            else:
                report = await self._engine.restore(partition, restored.states, self._policy, local)
            seconds = restored.seconds + time.perf_counter() - started
            self._count_restore(restored, report, seconds)

    def _local_restore(self, restored: Restored) -> LocalRestore | None:
        """What the engine is to do with the partition's local checkpoint (None: none)."""
        if not self.local:
            return None
        if restored.refused:
            logger.warning(
                "partition %d: local checkpoint not used: %s", restored.partition, restored.refused
            )
            self._metrics.local_checkpoint_discarded.labels("outside_changelog").inc()
        return LocalRestore(restored.tail, restored.end, tuple(restored.deleted))

    def _count_restore(self, restored: Restored, report: RestoreReport, seconds: float) -> None:
        metrics = self._metrics
        metrics.restored_streams.inc(report.loaded)
        metrics.restore_bytes.inc(restored.bytes)
        metrics.restore_seconds.observe(seconds)
        source = "local" if restored.tail else "changelog"
        metrics.restore_partition_seconds.labels(source).observe(seconds)
        metrics.restore_local_streams.inc(report.from_local)
        metrics.restore_kept_model_changed.inc(report.kept_model_changed)
        metrics.restore_rewarmed_model_changed.inc(report.rewarmed_model_changed)
        metrics.restore_to_disk.inc(report.to_disk)
        for reason, count in (
            ("model_changed", report.reset_model_changed),
            ("over_capacity", report.over_capacity),
            ("corrupt", report.corrupt),
        ):
            metrics.restore_left_out.labels(reason).inc(count)
        logger.info(
            "partition %d: restored %d streams (%s%d records, %.1f MB) in %.2f s%s",
            restored.partition,
            report.loaded,
            f"{report.from_local} states from the local checkpoint and " if restored.tail else "",
            restored.records,
            restored.bytes / 1e6,
            seconds,
            _left_out(report),
        )


def _record_ends(outbox: Box | None) -> dict[int, int]:
    """Each changelog partition's offset after the last record of ``outbox``'s batches, all
    acknowledged by now (a batch's acknowledgement gives its first record's offset)."""
    ends: dict[int, int] = {}
    for future, records in [] if outbox is None else outbox.batches:
        meta = future.result()
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + len(records))
    return ends


def _left_out(report: Any) -> str:
    parts = [
        f"{report.reset_model_changed} reset (another model)" if report.reset_model_changed else "",
        f"{report.kept_model_changed} kept from another model" if report.kept_model_changed else "",
        f"{report.rewarmed_model_changed} re-warmed (another model)"
        if report.rewarmed_model_changed
        else "",
        f"{report.over_capacity} left out (max_streams)" if report.over_capacity else "",
        f"{report.to_disk} to the cold tier (past max_streams)" if report.to_disk else "",
        f"{report.corrupt} corrupt" if report.corrupt else "",
    ]
    text = ", ".join(p for p in parts if p)
    return f"; {text}" if text else ""

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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from streamlstm.consumers.engine_process import EngineClient
from streamlstm.consumers.outbox import Box
from streamlstm.errors import BrokerError
from streamlstm.metrics import ServeMetrics

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
            "broker with topic configs and compaction, such as Apache Kafka (not Tansu)"
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


@dataclass
class Restored:
    """One changelog partition read to its end."""

    partition: int
    states: dict[str, bytes]  # stream id -> its last state's bytes (tombstoned ones gone)
    records: int
    bytes: int
    seconds: float


async def read_partitions(
    options: dict[str, Any],
    topic: str,
    partitions: list[int],
    *,
    isolation_level: str = "read_uncommitted",
    max_partition_fetch_bytes: int = 8 << 20,
) -> list[Restored]:
    """Every stream's last state in each changelog partition, from its start to its end
    offset as the read begins; one consumer (one connection) for them all."""
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = AIOKafkaConsumer(
        **options,
        enable_auto_commit=False,
        isolation_level=isolation_level,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        fetch_max_bytes=max(max_partition_fetch_bytes, 64 << 20),
        fetch_max_wait_ms=50,  # an empty fetch at the end must not cost aiokafka's 500 ms
    )
    read = {tp: Restored(tp.partition, {}, 0, 0, 0.0) for tp in tps}
    started = time.perf_counter()
    try:
        await consumer.start()
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        # Explicit seeks: seek_to_beginning with read_committed was seen to land at the end.
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        pending = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=100_000)
            for tp, messages in batch.items():
                _apply(read[tp], messages, ends[tp])
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
    except KafkaError as exc:
        raise BrokerError(f"cannot read the changelog {topic} {partitions}: {exc}") from exc
    finally:
        await consumer.stop()
    seconds = time.perf_counter() - started
    for restored in read.values():
        restored.seconds = seconds / len(tps)  # read together: each its share
    return list(read.values())


def _apply(restored: Restored, messages: list[Any], end: int) -> None:
    """Last record per stream wins; a tombstone deletes."""
    states = restored.states
    for msg in messages:
        if msg.offset >= end:
            break
        restored.records += 1
        key = msg.key.decode("utf-8", "surrogateescape") if msg.key else ""
        if msg.value is None:
            states.pop(key, None)
        else:
            states[key] = msg.value
            restored.bytes += len(msg.value)


class Changelog:
    """The daemon's durable state: checkpoints out to the changelog, restores in from it."""

    def __init__(
        self,
        options: dict[str, Any],
        topic: str,
        *,
        engine: EngineClient,
        metrics: ServeMetrics,
        on_model_change: str,
        isolation_level: str,
    ) -> None:
        self.options = options
        self.topic = topic
        self._engine = engine
        self._metrics = metrics
        self._policy = on_model_change
        self._isolation = isolation_level
        self._outbox: Callable[[], Box] | None = None

    def attach(self, outbox: Callable[[], Box]) -> None:
        """Where checkpoints go: a new outbox each (the daemon's producer, or in
        exactly-once mode each partition's transactional producer)."""
        self._outbox = outbox

    async def write(self, records: list[tuple[str, int, bytes | None]]) -> list[Any]:
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
        return await outbox.send()

    def checkpointed(self, checkpoint: Any, seconds: float) -> None:
        self._metrics.checkpoints.inc()
        self._metrics.checkpoint_seconds.observe(seconds)

    async def restore(self, partitions: list[int]) -> None:
        """Read the partitions' states to their ends and load them into the engine."""
        every = await read_partitions(
            self.options, self.topic, partitions, isolation_level=self._isolation
        )
        for restored in every:
            partition = restored.partition
            started = time.perf_counter()
            report = await self._engine.restore(partition, restored.states, self._policy)
            seconds = restored.seconds + time.perf_counter() - started
            metrics = self._metrics
            metrics.restored_streams.inc(report.loaded)
            metrics.restore_bytes.inc(restored.bytes)
            metrics.restore_seconds.observe(seconds)
            metrics.restore_kept_model_changed.inc(report.kept_model_changed)
            for reason, count in (
                ("model_changed", report.reset_model_changed),
                ("over_capacity", report.over_capacity),
                ("corrupt", report.corrupt),
            ):
                metrics.restore_left_out.labels(reason).inc(count)
            logger.info(
                "partition %d: restored %d streams (%d records, %.1f MB) in %.2f s%s",
                partition,
                report.loaded,
                restored.records,
                restored.bytes / 1e6,
                seconds,
                _left_out(report),
            )


def _left_out(report: Any) -> str:
    parts = [
        f"{report.reset_model_changed} reset (another model)" if report.reset_model_changed else "",
        f"{report.kept_model_changed} kept from another model" if report.kept_model_changed else "",
        f"{report.over_capacity} left out (max_streams)" if report.over_capacity else "",
        f"{report.corrupt} corrupt" if report.corrupt else "",
    ]
    text = ", ".join(p for p in parts if p)
    return f"; {text}" if text else ""

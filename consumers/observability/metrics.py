"""Prometheus metric definitions. Every metric is registered on a registry passed in.

Values cheap to read at scrape time (active streams, evictions, lag) come
from a custom collector instead of being pushed on every tick; latency
histograms take whole arrays at once. No stream id is ever a label value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamlstm.cold_tier import ColdStats
from streamlstm.engine import EngineStats

__all__ = ["BulkHistogram", "EngineStatsCollector", "ServeMetrics"]

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class BulkHistogram(Collector):
    """A histogram fed a whole array per call: one numpy pass per batch, not per tick."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(self.bounds.size + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        if not values.size:
            return
        index = np.searchsorted(self.bounds, values, side="left")
        counts = np.bincount(index, minlength=self.bounds.size + 1)
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        yield family


class EngineStatsCollector(Collector):
    """Engine figures and consumer lag, read when Prometheus scrapes."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        lag: Callable[[], Mapping[tuple[str, int], int]] = dict,
    ) -> None:
        self._stats = stats
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "streamlstm_active_streams", "Streams with state in memory", value=stats.active_streams
        )
        yield GaugeMetricFamily(
            "streamlstm_state_capacity_streams", "Allocated state slots", value=stats.capacity
        )
        yield GaugeMetricFamily(
            "streamlstm_max_streams",
            "Configured bound on streams in memory",
            value=stats.max_streams,
        )
        evictions = CounterMetricFamily(
            "streamlstm_evictions", "Streams evicted from memory", labels=["reason"]
        )
        for reason in ("lru", "ttl"):
            evictions.add_metric([reason], stats.evictions.get(reason, 0))
        yield evictions
        if stats.cold is not None:
            yield from _cold_metrics(stats.cold)
        yield CounterMetricFamily("streamlstm_resets", "Ticks with reset set", value=stats.resets)
        yield CounterMetricFamily("streamlstm_ends", "Ticks with end set", value=stats.ends)
        lag = GaugeMetricFamily(
            "streamlstm_consumer_lag",
            "Records behind the partition end",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self._lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        shadow = GaugeMetricFamily(
            "streamlstm_shadow_model_info",
            "The shadow model run beside the served one (--shadow-model): 1 while it runs, "
            "no series when none does (never started, promoted or stopped)",
            labels=["model"],
        )
        if stats.shadow_model:
            shadow.add_metric([stats.shadow_model], 1)
        yield shadow


def _cold_metrics(cold: ColdStats) -> Iterator[Metric]:
    """The cold tier's figures (docs/cold-tier.md); only where there is one."""
    yield GaugeMetricFamily(
        "streamlstm_cold_streams", "Streams with state in the cold tier (local disk)", cold.streams
    )
    yield GaugeMetricFamily(
        "streamlstm_cold_disk_bytes", "Bytes of the cold tier's table files", cold.disk_bytes
    )
    yield CounterMetricFamily(
        "streamlstm_cold_reads",
        "Batched reads of the cold tier (one per partition a step)",
        value=cold.reads,
    )
    yield CounterMetricFamily(
        "streamlstm_cold_lookups",
        "Streams not in memory looked for in the cold tier",
        value=cold.looked_up,
    )
    yield CounterMetricFamily(
        "streamlstm_cold_hits",
        "Streams found in the cold tier and read back (returning)",
        value=cold.hits,
    )
    yield CounterMetricFamily(
        "streamlstm_cold_writes", "States moved from memory to the cold tier", value=cold.writes
    )
    dropped = CounterMetricFamily(
        "streamlstm_cold_dropped",
        "States that left the cold tier for good: its bound, idle expiry, refused on return",
        labels=["reason"],
    )
    for reason, value in (
        ("bound", cold.pushed_out),
        ("ttl", cold.expired),
        ("refused", cold.refused),
    ):
        dropped.add_metric([reason], value)
    yield dropped


#: Why a local checkpoint is not used at a restore (``LocalReply.refused``).
LOCAL_DISCARD_REASONS = (
    "missing", "corrupt", "other_changelog", "other_model", "outside_changelog"
)  # fmt: skip


class ServeMetrics:
    """The daemon's metrics, all on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # CPU, memory, open files and start time of this process (process_*).
        ProcessCollector(registry=registry)
        self.ticks_consumed = Counter(
            "streamlstm_ticks_consumed", "Messages read from the input topic", registry=registry
        )
        self.predictions = Counter(
            "streamlstm_predictions_produced",
            "Predictions acknowledged on the output topic",
            registry=registry,
        )
        self.dead_letters = Counter(
            "streamlstm_dead_letters",
            "Messages sent to the dead-letter topic, by the field that was wrong",
            ["reason"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "streamlstm_batch_size",
            "Ticks per engine step",
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=registry,
        )
        self.poll_batch_target = Gauge(
            "streamlstm_poll_batch_target_records",
            "Records a poll asks for: --max-records, or what --latency-target-ms sized",
            registry=registry,
        )
        self.step_seconds = Histogram(
            "streamlstm_step_seconds",
            "Engine step time per batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commits = Counter(
            "streamlstm_commits", "Offset commits after acknowledged output", registry=registry
        )
        self.rebalances = Counter(
            "streamlstm_partitions_revoked", "Partitions revoked by rebalances", registry=registry
        )
        self.latency_event = BulkHistogram(
            "streamlstm_latency_from_event_seconds",
            "Tick event time to prediction acknowledged",
            LATENCY_BUCKETS,
        )
        self.latency_receive = BulkHistogram(
            "streamlstm_latency_from_receive_seconds",
            "Tick received from Kafka to prediction acknowledged",
            LATENCY_BUCKETS,
        )
        registry.register(self.latency_event)
        registry.register(self.latency_receive)
        self._models(registry)
        self.controls = Counter(
            "streamlstm_control_records",
            "Control records (reset, delete) by outcome: applied, or skipped as already applied",
            ["op", "outcome"],
            registry=registry,
        )
        for op in ("reset", "delete"):
            for outcome in ("applied", "skipped"):
                self.controls.labels(op, outcome)
        self.skipped = Counter(
            "streamlstm_ticks_skipped",
            "Ticks not applied because the stream's state already reflected their offset",
            registry=registry,
        )
        self._durability(registry)

    def _models(self, registry: CollectorRegistry) -> None:
        """The model served, and its reloads (docs/model-reload.md)."""
        self.model_info = Info("streamlstm_model", "The model being served", registry=registry)
        self.shadow_predictions = Counter(
            "streamlstm_shadow_predictions",
            "Predictions of the shadow model sent to --shadow-topic",
            registry=registry,
        )
        self.model_reloads = Counter(
            "streamlstm_model_reloads",
            "Model reloads by outcome: swapped, unchanged (already served), refused (the "
            "model served so far goes on)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("swapped", "unchanged", "refused"):
            self.model_reloads.labels(outcome)
        self.model_swap_seconds = Gauge(
            "streamlstm_model_swap_seconds",
            "The last model swap's time in the engine: the new bundle loaded, every state moved",
            registry=registry,
        )

    def _durability(self, registry: CollectorRegistry) -> None:
        """Checkpoints, transactions and restores (durable state; 0 in memory mode)."""
        self.checkpoints = Counter(
            "streamlstm_checkpoints",
            "Checkpoints completed (changelog, then offsets)",
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "streamlstm_checkpoint_seconds",
            "From asking the engine for changed states to committing the offsets",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checkpoint_records = Counter(
            "streamlstm_checkpoint_records",
            "Changelog records written by checkpoints, by kind (state or tombstone)",
            ["kind"],
            registry=registry,
        )
        self.checkpoint_bytes = Counter(
            "streamlstm_checkpoint_bytes",
            "Bytes of state written to the changelog",
            registry=registry,
        )
        for kind in ("state", "tombstone"):  # at 0 from the start: in every mode
            self.checkpoint_records.labels(kind)
        self.transactions = Counter(
            "streamlstm_transactions",
            "Exactly-once transactions (one per input partition and commit interval) by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("committed", "aborted"):
            self.transactions.labels(outcome)
        self._restores(registry)

    def _restores(self, registry: CollectorRegistry) -> None:
        """Restores from the changelog (durable state; 0 in memory mode)."""
        self.restored_streams = Counter(
            "streamlstm_restored_streams", "Streams loaded from the changelog", registry=registry
        )
        self.restore_left_out = Counter(
            "streamlstm_restore_left_out_streams",
            "Changelog states not loaded, by reason (model_changed, over_capacity, corrupt)",
            ["reason"],
            registry=registry,
        )
        # Every label value at 0 from the start, so that the series exist in every mode.
        for reason in ("model_changed", "over_capacity", "corrupt"):
            self.restore_left_out.labels(reason)
        self.restore_kept_model_changed = Counter(
            "streamlstm_restore_kept_model_changed_streams",
            "States from another, compatible model kept (--swap-state carry; auto: a retrain)",
            registry=registry,
        )
        self.restore_rewarmed_model_changed = Counter(
            "streamlstm_restore_rewarmed_model_changed_streams",
            "States from another model re-warmed: the served model run over their held ticks "
            "(--swap-state rewarm; auto: another model)",
            registry=registry,
        )
        self.restore_to_disk = Counter(
            "streamlstm_restore_to_disk_streams",
            "States past max_streams a restore wrote to the cold tier (--state-dir)",
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "streamlstm_restore_seconds",
            "Time to restore one changelog partition",
            buckets=(0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )
        self.restore_bytes = Counter(
            "streamlstm_restore_bytes", "Bytes of state read from the changelog", registry=registry
        )
        self._local_checkpoints(registry)

    def _local_checkpoints(self, registry: CollectorRegistry) -> None:
        """Local checkpoints (a state dir with durable state; 0 otherwise)."""
        self.restore_partition_seconds = Histogram(
            "streamlstm_restore_partition_seconds",
            "Time to restore one changelog partition, by source: local (a local checkpoint "
            "and the changelog after it) or changelog (the whole partition)",
            ["source"],
            buckets=(0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )
        for source in ("local", "changelog"):
            self.restore_partition_seconds.labels(source)
        self.restore_local_streams = Counter(
            "streamlstm_restore_local_streams",
            "States a restore took from a local checkpoint rather than the changelog",
            registry=registry,
        )
        self.local_checkpoint_records = Counter(
            "streamlstm_local_checkpoint_records",
            "Records (states and deletions) written to local checkpoints",
            registry=registry,
        )
        self.local_checkpoint_write_seconds = Counter(
            "streamlstm_local_checkpoint_write_seconds",
            "Time the engine process spent writing local checkpoints",
            registry=registry,
        )
        self.local_checkpoint_unwritten = Gauge(
            "streamlstm_local_checkpoint_unwritten_records",
            "Records durable in the changelog and not yet in the local checkpoints",
            registry=registry,
        )
        self.local_checkpoint_discarded = Counter(
            "streamlstm_local_checkpoint_discarded",
            "Local checkpoints not used at a restore, by reason (missing, corrupt, "
            "other_changelog, other_model, outside_changelog)",
            ["reason"],
            registry=registry,
        )
        for reason in LOCAL_DISCARD_REASONS:
            self.local_checkpoint_discarded.labels(reason)

    @staticmethod
    def watch_engine_process(registry: CollectorRegistry, pid: Callable[[], int]) -> None:
        """The engine child's CPU and memory, as ``streamlstm_engine_process_*``."""
        ProcessCollector(namespace="streamlstm_engine", pid=pid, registry=registry)

"""What the daemon tells about itself: totals, latency, lag, and the periodic summary.

The committer reports each acknowledged poll here (``acknowledged``); the
summary goes to the log and, when configured, to the metrics topic every
``metrics_interval_s``. Lag is the partition's end (the consumer's high
watermark) less this instance's last committed position; a partition it has
not committed yet has no lag figure rather than the whole topic.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streamlstm import EngineStats
from streamlstm.consumers.durability.committer import Sent
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.errors import BrokerError

__all__ = ["Reporter"]

logger = logging.getLogger(__name__)


class _Partitioned(Protocol):
    """What lag needs of the consumer: its assignment and each partition's end."""

    def assignment(self) -> Any: ...
    def highwater(self, tp: Any) -> int | None: ...


class Reporter:
    """Totals and latency of acknowledged output; lag against committed positions."""

    def __init__(
        self,
        metrics: ServeMetrics,
        *,
        instance_id: str,
        clock: Callable[[], float],
    ) -> None:
        self.metrics = metrics
        self.instance_id = instance_id
        self._clock = clock
        self._consumer: _Partitioned | None = None
        #: Committed next offsets per TopicPartition (for lag).
        self.positions: dict[Any, int] = {}
        self.totals: collections.Counter[str] = collections.Counter()
        self._recent_latency: collections.deque[npt.NDArray[np.float64]] = collections.deque(
            maxlen=64
        )
        #: Per acknowledged poll, ``[n, 2]``: each tick's event time and its latency (seconds).
        self.recent_event_latency: collections.deque[npt.NDArray[np.float64]] = collections.deque(
            maxlen=4096
        )
        #: Per acknowledged poll, ``[n, 2]``: when its records were received and how long
        #: until their predictions were acknowledged (seconds): what the daemon adds.
        self.recent_daemon_latency: collections.deque[npt.NDArray[np.float64]] = collections.deque(
            maxlen=4096
        )

    def watch(self, consumer: _Partitioned) -> None:
        """Read lag from ``consumer`` from now on."""
        self._consumer = consumer

    def acknowledged(self, sent: Sent) -> None:
        """Count a poll whose output the broker acknowledged."""
        batch, encoded = sent.batch, sent.encoded
        produced = encoded.produced
        acked = sent.acked_at or self._clock()
        self.metrics.predictions.inc(produced)
        received_latency = np.full(produced, acked - batch.received)
        self.metrics.latency_receive.observe_many(received_latency)
        self._recent_latency.append(received_latency)
        if produced:
            self.recent_daemon_latency.append(
                np.column_stack([np.full(produced, batch.received), received_latency])
            )
        event_latency = acked - encoded.event_times
        self.metrics.latency_event.observe_many(event_latency)
        if event_latency.size:
            self.recent_event_latency.append(np.column_stack([encoded.event_times, event_latency]))
        self.totals.update(ticks=batch.count, predictions=produced, dead_letters=len(encoded.dead))

    def committed(self, offsets: Mapping[Any, int]) -> None:
        self.positions.update(offsets)
        self.metrics.commits.inc()

    def keep_positions(self, kept: set[Any]) -> None:
        """Forget committed positions of partitions no longer held."""
        self.positions = {tp: o for tp, o in self.positions.items() if tp in kept}

    def lag(self) -> dict[tuple[str, int], int]:
        consumer = self._consumer
        if consumer is None:
            return {}
        lag = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self.positions.get(tp)
            if high is not None and position is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - position)
        return lag

    def summary(
        self, stats: EngineStats, interval_s: float, previous: Mapping[str, int]
    ) -> dict[str, Any]:
        recent = list(self._recent_latency)
        latencies = np.concatenate(recent) if recent else np.empty(0)
        ticks = self.totals["ticks"] - previous.get("ticks", 0)

        def quantile_ms(q: float) -> float | None:
            if not latencies.size:
                return None
            return round(float(np.percentile(latencies, q)) * 1e3, 2)

        return {
            "instance": self.instance_id,
            "ts": int(self._clock() * 1000),
            "interval_s": interval_s,
            **{k: int(v) for k, v in self.totals.items()},
            "ticks_per_s": round(ticks / interval_s, 1),
            "latency_ms_p50": quantile_ms(50),
            "latency_ms_p99": quantile_ms(99),
            "active_streams": stats.active_streams,
            "evictions": stats.evictions,
            "lag": {str(p): v for (_, p), v in self.lag().items()},
            "worst_streams": [dataclasses.asdict(w) for w in stats.worst_streams],
        }

    async def run_summaries(
        self,
        interval_s: float,
        stats: Callable[[], EngineStats],
        publish: Callable[[bytes, bytes], Awaitable[None]] | None,
    ) -> None:
        """Every ``interval_s``: log a summary and ``publish(key, value)`` it when given."""
        previous: collections.Counter[str] = collections.Counter()
        while True:
            await asyncio.sleep(interval_s)
            summary = self.summary(stats(), interval_s, previous)
            previous = collections.Counter(self.totals)
            logger.info(
                "%.0f ticks/s, %d predictions, %d dead letters, %d streams, p50 %s ms, p99 %s ms",
                summary["ticks_per_s"],
                summary.get("predictions", 0),
                summary.get("dead_letters", 0),
                summary["active_streams"],
                summary["latency_ms_p50"],
                summary["latency_ms_p99"],
            )
            if summary["worst_streams"]:
                logger.info(
                    "worst streams by recent absolute error (naive forecast's beside): %s",
                    ", ".join(
                        f"{w['stream']} {w['recent_abs_error']:.4g} "
                        f"({w['recent_baseline_abs_error']:.4g})"
                        for w in summary["worst_streams"]
                    ),
                )
            if publish is not None:
                try:
                    await publish(self.instance_id.encode(), json.dumps(summary).encode())
                except BrokerError:
                    logger.warning("could not publish the metrics summary", exc_info=True)

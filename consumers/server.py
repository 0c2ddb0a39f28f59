"""The serving daemon: Kafka ticks in, predictions and dead letters out.

One poll, in order:

1. ``getmany`` up to ``max_records`` records; decode and validate each; bad
   ones are set aside for the dead-letter topic.
2. Submit the batch to the engine, which steps in a child process (see
   ``streamlstm.consumers.engine_process`` for why not a thread). The event loop stays
   free for heartbeats and fetches, and decodes the next batch meanwhile.
3. When the step is done: send one prediction per valid tick and one dead
   letter per bad one, and queue the batch for the committer; the loop goes
   on to the next poll (at most ``max_unacked_batches`` wait at once).
4. The committer, in batch order: wait until every send of the batch is
   acknowledged, then commit its input offsets (batches acknowledged
   meanwhile share one commit). Only then is a tick considered done, so a
   crash anywhere before re-reads it (at-least-once output).

On revoke, in-flight batches are finished and committed first. On the
assignment that follows, the streams of partitions that did not come back
are dropped from memory (until durable state lands, a moved partition's
streams restart from zero state); partitions that stay keep their state.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import CollectorRegistry

from streamlstm.consumers.engine_process import EngineProcess, StepRequest
from streamlstm.consumers.http import HttpEndpoints
from streamlstm.consumers.kafka import client_options, ensure_topics, partitions_of, start_client
from streamlstm.consumers.outbox import Outbox
from streamlstm.consumers.settings import ServeConfig
from streamlstm import Bundle, EngineStats, StepResult
from streamlstm.errors import BrokerError, InputError
from streamlstm.kernels import step_name
from streamlstm.metrics import EngineCollector, ServeMetrics
from streamlstm.wire import decode_tick, encode_prediction

__all__ = ["Server"]

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    """Decoded records of one poll."""

    received: float
    ids: list[str] = field(default_factory=list)
    values: list[tuple[float, ...]] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    resets: list[bool] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)  # the record of each valid tick
    records: int = 0
    bad: list[tuple[Any, str, str]] = field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass
class _InFlight:
    batch: _Batch
    step: asyncio.Future[tuple[StepResult | None, float]]


@dataclass
class _Sent:
    """A batch whose output is sent; acknowledged and committed later, in order."""

    batch: _Batch
    sends: list[asyncio.Future[Any]]
    produced: int
    dead: int
    event_times: np.ndarray  # seconds, of the answered ticks that carried one
    acked_at: float = 0.0  # when the broker acknowledged the last send (seconds)

    def __post_init__(self) -> None:
        # Stamped as each ack arrives, not when the committer gets to the batch
        # (it may be waiting on an earlier commit): latency ends at the ack.
        for future in self.sends:
            future.add_done_callback(self._stamp)

    def _stamp(self, _: asyncio.Future[Any]) -> None:
        self.acked_at = time.time()


class Server:
    """``async with Server(config) as server: await server.wait()``.

    ``start`` loads the model, checks the topics and joins the group;
    ``stop`` finishes in-flight work, commits and leaves the group (safe to
    call twice). An error in the background loop is re-raised by ``wait``.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        bundle: Bundle | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = ServeMetrics(self.registry)
        self._bundle = bundle
        self._engine: EngineProcess | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._http: HttpEndpoints | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._pending: collections.deque[_InFlight] = collections.deque()
        self._unacked: asyncio.Queue[_Sent] = asyncio.Queue(config.max_unacked_batches)
        self._committer: asyncio.Task[None] | None = None
        self._partitions: dict[str, list[int]] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._revoked: set[int] = set()  # input partitions revoked since the last assignment
        self._task: asyncio.Task[None] | None = None
        self._summary_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._model_id = ""
        self._has_score = False
        self._recent_latency: collections.deque[np.ndarray] = collections.deque(maxlen=64)
        self._totals: collections.Counter[str] = collections.Counter()
        #: Per acknowledged batch, ``[n, 2]``: each tick's event time and its latency (seconds).
        self.recent_event_latency: collections.deque[np.ndarray] = collections.deque(maxlen=4096)

    # -- lifecycle ----------------------------------------------------------

    @property
    def metrics_port(self) -> int:
        return self._http.port if self._http else self.config.metrics_port

    def ready(self) -> bool:
        return (
            self._engine is not None
            and self._engine.stats is not None
            and self._consumer is not None
            and bool(self._consumer.assignment())
            and not self._stopping.is_set()
        )

    def assignment(self) -> list[int]:
        """The input topic's partitions this instance holds now."""
        consumer = self._consumer
        if consumer is None:
            return []
        topic = self.config.input_topic
        return sorted(tp.partition for tp in consumer.assignment() if tp.topic == topic)

    def healthy(self) -> bool:
        """The loop has not failed and the engine process is alive (``/healthz``)."""
        loop_ok = self._task is not None and not (self._task.done() and self._task.exception())
        return loop_ok and self._engine is not None and self._engine.alive

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.config
        bundle = self._bundle = self._bundle or Bundle.load(cfg.model)
        self._engine = EngineProcess(
            bundle,
            max_streams=cfg.max_streams,
            idle_ttl_s=cfg.idle_ttl_s,
            threads=cfg.engine_threads,
        )
        started = await self._engine.start()
        self._model_id = bundle.model_id
        self._has_score = bundle.outputs.score_span is not None
        self.metrics.model_info.info(
            {
                "model": self._model_id,
                "inputs": str(bundle.config.input_size),
                "outputs": str(bundle.config.output_size),
                "recurrent_step": step_name(started.native),
            }
        )
        self.registry.register(EngineCollector(self.engine_stats, self._lag))
        options = client_options(
            cfg.bootstrap_servers,
            security_protocol=cfg.security_protocol,
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_plain_username,
            sasl_plain_password=cfg.sasl_plain_password,
            ssl_cafile=cfg.ssl_cafile,
            ssl_certfile=cfg.ssl_certfile,
            ssl_keyfile=cfg.ssl_keyfile,
            client_id=f"streamlstm-{cfg.instance_id}",
        )
        # Before the consumer joins: a rebalance waits on the committer.
        self._committer = asyncio.create_task(self._commit_loop(), name="streamlstm-commit")
        topics = [cfg.input_topic, cfg.output_topic, str(cfg.dlq_topic)]
        if cfg.metrics_topic:
            topics.append(cfg.metrics_topic)
        await ensure_topics(
            options, topics, create=cfg.create_topics, partitions=cfg.topic_partitions
        )
        self._producer = AIOKafkaProducer(
            **options,
            acks="all",
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            max_request_size=cfg.max_request_bytes,
            compression_type=cfg.compression_type,
        )
        await start_client(self._producer, cfg.bootstrap_servers)
        self._partitions = await partitions_of(
            self._producer, [cfg.output_topic, str(cfg.dlq_topic)]
        )
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            max_partition_fetch_bytes=cfg.max_request_bytes,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        )
        self._consumer.subscribe([cfg.input_topic], listener=_Rebalance(self))
        await start_client(self._consumer, cfg.bootstrap_servers)
        self._http = HttpEndpoints(
            self.registry,
            ready=self.ready,
            healthy=self.healthy,
            host=cfg.metrics_host,
            port=cfg.metrics_port,
        )
        await self._http.start()
        # Everything loaded so far (torch, the model, the clients) lives as
        # long as the process; leaving it out of the collector's full passes
        # keeps them from pausing the loop for ~100 ms every few seconds.
        gc.freeze()
        self._task = asyncio.create_task(self._run(), name="streamlstm-serve")
        self._summary_task = asyncio.create_task(self._summaries(), name="streamlstm-summary")
        logger.info(
            "serving %s: %s -> %s (dead letters: %s, group %s)",
            self._model_id,
            cfg.input_topic,
            cfg.output_topic,
            cfg.dlq_topic,
            cfg.group_id,
        )

    def request_stop(self) -> None:
        """Ask the loop to finish its batch and stop (signal handlers call this)."""
        self._stopping.set()

    async def wait(self) -> None:
        """Until the loop ends; re-raises the loop's error, if any."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.config.shutdown_timeout_s)
            except TimeoutError:
                logger.error("shutdown timed out after %.0f s", self.config.shutdown_timeout_s)
                self._task.cancel()
            except Exception:  # already logged by the loop; stop the rest anyway
                pass
        if self._summary_task is not None:
            self._summary_task.cancel()
        for client in (self._consumer, self._producer):
            if client is not None:
                try:
                    await client.stop()  # the consumer leaves the group; the producer flushes
                except KafkaError:
                    logger.warning("error while closing a Kafka client", exc_info=True)
        if self._committer is not None:  # after the consumer left: its revoke drains through it
            self._committer.cancel()
        if self._http is not None:
            await self._http.stop()
        if self._engine is not None:
            await self._engine.close()
        logger.info("stopped after %d ticks", self._totals["ticks"])

    async def __aenter__(self) -> Server:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the loop -----------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        assert self._bundle is not None, "the bundle is loaded by start()"
        return self._bundle

    def engine_stats(self) -> EngineStats:
        """The engine's figures as of its last reply (the collector reads them at scrape time)."""
        assert self._engine is not None and self._engine.stats is not None
        return self._engine.stats

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping.is_set():
                if self._committer is not None and self._committer.done():
                    self._committer.result()  # re-raises the committer's error
                records = await consumer.getmany(
                    timeout_ms=0 if self._pending else 100, max_records=self.config.max_records
                )
                async with self._lock:
                    batch = self._decode(records) if records else None
                    if batch is not None:
                        self._pending.append(self._begin(batch))
                    # Keep one batch stepping while the previous one is produced.
                    while len(self._pending) > (1 if batch is not None else 0):
                        await self._send(self._pending.popleft())
            async with self._lock:
                await self._drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("serving loop failed")
            raise

    async def _drain(self) -> None:
        """Send every stepped batch, then wait until all are acknowledged and committed."""
        while self._pending:
            await self._send(self._pending.popleft())
        await self._with_committer(self._unacked.join())

    def _decode(self, records: dict[TopicPartition, list[Any]]) -> _Batch | None:
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        width = self.bundle.config.input_size
        limit = self.config.max_value_bytes
        batch = _Batch(received=time.time())
        for tp, messages in records.items():
            if tp not in assigned or not messages:
                continue  # revoked meanwhile: the new owner reads these
            for msg in messages:
                batch.records += 1
                try:
                    tick = decode_tick(msg.key, msg.value, input_size=width, max_value_bytes=limit)
                except InputError as exc:
                    batch.bad.append((msg, exc.field, exc.reason))
                    continue
                batch.ids.append(tick.stream)
                batch.values.append(tick.values)
                batch.ts.append(np.nan if tick.ts is None else tick.ts)
                batch.resets.append(tick.reset)
                batch.ends.append(tick.end)
                batch.messages.append(msg)
            batch.next_offsets[tp] = messages[-1].offset + 1
        if not batch.next_offsets:
            return None
        self.metrics.ticks_consumed.inc(batch.records)
        return batch

    def _begin(self, batch: _Batch) -> _InFlight:
        return _InFlight(batch, asyncio.ensure_future(self._step(batch)))

    @property
    def totals(self) -> dict[str, int]:
        return dict(self._totals)

    async def _step(self, batch: _Batch) -> tuple[StepResult | None, float]:
        if not batch.ids:
            return None, 0.0
        ts = np.asarray(batch.ts, dtype=np.float64)
        # A tick without event time is seen now, as the engine sees a call without any;
        # the others keep their own time (the idle TTL runs on event time).
        ts[np.isnan(ts)] = time.time() * 1000.0
        assert self._engine is not None
        reply = await self._engine.step(
            StepRequest(
                stream_ids=batch.ids,
                features=np.asarray(batch.values, dtype=np.float64),
                resets=batch.resets,
                ends=batch.ends,
                timestamps=ts,
                offsets=[msg.offset for msg in batch.messages],
                partitions=[msg.partition for msg in batch.messages],
            )
        )
        return reply.result, reply.seconds

    async def _with_committer(self, awaitable: Any) -> None:
        """Await ``awaitable`` unless the committer fails first; then raise its error."""
        committer = self._committer
        assert committer is not None
        waiter = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({waiter, committer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if committer.done():
            committer.result()
            raise BrokerError("the committer stopped")
        waiter.result()

    async def _send(self, inflight: _InFlight) -> None:
        producer = self._producer
        assert producer is not None
        cfg = self.config
        batch = inflight.batch
        result, seconds = await inflight.step
        outbox = Outbox(producer, self._partitions)
        dead: list[tuple[Any, str, str]] = list(batch.bad)
        produced = 0
        event_ts = np.asarray(batch.ts, dtype=np.float64)
        if result is not None:
            event_ts = event_ts[result.accepted]
            self.metrics.batch_size.observe(len(batch.ids))
            self.metrics.step_seconds.observe(seconds)
            predictions = result.predictions.tolist()
            steps = result.steps.tolist()
            ready = result.ready.tolist()
            # A model with an anomaly score puts "score" (null while warming up) in every output.
            scores = result.scores.tolist() if self._has_score else None
            rejected = {r.index: r for r in result.rejections}
            for i, (stream, msg) in enumerate(zip(batch.ids, batch.messages, strict=True)):
                if i in rejected:
                    dead.append((msg, rejected[i].field, rejected[i].reason))
                    continue
                ts = batch.ts[i]
                value = encode_prediction(
                    stream=stream,
                    ts=None if ts != ts else ts,
                    prediction=predictions[i],
                    partition=msg.partition,
                    offset=msg.offset,
                    step=steps[i],
                    ready=ready[i],
                    model=self._model_id,
                    score=None if scores is None else scores[i],
                )
                outbox.add(cfg.output_topic, msg.key or stream.encode(), value)
                produced += 1
        for msg, fieldname, reason in dead:
            headers = [
                ("streamlstm-error", reason.encode()),
                ("streamlstm-field", fieldname.encode()),
                ("streamlstm-source-topic", msg.topic.encode()),
                ("streamlstm-source-partition", str(msg.partition).encode()),
                ("streamlstm-source-offset", str(msg.offset).encode()),
            ]
            outbox.add(str(cfg.dlq_topic), msg.key, msg.value, headers)
            self.metrics.dead_letters.labels(fieldname).inc()
        event_times = event_ts[np.isfinite(event_ts)] / 1000.0
        sent = _Sent(batch, await outbox.send(), produced, len(dead), event_times)
        if self._unacked.full():
            await self._with_committer(self._unacked.put(sent))
        else:
            self._unacked.put_nowait(sent)

    async def _commit_loop(self) -> None:
        """Acknowledge, then commit, the sent batches in order; see the module docstring."""
        while True:
            group = [await self._unacked.get()]
            while not self._unacked.empty():
                group.append(self._unacked.get_nowait())
            try:
                offsets: dict[TopicPartition, int] = {}
                for sent in group:
                    await self._acknowledged(sent)
                    offsets.update(sent.batch.next_offsets)
                await self._commit(offsets)
            finally:
                for _ in group:
                    self._unacked.task_done()

    async def _acknowledged(self, sent: _Sent) -> None:
        batch, produced = sent.batch, sent.produced
        try:
            await asyncio.gather(*sent.sends)
        except KafkaError as exc:
            raise BrokerError(f"output not acknowledged, offsets not committed: {exc}") from exc
        acked = sent.acked_at or time.time()
        self.metrics.predictions.inc(produced)
        received_latency = np.full(produced, acked - batch.received)
        self.metrics.latency_receive.observe_many(received_latency)
        self._recent_latency.append(received_latency)
        event_latency = acked - sent.event_times
        self.metrics.latency_event.observe_many(event_latency)
        if event_latency.size:
            self.recent_event_latency.append(np.column_stack([sent.event_times, event_latency]))
        self._totals.update(ticks=batch.records, predictions=produced, dead_letters=sent.dead)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            await consumer.commit(offsets)
        except CommitFailedError:
            # The group moved on; the partitions' new owner re-reads from the
            # last commit (output is at-least-once).
            logger.warning("commit failed after a rebalance; %s will be re-read", offsets)
            return
        except KafkaError as exc:
            raise BrokerError(f"offsets not committed (they will be re-read): {exc}") from exc
        self._positions.update(offsets)
        self.metrics.commits.inc()

    async def on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Finish and commit in-flight batches before the partitions go.

        State is kept until the new assignment is known: Kafka's eager
        rebalance revokes every partition from every member, and most come
        straight back to the same instance, with nobody reading them between.
        """
        async with self._lock:
            await self._drain()
            parts = {tp.partition for tp in revoked if tp.topic == self.config.input_topic}
            self._revoked |= parts
            self.metrics.rebalances.inc(len(revoked))
            logger.info("partitions %s revoked", sorted(parts))

    async def on_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Drop the streams of partitions that were revoked and did not come back."""
        parts = {tp.partition for tp in assigned if tp.topic == self.config.input_topic}
        logger.info("partitions assigned: %s", sorted(parts))
        async with self._lock:
            # Committed positions (for lag) of partitions that stay are still right.
            kept = set(assigned)
            self._positions = {tp: o for tp, o in self._positions.items() if tp in kept}
            gone, self._revoked = sorted(self._revoked - parts), set()
            if gone and self._engine is not None:
                count = await self._engine.drop_partitions(gone)
                logger.info("partitions %s moved away: dropped %d streams' state", gone, count)

    # -- reporting ----------------------------------------------------------

    def _lag(self) -> dict[tuple[str, int], int]:
        consumer = self._consumer
        if consumer is None:
            return {}
        lag = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - self._positions.get(tp, 0))
        return lag

    def summary(self, interval_s: float, previous: collections.Counter[str]) -> dict[str, Any]:
        stats = self.engine_stats()
        latencies = np.concatenate(list(self._recent_latency)) if self._recent_latency else None
        delta = {k: self._totals[k] - previous[k] for k in ("ticks", "predictions", "dead_letters")}
        return {
            "instance": self.config.instance_id,
            "ts": int(time.time() * 1000),
            "interval_s": interval_s,
            **{k: int(v) for k, v in self._totals.items()},
            "ticks_per_s": round(delta["ticks"] / interval_s, 1),
            "latency_ms_p50": None
            if latencies is None
            else round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "latency_ms_p99": None
            if latencies is None
            else round(float(np.percentile(latencies, 99)) * 1e3, 2),
            "active_streams": stats.active_streams,
            "evictions": stats.evictions,
            "lag": {str(p): v for (_, p), v in self._lag().items()},
        }

    async def _summaries(self) -> None:
        interval = self.config.metrics_interval_s
        previous: collections.Counter[str] = collections.Counter()
        while True:
            await asyncio.sleep(interval)
            summary = self.summary(interval, previous)
            previous = collections.Counter(self._totals)
            logger.info(
                "%.0f ticks/s, %d predictions, %d dead letters, %d streams, p50 %s ms, p99 %s ms",
                summary["ticks_per_s"],
                summary.get("predictions", 0),
                summary.get("dead_letters", 0),
                summary["active_streams"],
                summary["latency_ms_p50"],
                summary["latency_ms_p99"],
            )
            if self.config.metrics_topic and self._producer is not None:
                try:
                    await self._producer.send(
                        self.config.metrics_topic,
                        value=json.dumps(summary).encode(),
                        key=self.config.instance_id.encode(),
                    )
                except KafkaError:
                    logger.warning("could not publish the metrics summary", exc_info=True)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, server: Server) -> None:
        self._server = server

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._server.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._server.on_assigned(assigned)

"""The serving daemon: wiring and lifecycle.

``Server`` starts the engine, checks the topics, starts the producer and
joins the consumer group, then runs the poll loop (``loop.py``) until asked
to stop. Its parts: the per-poll codec (``codec.py``), the committer that
commits input offsets only after the output is acknowledged
(``committer.py``), rebalance handling (``rebalance.py``), and totals,
latency, lag and summaries (``reporting.py``). ``Server`` takes its
collaborators (engine client, Kafka client factory, clock, registry), so
tests and benches pass their own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError
from prometheus_client import CollectorRegistry

from streamlstm import Bundle, EngineStats
from streamlstm.consumers.admin.ack_reader import AckReader
from streamlstm.consumers.admin.acks import ControlAcks
from streamlstm.consumers.admin.api import AdminApi
from streamlstm.consumers.admin.controls import ControlSender, input_partition
from streamlstm.consumers.admin.token import read_token
from streamlstm.consumers.durability.checkpoint import MemoryOnly
from streamlstm.consumers.durability.committer import Committer
from streamlstm.consumers.durability.modes import Durability
from streamlstm.consumers.durability.rebalance import RebalanceHandler
from streamlstm.consumers.durability.tasks import PartitionTasks
from streamlstm.consumers.engine.process import (
    EngineClient,
    EngineFactory,
    default_engine,
)
from streamlstm.consumers.kafka import internals as aiokafka_internals
from streamlstm.consumers.kafka.clients import (
    KafkaClients,
    committed_offset,
    partitions_of,
    publish,
    start_client,
    stop_client,
)
from streamlstm.consumers.kafka.groups import partition_owners
from streamlstm.consumers.kafka.outbox import Box
from streamlstm.consumers.kafka.rescue import PER_RECORD_ERRORS, Rescuer
from streamlstm.consumers.loop import Model, PollLoop, settle_collector
from streamlstm.consumers.models.reload import Reloader, ReloadOutcome
from streamlstm.consumers.models.source import ModelSource, Resolved, check_shadow
from streamlstm.consumers.observability.http import HttpEndpoints, HttpLimits, HttpService
from streamlstm.consumers.observability.metrics import EngineStatsCollector, ServeMetrics
from streamlstm.consumers.observability.quality import QualityCollector
from streamlstm.consumers.observability.reporting import Reporter
from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import BrokerError
from streamlstm.kernels import step_name
from streamlstm.quality import QualityReport

__all__ = ["Server"]

logger = logging.getLogger(__name__)


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
        engine: EngineFactory = default_engine,
        kafka: KafkaClients | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = ServeMetrics(self.registry)
        self._bundle = bundle
        self._engine_factory = engine
        self._kafka = kafka or KafkaClients.for_config(config)
        self._clock = clock
        self.reporter = Reporter(self.metrics, instance_id=config.instance_id, clock=clock)
        self._engine: EngineClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._http: HttpEndpoints | None = None
        self._admin: HttpService | None = None
        self._acks = ControlAcks()
        self._tasks: PartitionTasks | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._loop: PollLoop | None = None
        self._rebalance: RebalanceHandler | None = None
        self._durable: Durability | None = None
        self._committer = Committer(
            MemoryOnly(self._commit, self.reporter.committed),
            max_unacked=1,
            interval_s=config.commit_interval_ms / 1000.0,
            on_acked=self.reporter.acknowledged,
        )  # replaced at start, once the engine is known
        self._failure: BaseException | None = None
        self._partitions: dict[str, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._summary_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        #: Model reloads (SIGHUP, the admin API, --model-watch-s); set by start().
        self._reloader: Reloader | None = None
        #: The shadow model (--shadow-model) as resolved at start; None: none.
        self._shadow: Resolved | None = None
        self._recurrent_step = ""
        self._started = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------

    @property
    def metrics_port(self) -> int:
        return self._http.port if self._http else self.config.metrics_port

    @property
    def admin_port(self) -> int | None:
        """The admin API's port (None: off)."""
        return self._admin.port if self._admin else self.config.admin_port

    @property
    def totals(self) -> dict[str, int]:
        return dict(self.reporter.totals)

    @property
    def recent_event_latency(self) -> collections.deque[Any]:
        """Per acknowledged poll, ``[n, 2]``: each tick's event time and its latency (seconds)."""
        return self.reporter.recent_event_latency

    @property
    def bundle(self) -> Bundle:
        """The bundle served now (its bundle.json: the engine holds the weights)."""
        if self._reloader is not None:
            return self._reloader.serving.bundle
        assert self._bundle is not None, "the bundle is loaded by start()"
        return self._bundle

    def request_reload(self) -> asyncio.Future[ReloadOutcome] | None:
        """Reload ``--model`` at the next checkpoint boundary (SIGHUP calls this); None
        before the daemon serves."""
        return self._reloader.request() if self._reloader is not None else None

    def ready(self) -> bool:
        """Engine up and the group joined (``/readyz``).

        An instance given no partitions is ready too: with more replicas
        than partitions, a rollout must not wait on the idle ones.
        """
        return (
            self._engine is not None
            and self._engine.stats is not None
            and self._rebalance is not None
            and self._rebalance.joined
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
        """The loop has not failed, no step outlived ``--step-timeout-s``, and the engine
        process is alive (``/healthz``).

        Called by the HTTP handler on the event loop, so it only reads flags: it must
        answer at once while the engine is stopped, wedged or being killed.
        """
        task, engine = self._task, self._engine
        # A cancelled task (a shutdown that timed out) has no exception() to ask for: it raises.
        loop_ok = task is not None and not (task.done() and (task.cancelled() or task.exception()))
        wedged = self._loop is not None and self._loop.wedged
        return loop_ok and not wedged and self._failure is None and bool(engine and engine.alive)

    @property
    def _engine_pid(self) -> int:
        return (self._engine.pid if self._engine is not None else None) or 0

    def engine_stats(self) -> EngineStats:
        """The engine's figures as of its last reply (the collector reads them at scrape time)."""
        assert self._engine is not None and self._engine.stats is not None
        return self._engine.stats

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.config
        token = read_token(cfg.admin_token_file) if cfg.admin_port is not None else None
        bundle, engine = await self._start_model()
        producing = cfg.producer_settings()
        durable = self._durable = Durability(
            cfg,
            clients=self._kafka,
            engine=engine,
            metrics=self.metrics,
            clock=self._clock,
            producer_settings=producing,
        )
        self._committer = Committer(
            durable.strategy(self._commit, self.reporter.committed),
            max_unacked=cfg.max_unacked_batches,
            interval_s=cfg.commit_interval_ms / 1000.0,
            on_acked=self.reporter.acknowledged,
            # In a transaction a refused record fails it whole: nothing to rescue.
            rescue=None if durable.exactly_once else self._rescue_records,
            per_record=PER_RECORD_ERRORS,
        )
        # Before the consumer joins: a rebalance waits on the committer.
        self._committer.start()
        self._producer = await self._start_producer(producing)
        await durable.prepare(self._producer, self._partitions)
        # Sticky: membership changes move few partitions (and so few streams' state).
        self._consumer = self._kafka.consumer(
            **cfg.consumer_settings(), partition_assignment_strategy=(StickyPartitionAssignor,)
        )
        self.reporter.watch(self._consumer)
        tasks = self._tasks = durable.partition_tasks(self._committed)
        self._loop = self._poll_loop(
            bundle, self._consumer, durable.outboxes(self._producer, self._partitions), tasks
        )
        self._rebalance = RebalanceHandler(
            lock=self._lock,
            drain=self._loop.drain,
            tasks=tasks,
            reporter=self.reporter,
            on_error=self._fail,
        )
        self._consumer.subscribe([cfg.input_topic], listener=self._rebalance)
        await start_client(self._consumer, cfg.bootstrap_servers, lean=True)
        await self._start_serving(self._loop, self._producer)
        if token is not None:
            await self._start_admin(token, self._producer)
        logger.info(
            "serving %s: %s -> %s (dead letters: %s, group %s)",
            bundle.model_id,
            cfg.input_topic,
            cfg.output_topic,
            cfg.dlq_topic,
            cfg.group_id,
        )

    def _poll_loop(
        self,
        bundle: Bundle,
        consumer: AIOKafkaConsumer,
        outbox: Callable[[], Box],
        tasks: PartitionTasks,
    ) -> PollLoop:
        assert self._engine is not None and self._committer is not None
        return PollLoop(
            self.config,
            model=Model.of(bundle),
            shadow=Model.of(self._shadow.bundle) if self._shadow else None,
            consumer=consumer,
            outbox=outbox,
            engine=self._engine,
            committer=self._committer,
            tasks=tasks,
            metrics=self.metrics,
            lock=self._lock,
            clock=self._clock,
            on_controls=self._acks.applied,
            reloader=self._reloader,
        )

    async def _start_model(self) -> tuple[Bundle, EngineClient]:
        """The model ``--model`` names now (its bundle.json alone: the engine child reads the
        weights, this process never does), the shadow's, the engine serving them, and
        the reloads."""
        cfg = self.config
        source = ModelSource(cfg.model)
        serving = Resolved(self._bundle, "") if self._bundle else source.resolve()
        self._bundle = serving.bundle
        shadow = self._shadow_model(serving.bundle)
        self._engine = await self._start_engine(serving.bundle, shadow)
        self._reloader = Reloader(
            source, serving, policy=cfg.swap_state, metrics=self.metrics, on_swapped=self._describe
        )
        self._describe(serving)
        return serving.bundle, self._engine

    def _shadow_model(self, serving: Bundle) -> Resolved | None:
        """What ``--shadow-model`` names now, checked to take the served model's inputs;
        None without one, or where it is the served model (nothing to compare)."""
        if self.config.shadow_model is None:
            return None
        shadow = ModelSource(self.config.shadow_model).resolve()
        check_shadow(serving, shadow.bundle)
        if shadow.bundle.model_id == serving.model_id:
            logger.warning(
                "shadow model %s is the served model (promoted?): no shadow runs",
                serving.model_id,
            )
            return None
        self._shadow = shadow
        return shadow

    async def _start_engine(self, bundle: Bundle, shadow: Resolved | None) -> EngineClient:
        """The engine, started, and the metrics that describe it."""
        engine = self._engine_factory(bundle, self.config, shadow.bundle if shadow else None)
        started = await engine.start()
        self._recurrent_step = step_name(started.native)
        self.registry.register(EngineStatsCollector(self.engine_stats, self.reporter.lag))
        self.registry.register(QualityCollector(self._quality_reports))
        if engine.pid is not None:  # its own process
            self.metrics.watch_engine_process(self.registry, lambda: self._engine_pid)
        return engine

    def _quality_reports(self) -> dict[str, QualityReport | None]:
        """The served model's live quality, and the shadow's where one runs."""
        stats = self.engine_stats()
        reports = {"serving": stats.quality}
        if stats.shadow_model:
            reports["shadow"] = stats.shadow_quality
        return reports

    def _describe(self, serving: Resolved) -> None:
        """``streamlstm_model_info``: the model served (again after each swap)."""
        bundle = serving.bundle
        self.metrics.model_info.info(
            {
                "model": bundle.model_id,
                "version": serving.version,
                "inputs": str(bundle.config.input_size),
                "outputs": str(bundle.config.output_size),
                "recurrent_step": self._recurrent_step,
            }
        )

    async def _start_producer(self, producing: dict[str, Any]) -> AIOKafkaProducer:
        """The topics checked (or made), then the producer, and the partitions it sees."""
        cfg = self.config
        topics = [cfg.input_topic, cfg.output_topic, str(cfg.dlq_topic)]
        topics += [cfg.shadow_topic] if cfg.shadow_topic else []
        await self._kafka.ensure_topics(
            [*topics, *([cfg.metrics_topic] if cfg.metrics_topic else [])],
            create=cfg.create_topics,
            partitions=cfg.topic_partitions,
            replication_factor=cfg.topic_replication_factor,
        )
        # Exactly-once: this one publishes metrics only (outside any transaction).
        producer = await self._kafka.producer(**producing)
        # aiokafka's internals, checked on batches as this producer makes them (logged once).
        await aiokafka_internals.probe(producer)
        self._partitions = await partitions_of(producer, topics)
        return producer

    async def _start_serving(self, loop: PollLoop, producer: AIOKafkaProducer) -> None:
        """The HTTP endpoints, the poll loop's task and the summaries'."""
        cfg = self.config
        self._http = HttpEndpoints(
            self.registry,
            ready=self.ready,
            healthy=self.healthy,
            host=cfg.metrics_host,
            port=cfg.metrics_port,
        )
        await self._http.start()
        settle_collector()
        self._task = asyncio.create_task(loop.run(self._stopping), name="streamlstm-serve")
        self._summary_task = asyncio.create_task(
            self.reporter.run_summaries(
                cfg.metrics_interval_s,
                self.engine_stats,
                partial(publish, producer, cfg.metrics_topic) if cfg.metrics_topic else None,
            ),
            name="streamlstm-summary",
        )
        if cfg.model_watch_s is not None and self._reloader is not None:
            self._watch_task = asyncio.create_task(
                self._reloader.watch(cfg.model_watch_s), name="streamlstm-model-watch"
            )

    async def _start_admin(self, token: bytes, producer: AIOKafkaProducer) -> None:
        """The stream admin API on its own port (docs/admin-api.md)."""
        cfg = self.config
        assert self._engine is not None
        controls = ControlSender(
            producer=producer,
            input_topic=cfg.input_topic,
            acks=self._acks,
            held=self.assignment,
            reader=partial(AckReader.start, self._kafka.options, cfg.output_topic, producer),
        )
        api = AdminApi(
            token=token,
            engine=self._engine,
            controls=controls,
            locate=self._locate,
            partitions=self._held_partitions,
            wait_s=cfg.admin_wait_s,
            reloader=self._reloader,
        )
        # A reset may wait --admin-wait-s (and a reader's start) within its request.
        limits = HttpLimits(request_timeout_s=max(60.0, cfg.admin_wait_s + 30.0))
        self._admin = HttpService(
            api.app(), host=cfg.admin_host, port=cfg.admin_port or 0, limits=limits, name="admin"
        )
        await self._admin.start()
        logger.info("admin API on http://%s:%d/v1/", cfg.admin_host, self._admin.port)

    async def _locate(self, stream: str, key: bytes) -> dict[str, Any]:
        """Where a stream not held here lives: its partition and, if known, that
        partition's owner in the group."""
        cfg = self.config
        assert self._producer is not None
        partition = await input_partition(self._producer, cfg.input_topic, key)
        owners = await partition_owners(self._kafka.options, cfg.group_id, cfg.input_topic)
        owner = owners.get(partition)
        return {"partition": partition, "owner": owner.to_json() if owner else None}

    def _held_partitions(self) -> list[dict[str, Any]]:
        """Each input partition held here: its task's state, offset reached and lag."""
        lag = self.reporter.lag()
        return [
            {
                "partition": task.partition,
                "state": task.state.value,
                "applied": task.applied,
                "lag": lag.get((self.config.input_topic, task.partition)),
            }
            for task in sorted(self._tasks or (), key=lambda t: t.partition)
        ]

    async def _rescue_records(self, records: list[Any], error: BaseException) -> None:
        assert self._producer is not None
        dlq = str(self.config.dlq_topic)
        rescuer = Rescuer(
            self._producer, partitions=self._partitions, dlq_topic=dlq, metrics=self.metrics
        )
        await rescuer(records, error)

    async def _committed(self, tp: Any) -> int | None:
        assert self._consumer is not None
        return await committed_offset(self._consumer, tp)

    def _fail(self, exc: BaseException) -> None:
        """Mark the daemon failed (from a callback that cannot raise into the loop)."""
        self._failure = self._failure or exc
        self._stopping.set()

    def kill_engine(self) -> None:
        """Kill the engine child at once (an exit that skips ``stop``)."""
        if self._engine is not None:
            self._engine.kill()

    def request_stop(self) -> None:
        """Ask the loop to finish its batch and stop (signal handlers call this)."""
        self._stopping.set()

    async def wait(self) -> None:
        """Until the loop ends; re-raises the loop's error, if any."""
        if self._task is not None:
            await self._task
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._admin is not None:  # no new control or read while the rest winds down
            await self._admin.stop()
        if self._task is not None and self._task.done() and self._loop is not None:
            self._loop.abandon()  # it failed: nothing more is sent or committed but the acked
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.config.shutdown_timeout_s)
            except TimeoutError:
                logger.error("shutdown timed out after %.0f s", self.config.shutdown_timeout_s)
                self._task.cancel()
            except Exception:  # already logged by the loop; stop the rest anyway
                pass
        for task in (self._summary_task, self._watch_task):
            if task is not None:
                task.cancel()
        # The consumer leaves the group (its revoke drains through the committer), then
        # the committer commits what is acknowledged; the producer flushes last.
        if self._consumer is not None:
            await stop_client(self._consumer)
        await self._committer.stop()
        if self._durable is not None:
            await self._durable.close()
        if self._producer is not None:
            await stop_client(self._producer)
        if self._engine is not None:
            # Asked to exit, then killed: a wedged child gets the same grace (it may be slow
            # rather than stopped), polled without blocking the loop meanwhile.
            await self._engine.close()
        # Last: until the process exits, /healthz answers (503 once anything failed) rather
        # than refusing connections, which a probe cannot tell from a hung daemon.
        if self._http is not None:
            await self._http.stop()
        logger.info("stopped after %d ticks", self.reporter.totals["ticks"])

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

    # -- callbacks ---------------------------------------------------------

    async def _commit(self, offsets: dict[Any, int]) -> bool:
        consumer = self._consumer
        assert consumer is not None
        try:
            await consumer.commit(offsets)
        except CommitFailedError:
            # The group moved on; the partitions' new owner re-reads from the
            # last commit (output is at-least-once).
            logger.warning("commit failed after a rebalance; %s will be re-read", offsets)
            return False
        except KafkaError as exc:
            raise BrokerError(f"offsets not committed (they will be re-read): {exc}") from exc
        return True

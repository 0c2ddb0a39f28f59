"""The poll loop: poll, decode, step in the engine, encode and send, hand to the committer.

One poll, in order:

1. ``getmany`` up to ``max_records`` records (with ``--latency-target-ms``, as many
   as ``batch_sizing.BatchSizer`` chose); the codec decodes and
   validates the whole poll; bad records are set aside for the dead-letter
   topic.
2. Submit the batch to the engine, which steps in a child process (see
   ``engine.process`` for why not a thread). The event loop stays free for
   heartbeats and fetches, and decodes the next poll meanwhile.
3. When the step is done: the codec encodes one prediction per answered
   tick and one dead letter per refused record into an ``Outbox``, which
   sends them; the poll goes to the committer, and the loop goes on (at most
   ``max_unacked_batches`` polls wait at once).

The loop and the rebalance listener share one lock: a rebalance drains
(sends and commits) between two polls, never in the middle of one.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer

from streamlstm import Bundle, StepResult
from streamlstm.consumers.batch_sizing import BatchSizer
from streamlstm.consumers.codec.poll import Batch, decode_poll, encode_outputs, encode_shadow
from streamlstm.consumers.durability.committer import Committer, Sent
from streamlstm.consumers.durability.tasks import PartitionTasks
from streamlstm.consumers.engine.process import EngineClient, StepRequest
from streamlstm.consumers.engine.protocol import Change
from streamlstm.consumers.kafka.outbox import Box
from streamlstm.consumers.models.reload import Reloader
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.consumers.settings import ServeConfig
from streamlstm.control import Control
from streamlstm.errors import StreamLSTMError

__all__ = ["Model", "PollLoop", "settle_collector"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Container objects allocated (net of those freed) between two young-generation collections.
GC_YOUNG_THRESHOLD = 20_000
#: Event-loop turns after a poll's output is queued with the producer: aiokafka's sender
#: takes three to write the produce request (the accumulator's waiter wakes its
#: ``asyncio.wait``, that wakes the sender task, whose produce-request task writes it;
#: 0.14.0, checked by a broker test). Without them the request waited for the loop's next
#: idle moment, after the next poll's decoding: 0.9-1.4 ms (median) of each poll's wait
#: for its acknowledgement at 60k ticks/s on two cores, 0.1 ms with them (docs/benchmarks.md).
PRODUCE_HOPS = 3


async def _turns(count: int) -> None:
    """Let the event loop run its ready callbacks ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)


def settle_collector() -> None:
    """Once the daemon has started: the garbage collector as the poll loop wants it.

    Everything loaded so far (torch, the model, the clients) lives as long as
    the process; frozen, it is left out of the collector's full passes, which
    would pause the loop for ~100 ms every few seconds. And a poll keeps
    thousands of records and output tuples alive until it is acknowledged:
    at Python's default (a young collection every 700 allocations) the
    collector kept walking and promoting them, about 0.4 µs of CPU a tick at
    10k ticks/s; at 20,000 it runs a few times a second. Nearly all of it is
    freed by reference counting anyway (nothing the loop makes holds a cycle).
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


@dataclass(frozen=True)
class Model:
    """What the loop needs to know of the served model."""

    model_id: str
    input_size: int
    has_score: bool

    @classmethod
    def of(cls, bundle: Bundle) -> Model:
        return cls(
            model_id=bundle.model_id,
            input_size=bundle.config.input_size,
            has_score=bundle.outputs.score_span is not None,
        )


class _Stepped(NamedTuple):
    result: StepResult | None  # None: no ticks
    seconds: float
    applied: tuple[bool, ...]  # which of the batch's controls the engine applied
    shadow: StepResult | None = None  # the shadow model's answers, where one runs


@dataclass
class _InFlight:
    batch: Batch
    step: asyncio.Future[_Stepped]


class PollLoop:
    """``await run(stopping)`` until ``stopping`` is set; ``drain`` from the rebalance listener."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        model: Model,
        consumer: AIOKafkaConsumer,
        outbox: Callable[[], Box],
        engine: EngineClient,
        committer: Committer,
        tasks: PartitionTasks,
        metrics: ServeMetrics,
        lock: asyncio.Lock,
        clock: Callable[[], float],
        on_controls: Callable[[Sequence[Control]], None] | None = None,
        reloader: Reloader | None = None,
        shadow: Model | None = None,
    ) -> None:
        self.config = config
        #: The shadow model (--shadow-model) while it runs: its answers go to shadow_topic.
        self._shadow = shadow
        #: Model reloads asked for (SIGHUP, the admin API, the watch): done between polls.
        self._reloader = reloader
        #: Told of each batch's controls once the engine took them (``ControlAcks``).
        self._on_controls = on_controls
        self._model = model
        self._consumer = consumer
        self._outbox = outbox
        self._engine = engine
        self._committer = committer
        self._metrics = metrics
        self._lock = lock
        self._clock = clock
        self._pending: collections.deque[_InFlight] = collections.deque()
        self._failed = False
        #: A step or checkpoint outlived ``step_timeout_s``: the engine is taken as wedged.
        #: Set the moment the deadline passes (``/healthz`` fails then), even where the loop
        #: is awaiting something else and only meets the timed-out step later.
        self.wedged = False
        #: Each partition's task hears the offset after the last tick sent to the engine.
        self._tasks = tasks
        #: --latency-target-ms: sizes each poll from the measured steps, latencies and
        #: queue. None: every poll asks for max_records.
        target = config.latency_target_ms
        self._sizer = BatchSizer(target / 1000.0, config.max_records) if target else None
        #: Polls handed to the committer, until their sends are done (the sizer's latencies).
        self._unacked: collections.deque[Sent] = collections.deque()
        self._shown_limit = config.max_records
        metrics.poll_batch_target.set(config.max_records)

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll until ``stopping`` is set, then send and commit what is in flight."""
        consumer = self._consumer
        try:
            while not stopping.is_set():
                self._committer.check()
                limit = self._poll_limit()
                records = await consumer.getmany(
                    timeout_ms=0 if self._pending else 100, max_records=limit
                )
                if self._sizer is not None:
                    self._sizer.polled(sum(map(len, records.values())), limit)
                async with self._lock:
                    batch = self._decode(records) if records else None
                    if batch is not None:
                        self._pending.append(self._begin(batch))
                    # Keep one batch stepping while the previous one is produced.
                    while len(self._pending) > (1 if batch is not None else 0):
                        await self._send(self._pending.popleft())
                    if self._committer.due():
                        await self._checkpoint()
                    if self._reloader is not None and self._reloader.wanted:
                        await self._reload(self._reloader)
            async with self._lock:
                await self.drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("serving loop failed")
            self.abandon()
            raise

    def _poll_limit(self) -> int:
        """``max_records`` for the next poll; feeds the sizer the polls acknowledged since."""
        sizer = self._sizer
        if sizer is None:
            return self.config.max_records
        unacked = self._unacked
        # In poll order: the committer acknowledges in that order too. A poll whose sends
        # failed (rescued or fatal) is done all the same, and has no latency to learn from.
        while unacked and all(f.done() for f in unacked[0].sends):
            sent = unacked.popleft()
            if sent.acknowledged() and sent.acked_at:
                sizer.acknowledged(len(sent.batch.ids), sent.acked_at - sent.batch.received)
        limit = sizer.limit
        if limit != self._shown_limit:
            self._shown_limit = limit
            self._metrics.poll_batch_target.set(limit)
        return limit

    def abandon(self) -> None:
        """After a failure: drop the batches in flight (never sent, so never committed)."""
        self._failed = True
        while self._pending:
            self._pending.popleft().step.cancel()

    async def drain(self) -> None:
        """Send every stepped batch, then wait until all are acknowledged and committed."""
        if self._failed:
            return  # what is not acknowledged stays uncommitted; it is read again
        await self._checkpoint()
        await self._committer.drain()

    async def _reload(self, reloader: Reloader) -> None:
        """A new model at a checkpoint boundary (see ``models/reload.py``): everything
        stepped so far is sent, acknowledged and committed under the old model first."""
        await self.drain()
        if self._failed:
            return
        outcome = await reloader.perform(self._engine)
        if outcome.outcome == "swapped":
            self._model = Model.of(reloader.serving.bundle)
            if self._shadow is not None and self._shadow.model_id == self._model.model_id:
                self._shadow = None  # promoted: it serves now

    async def _checkpoint(self) -> None:
        """Close the open checkpoint behind the polls it covers (see ``checkpoint.py``).

        Every stepped batch is sent first, so the checkpoint covers exactly the
        polls queued before it, and the engine's changes (asked for by the
        committer, where the checkpoint takes them) are as of the last of them:
        the engine answers in request order.
        """
        while self._pending:
            await self._send(self._pending.popleft())
        await self._committer.close(self._changes)

    async def _changes(self) -> list[Change]:
        """The states changed since the last checkpoint, and tombstones."""
        return await self._deadline(self._engine.checkpoint())

    def _decode(self, records: dict[Any, list[Any]]) -> Batch | None:
        batch = decode_poll(
            records,
            assigned=self._consumer.assignment(),
            input_size=self._model.input_size,
            max_value_bytes=self.config.max_value_bytes,
            received=self._clock(),
        )
        if batch is not None:
            self._metrics.ticks_consumed.inc(batch.count)
        return batch

    def _begin(self, batch: Batch) -> _InFlight:
        self._tasks.applied(batch.next_offsets)
        return _InFlight(batch, asyncio.ensure_future(self._step(batch)))

    async def _step(self, batch: Batch) -> _Stepped:
        gaps = batch.gap_streams()
        if not batch.ids and not gaps and not batch.controls:
            return _Stepped(None, 0.0, ())
        request = StepRequest(
            stream_ids=batch.ids,
            features=batch.features(),
            resets=batch.resets,
            ends=batch.ends,
            timestamps=batch.timestamps(),
            offsets=batch.offsets,
            partitions=batch.partitions,
            gaps=gaps,
            controls=batch.controls,
            positions={tp.partition: offset for tp, offset in batch.next_offsets.items()},
        )
        reply = await self._deadline(self._engine.step(request))
        if not batch.ids:  # refused records and controls alone: no tick answered
            return _Stepped(None, reply.seconds, reply.controls_applied)
        return _Stepped(reply.result, reply.seconds, reply.controls_applied, reply.shadow)

    async def _deadline(self, step: Awaitable[_T]) -> _T:
        timeout = self.config.step_timeout_s
        try:
            return await asyncio.wait_for(step, timeout)
        except TimeoutError:
            self.wedged = True
            raise StreamLSTMError(
                f"the engine did not answer a step within --step-timeout-s {timeout:g} s; "
                "it is taken as wedged and the daemon stops (uncommitted ticks are read again)"
            ) from None

    async def _send(self, inflight: _InFlight) -> None:
        cfg = self.config
        batch = inflight.batch
        result, seconds, applied, shadow = await inflight.step
        for control, done in zip(batch.controls, applied, strict=True):
            self._metrics.controls.labels(control.op, "applied" if done else "skipped").inc()
        if batch.controls and self._on_controls is not None:
            self._on_controls(batch.controls)
        if result is not None:
            if result.skipped.size:
                self._metrics.skipped.inc(int(result.skipped.sum()))
            self._metrics.batch_size.observe(len(batch.ids))
            self._metrics.step_seconds.observe(seconds)
            if self._sizer is not None:
                self._sizer.stepped(len(batch.ids), seconds)
        outbox = self._outbox()
        encoded = encode_outputs(
            batch,
            result,
            outbox.add,
            output_topic=cfg.output_topic,
            dlq_topic=str(cfg.dlq_topic),
            model_id=self._model.model_id,
            has_score=self._model.has_score,
            dlq_max_record_bytes=cfg.dlq_max_record_bytes,
            many=outbox.add_many,
            controls_applied=applied,
        )
        for letter in encoded.dead:
            self._metrics.dead_letters.labels(letter.field).inc()
        if shadow is not None and self._shadow is not None:
            self._metrics.shadow_predictions.inc(
                encode_shadow(
                    batch,
                    shadow,
                    outbox.add_many,
                    topic=str(cfg.shadow_topic),
                    model_id=self._shadow.model_id,
                    has_score=self._shadow.has_score,
                )
            )
        sends = await outbox.send()
        sent = Sent(sends, batch, encoded, clock=self._clock, batches=outbox.batches)
        await _turns(PRODUCE_HOPS)  # the produce request goes out before the next poll
        await self._committer.submit(sent)
        if self._sizer is not None:
            self._unacked.append(sent)

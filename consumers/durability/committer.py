"""The committer: acknowledgement first, then the commit of input offsets, in poll order.

The serving loop queues each poll's output with ``submit`` and goes on to the
next poll; the committer, in order, waits until every send of a poll is
acknowledged by the broker and then gives the poll's offsets to the oldest
uncommitted ``Checkpoint`` (``checkpoint.py``). The loop closes the open
checkpoint once its deadline passes (``due``, ``close``): it is queued here
behind the polls it covers and committed, as its strategy says, once they
are acknowledged. A tick is done only then, so a crash anywhere before
re-reads it: output is at-least-once, nothing is lost.

- A failed send stops the commits: the committer fails, ``submit`` and
  ``drain`` raise its error (the daemon fails and exits non-zero), and the
  offsets of that poll and every later one stay uncommitted. With memory
  state the polls acknowledged before the failure are still committed.
- ``stop`` commits the polls already acknowledged where the strategy can
  without their changes (memory state; with durable state only a closed
  checkpoint commits) and leaves the rest.
- One commit an interval, at most: each is a request the daemon and the
  broker pay for; one a poll at ~100 polls/s cost both CPU that the ticks
  needed. At-least-once holds all the same: a crash re-reads (and answers
  again) the ticks since the last commit, now up to an interval of them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamlstm.consumers.codec.poll import Batch, Encoded
from streamlstm.consumers.durability.checkpoint import Checkpoint, Strategy
from streamlstm.consumers.engine.protocol import Change
from streamlstm.errors import BrokerError

__all__ = ["Committer", "Sent"]

logger = logging.getLogger(__name__)

#: ``rescue(records, error)``: deliver a refused batch's records another way, or raise.
RescueFn = Callable[[list[Any], BaseException], Awaitable[None]]


@dataclass(eq=False)
class Sent:
    """A poll whose output is queued for sending; acknowledged and committed later."""

    sends: list[asyncio.Future[Any]]
    batch: Batch
    encoded: Encoded
    clock: Callable[[], float] = time.time
    #: Each send's records, for a batch the broker refuses for one record's sake.
    batches: list[tuple[asyncio.Future[Any], list[Any]]] = field(default_factory=list)
    acked_at: float = field(default=0.0, init=False)  # when the last send was acknowledged
    reported: bool = field(default=False, init=False)  # on_acked has seen it

    def __post_init__(self) -> None:
        # Stamped as each ack arrives, not when the committer gets to the poll
        # (it may be waiting on an earlier commit): latency ends at the ack.
        for future in self.sends:
            future.add_done_callback(self._stamp)

    def _stamp(self, _: asyncio.Future[Any]) -> None:
        self.acked_at = self.clock()

    @property
    def offsets(self) -> dict[Any, int]:
        return self.batch.next_offsets

    def acknowledged(self) -> bool:
        """Every send is done and none failed (does not wait)."""
        return all(f.done() and not f.cancelled() and f.exception() is None for f in self.sends)


class Committer:
    """``start()``, then ``await submit(sent)`` per poll; ``await drain()``; ``await stop()``."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_unacked: int,
        interval_s: float,
        on_acked: Callable[[Sent], None] = lambda sent: None,
        rescue: RescueFn | None = None,
        per_record: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._strategy = strategy
        self._interval_s = interval_s
        self._clock = clock
        self._on_acked_hook = on_acked
        self._rescue = rescue
        self._per_record = per_record
        self._queue: asyncio.Queue[Sent | Checkpoint] = asyncio.Queue(max_unacked)
        self._group: list[Sent | Checkpoint] = []  # taken from the queue, not yet committed
        self._task: asyncio.Task[None] | None = None
        first = Checkpoint(strategy, strategy.first_due(clock(), interval_s))
        #: Oldest first: the one acknowledged polls go to, then those closed behind it;
        #: the last is the open one, whose deadline is the one timer.
        self._checkpoints: collections.deque[Checkpoint] = collections.deque([first])

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="streamlstm-commit")

    @property
    def failed(self) -> bool:
        task = self._task
        return task is not None and task.done()

    def check(self) -> None:
        """Raise the committer's error if it has stopped."""
        task = self._task
        if task is None or not task.done():
            return
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        raise BrokerError("the committer stopped")

    def due(self) -> bool:
        """The open checkpoint's deadline has passed: the loop ``close``s it now."""
        return self._checkpoints[-1].is_due(self._clock())

    async def close(self, changes: Callable[[], Awaitable[list[Change]]]) -> None:
        """Close the open checkpoint behind the polls submitted so far (its strategy takes
        the engine's ``changes`` as of the last of them where it needs them), and open the
        next; waits for its commit where the strategy says so."""
        closing = self._checkpoints[-1]
        await closing.take(changes)
        opened = Checkpoint(self._strategy, math.inf)  # started once this one is queued
        self._checkpoints.append(opened)
        await self.submit(closing)
        if self._strategy.waits_for_commit:
            # Until it commits: a later poll's output must not join it.
            await self.drain()
        opened.due = self._clock() + self._interval_s

    async def submit(self, sent: Sent | Checkpoint) -> None:
        """Queue a poll (or a checkpoint after the polls it covers); waits while
        ``max_unacked`` items wait. Raises if the committer failed."""
        self.check()
        if self._queue.full():
            await self._race(self._queue.put(sent))
        else:
            self._queue.put_nowait(sent)

    async def drain(self) -> None:
        """Until every poll submitted so far is acknowledged and committed."""
        await self._race(self._queue.join())

    async def stop(self) -> None:
        """Commit the polls already acknowledged, in order; drop the rest. Safe twice."""
        task, self._task = self._task, None
        if task is None:
            return
        pending = list(self._group)
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
            self._queue.task_done()
        self._group = []
        failed = task.done() and not task.cancelled() and task.exception() is not None
        task.cancel()
        if failed:
            return  # the failed poll and everything after it stay uncommitted
        checkpoint = self._checkpoints[0]
        for sent in pending:
            if isinstance(sent, Checkpoint):
                continue  # never committed: its polls' offsets go with the unclosed one
            if not sent.acknowledged():
                break
            self._on_acked(sent)
            checkpoint.acknowledge(sent.offsets)
        try:
            await checkpoint.commit_unclosed()
        except BrokerError:
            logger.warning("could not commit acknowledged offsets at stop", exc_info=True)

    def _on_acked(self, sent: Sent) -> None:
        if not sent.reported:
            sent.reported = True
            self._on_acked_hook(sent)

    async def _race(self, awaitable: Awaitable[Any]) -> None:
        """Await ``awaitable`` unless the committer stops first; then raise its error."""
        task = self._task
        if task is None:
            raise BrokerError("the committer is not running")
        waiter = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            self.check()
        waiter.result()

    async def _run(self) -> None:
        while True:
            self._group = [await self._queue.get()]
            while not self._queue.empty():
                self._group.append(self._queue.get_nowait())
            try:
                await self._commit_group(self._group)
            finally:
                for _ in self._group:
                    self._queue.task_done()
                self._group = []

    async def _commit_group(self, group: Iterable[Sent | Checkpoint]) -> None:
        for item in group:
            if isinstance(item, Checkpoint):
                await self._commit_closed(item)
                continue
            try:
                await self._acknowledged(item)
            except Exception as exc:
                # Acknowledged before the failure: committed where the strategy can.
                await self._checkpoints[0].commit_unclosed()
                if isinstance(exc, BrokerError):
                    raise
                raise BrokerError(
                    f"output not acknowledged, offsets not committed: {exc!r}"
                ) from exc
            self._on_acked(item)
            self._checkpoints[0].acknowledge(item.offsets)

    async def _acknowledged(self, sent: Sent) -> None:
        """Until every send of ``sent`` is acknowledged; a batch refused for one record's
        sake is delivered record by record (``rescue``); any other failure raises."""
        try:
            await asyncio.gather(*sent.sends)
            return
        except Exception as exc:
            if self._rescue is None or not isinstance(exc, self._per_record):
                raise
        for future, records in sent.batches:
            try:
                await future
            except self._per_record as exc:
                await self._rescue(records, exc)

    async def _commit_closed(self, checkpoint: Checkpoint) -> None:
        """A checkpoint the loop closed: every poll before it is acknowledged by now."""
        assert checkpoint is self._checkpoints[0], "checkpoints commit in order"
        await checkpoint.commit()
        self._checkpoints.popleft()

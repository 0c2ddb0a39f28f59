"""The committer: acknowledgement first, then the commit of input offsets, in poll order.

The serving loop queues each poll's output with ``submit`` and goes on to the
next poll; the committer, in order, waits until every send of a poll is
acknowledged by the broker and then commits the poll's input offsets (polls
acknowledged meanwhile share one commit). A tick is done only then, so a
crash anywhere before re-reads it: output is at-least-once, nothing is lost.

- A failed send stops the commits: the committer fails, ``submit`` and
  ``drain`` raise its error (the daemon fails and exits non-zero), and the
  offsets of that poll and every later one stay uncommitted. Polls
  acknowledged before the failure are still committed.
- ``stop`` commits the polls already acknowledged and leaves the rest.
- ``commit_every_s`` (memory state): a commit at most that often; acknowledged
  polls wait for the next one (``drain`` and ``stop`` commit them at once).
  Each commit is a request the daemon and the broker pay for; one a poll at
  ~100 polls/s cost both CPU that the ticks needed. At-least-once holds all
  the same: a crash re-reads (and answers again) the ticks since the last
  commit, now up to ``commit_every_s`` of them.

With durable state (``durable=True``) offsets are committed only at
checkpoints, in the order of docs/durability.md ("The checkpoint protocol",
whose steps 3-5 are the committer's): the loop asks the engine for the
states changed since the last checkpoint, as of the last batch k it sent
(requests are answered in order), and queues them here behind the polls up
to k. The committer then, in order:

1. waits until every output of the polls up to k is acknowledged;
2. produces the states (and tombstones) to the changelog, waits for acks;
3. commits the input offsets through poll k.

A crash before 2 completes replays the ticks after the last commit onto the
previous checkpoint (outputs again, with equal values); a crash between 2 and
3 restores states that already reflect some replayed ticks, which the engine
skips by offset (their outputs were acknowledged in 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamlstm.consumers.codec import Batch, Encoded
from streamlstm.consumers.engine_protocol import Change
from streamlstm.errors import BrokerError

__all__ = ["Checkpoint", "Committer", "Sent"]

logger = logging.getLogger(__name__)

#: ``commit(offsets)``: commit ``{TopicPartition: next offset}``; raises ``BrokerError``
#: when the daemon must stop.
CommitFn = Callable[[dict[Any, int]], Awaitable[None]]
#: ``rescue(records, error)``: deliver a refused batch's records another way, or raise.
RescueFn = Callable[[list[Any], BaseException], Awaitable[None]]
#: ``(stream, input partition, state bytes or None)``: one changelog record.
ChangelogRecord = Change  # a state, or None: a tombstone
#: ``write(records)``: queue changelog records, return their acknowledgement futures.
WriteFn = Callable[[list[ChangelogRecord]], Awaitable[list[asyncio.Future[Any]]]]


@dataclass(eq=False)
class Checkpoint:
    """The states changed up to a poll, to write before that poll's offsets are committed."""

    records: list[ChangelogRecord]
    started: float  # perf_counter when the engine was asked
    reported: bool = field(default=False, init=False)


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
        commit: CommitFn,
        *,
        max_unacked: int,
        on_acked: Callable[[Sent], None] = lambda sent: None,
        write_changelog: WriteFn | None = None,
        on_checkpoint: Callable[[Checkpoint, float], None] = lambda checkpoint, seconds: None,
        rescue: RescueFn | None = None,
        per_record: tuple[type[BaseException], ...] = (),
        commit_every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._commit = commit
        self._commit_every_s = commit_every_s
        self._clock = clock
        self._commit_due = 0.0  # clock seconds
        self._committing = asyncio.Lock()
        self._on_acked_hook = on_acked
        self._write = write_changelog
        self._on_checkpoint = on_checkpoint
        self._rescue = rescue
        self._per_record = per_record
        self._queue: asyncio.Queue[Sent | Checkpoint] = asyncio.Queue(max_unacked)
        self._group: list[Sent | Checkpoint] = []  # taken from the queue, not yet committed
        self._task: asyncio.Task[None] | None = None
        #: Acknowledged, not yet committed (durable: until the next checkpoint).
        self._offsets: dict[Any, int] = {}

    @property
    def durable(self) -> bool:
        """Offsets are committed at checkpoints only."""
        return self._write is not None

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
        if not self.durable:
            await self._commit_offsets()  # what ``commit_every_s`` held back

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
        if failed or self.durable:
            # The failed poll and everything after it stay uncommitted; with durable
            # state only a checkpoint commits (offsets past the changelog's states
            # would skip ticks from state after a restore).
            return
        offsets = dict(self._offsets)
        for sent in pending:
            if not isinstance(sent, Sent) or not sent.acknowledged():
                break
            self._on_acked(sent)
            offsets.update(sent.offsets)
        if offsets:
            try:
                await self._commit(offsets)
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
            self._group = [await self._next()]
            while not self._queue.empty():
                self._group.append(self._queue.get_nowait())
            try:
                await self._commit_group(self._group)
            finally:
                for _ in self._group:
                    self._queue.task_done()
                self._group = []

    async def _next(self) -> Sent | Checkpoint:
        """The next queued item; offsets held back are committed when they come due first."""
        if not self._offsets or self.durable:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(
                self._queue.get(), max(self._commit_due - self._clock(), 0.0)
            )
        except TimeoutError:
            await self._commit_offsets()
            return await self._queue.get()

    async def _commit_group(self, group: Iterable[Sent | Checkpoint]) -> None:
        for item in group:
            if isinstance(item, Checkpoint):
                await self._checkpoint(item)
                continue
            if not self.durable and self._offsets and self._clock() >= self._commit_due:
                await self._commit_offsets()  # due: not held back behind this poll's acks
            try:
                await self._acknowledged(item)
            except Exception as exc:
                if self._offsets and not self.durable:  # acknowledged before the failure
                    await self._commit_offsets()
                if isinstance(exc, BrokerError):
                    raise
                raise BrokerError(
                    f"output not acknowledged, offsets not committed: {exc!r}"
                ) from exc
            self._on_acked(item)
            self._offsets.update(item.offsets)
        if not self.durable and self._clock() >= self._commit_due:
            await self._commit_offsets()

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

    async def _checkpoint(self, checkpoint: Checkpoint) -> None:
        """Steps 2 and 3 above (step 1 is the order of the queue)."""
        assert self._write is not None
        if checkpoint.records:
            try:
                await asyncio.gather(*await self._write(checkpoint.records))
            except Exception as exc:
                raise BrokerError(
                    f"changelog not acknowledged, offsets not committed: {exc!r}"
                ) from exc
        await self._commit_offsets()
        self._on_checkpoint(checkpoint, time.perf_counter() - checkpoint.started)

    async def _commit_offsets(self) -> None:
        # Held while committing: ``drain`` must not return while a commit is on its way.
        async with self._committing:
            if self._offsets:
                offsets, self._offsets = self._offsets, {}
                self._commit_due = self._clock() + self._commit_every_s
                await self._commit(offsets)

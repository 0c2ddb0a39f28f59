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

This is where the checkpoint of durable state will go, between the
acknowledgement and the commit (see ../shared/design.md, "Durable state").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamlstm.consumers.codec import Batch, Encoded
from streamlstm.errors import BrokerError

__all__ = ["Committer", "Sent"]

logger = logging.getLogger(__name__)

#: ``commit(offsets)``: commit ``{TopicPartition: next offset}``; raises ``BrokerError``
#: when the daemon must stop.
CommitFn = Callable[[dict[Any, int]], Awaitable[None]]


@dataclass(eq=False)
class Sent:
    """A poll whose output is queued for sending; acknowledged and committed later."""

    sends: list[asyncio.Future[Any]]
    batch: Batch
    encoded: Encoded
    clock: Callable[[], float] = time.time
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
    ) -> None:
        self._commit = commit
        self._on_acked_hook = on_acked
        self._queue: asyncio.Queue[Sent] = asyncio.Queue(max_unacked)
        self._group: list[Sent] = []  # taken from the queue, not yet committed
        self._task: asyncio.Task[None] | None = None

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

    async def submit(self, sent: Sent) -> None:
        """Queue a poll; waits while ``max_unacked`` polls wait. Raises if the committer failed."""
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
        offsets: dict[Any, int] = {}
        for sent in pending:
            if not sent.acknowledged():
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
            self._group = [await self._queue.get()]
            while not self._queue.empty():
                self._group.append(self._queue.get_nowait())
            try:
                await self._commit_group(self._group)
            finally:
                for _ in self._group:
                    self._queue.task_done()
                self._group = []

    async def _commit_group(self, group: Iterable[Sent]) -> None:
        offsets: dict[Any, int] = {}
        for sent in group:
            try:
                await asyncio.gather(*sent.sends)
            except Exception as exc:
                if offsets:  # what was acknowledged before the failure is done
                    await self._commit(offsets)
                raise BrokerError(
                    f"output not acknowledged, offsets not committed: {exc!r}"
                ) from exc
            self._on_acked(sent)
            offsets.update(sent.offsets)
        await self._commit(offsets)

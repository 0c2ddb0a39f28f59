"""One commit interval: its deadline, the polls acknowledged in it, the engine's changes.

A ``Checkpoint`` is opened per ``--commit-interval-ms`` (one timer, whatever
the state mode) and gathers the input offsets of the polls the committer
acknowledges in it. In every mode the poll loop closes it once its deadline
passes, behind the last poll queued before it, and the committer commits it
once those polls are acknowledged. What closing takes and what committing
does is its ``Strategy``'s:

- ``MemoryOnly`` (``--state memory``): closing asks nothing of the engine;
  committing commits the acknowledged offsets. At a stop or after a failed
  send, the offsets acknowledged since the last close are committed too
  (``commit_unclosed``): they need no state to be right.
- ``AtLeastOnce`` (``--state durable``): closing takes the engine's change
  set, as of the last poll queued before it; the committer then, in the
  order of docs/durability.md ("The checkpoint protocol", steps 3-5), waits
  for the polls' acknowledgements, writes the changes to the changelog and
  waits for theirs, and only then commits the offsets. Offsets acknowledged
  after the last close are never committed alone: past the changelog's
  states, they would skip ticks after a restore.
- ``ExactlyOnce``: the same order, the changes and offsets going into each
  input partition's transaction, which commits; the loop waits for that
  commit before it sends more, so no later poll's output joins it.

A crash before the changelog is acknowledged replays the ticks after the last
commit onto the previous checkpoint; a crash between the changelog and the
commit restores states that already reflect some replayed ticks, which the
engine skips by offset. Either way each tick is in each state exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from streamlstm.consumers.engine.protocol import Change
from streamlstm.errors import BrokerError

__all__ = [
    "AtLeastOnce",
    "Checkpoint",
    "CommitFn",
    "ExactlyOnce",
    "MemoryOnly",
    "Strategy",
    "WriteFn",
]

#: ``commit(offsets)``: commit ``{TopicPartition: next offset}``; True once committed,
#: False where the group moved on (a rebalance: the partitions' new owner reads them
#: again); raises ``BrokerError`` when the daemon must stop.
CommitFn = Callable[[dict[Any, int]], Awaitable[bool]]
#: ``on_committed(offsets)``: offsets are committed, however the strategy committed them
#: (the one place the reporter hears of commits).
CommittedHook = Callable[[dict[Any, int]], None]
#: ``write(records)``: queue changelog records, return their acknowledgement futures.
WriteFn = Callable[[list[Change]], Awaitable[list[asyncio.Future[Any]]]]
#: ``on_checkpoint(checkpoint, seconds)``: a durable checkpoint is committed (awaited
#: before the next checkpoint commits: local checkpoints are written there, in order).
CheckpointHook = Callable[["Checkpoint", float], Awaitable[None]]


class Strategy(Protocol):
    """What a checkpoint's close and commit are, per state mode and guarantee."""

    #: The loop waits for each checkpoint's commit before it sends more output.
    waits_for_commit: bool

    def first_due(self, now: float, interval_s: float) -> float:
        """The first checkpoint's deadline."""
        ...

    async def take(
        self, checkpoint: Checkpoint, changes: Callable[[], Awaitable[list[Change]]]
    ) -> None:
        """Closing ``checkpoint``: take what it needs from the engine (``changes``)."""
        ...

    async def commit(self, checkpoint: Checkpoint) -> None:
        """Make a closed ``checkpoint`` durable; its polls are all acknowledged by now."""
        ...

    async def commit_unclosed(self, checkpoint: Checkpoint) -> None:
        """At a stop or after a failed send: the acknowledged offsets of a checkpoint
        the loop never closed, committed where that is sound without its changes."""
        ...


class Checkpoint:
    """One interval's acknowledged offsets, and (durable state) the engine's changes."""

    def __init__(self, strategy: Strategy, due: float) -> None:
        self.strategy = strategy
        #: When it is to close (the committer's clock); ``math.inf`` until its opener
        #: starts the interval.
        self.due = due
        #: Per TopicPartition: the offset after the last acknowledged poll.
        self.offsets: dict[Any, int] = {}
        #: The engine's changed states and tombstones, once the loop has taken them.
        self.changes: list[Change] | None = None
        #: perf_counter when the engine was asked (the checkpoint's duration starts).
        self.started = 0.0

    def acknowledge(self, offsets: Mapping[Any, int]) -> None:
        """A poll's output is acknowledged: its offsets may go with this checkpoint."""
        self.offsets.update(offsets)

    def is_due(self, now: float) -> bool:
        return now >= self.due

    async def take(self, changes: Callable[[], Awaitable[list[Change]]]) -> None:
        """The loop closes it: the strategy takes what it needs (see ``Strategy.take``)."""
        self.started = time.perf_counter()
        await self.strategy.take(self, changes)

    async def commit(self) -> None:
        await self.strategy.commit(self)

    async def commit_unclosed(self) -> None:
        await self.strategy.commit_unclosed(self)


class _Offsets:
    """What every strategy does last: commit the offsets, and say so once committed."""

    def __init__(self, commit: CommitFn, on_committed: CommittedHook) -> None:
        self._commit = commit
        self._on_committed = on_committed

    async def _commit_offsets(self, offsets: dict[Any, int]) -> None:
        if offsets and await self._commit(offsets):
            self._on_committed(offsets)


class MemoryOnly(_Offsets):
    """``--state memory``: acknowledged offsets committed at most once an interval."""

    waits_for_commit = False

    def __init__(
        self, commit: CommitFn, on_committed: CommittedHook = lambda offsets: None
    ) -> None:
        super().__init__(commit, on_committed)

    def first_due(self, now: float, interval_s: float) -> float:
        # "At most once an interval": nothing was committed yet, so the first is due.
        return now

    async def take(
        self, checkpoint: Checkpoint, changes: Callable[[], Awaitable[list[Change]]]
    ) -> None:
        """Nothing: memory state has no changelog."""

    async def commit(self, checkpoint: Checkpoint) -> None:
        await self._commit_offsets(checkpoint.offsets)

    async def commit_unclosed(self, checkpoint: Checkpoint) -> None:
        await self._commit_offsets(checkpoint.offsets)


class AtLeastOnce(_Offsets):
    """``--state durable``: the changes to the changelog, acknowledged, then the offsets."""

    waits_for_commit = False

    def __init__(
        self,
        write: WriteFn,
        commit: CommitFn,
        on_committed: CommittedHook,
        on_checkpoint: CheckpointHook,
    ) -> None:
        super().__init__(commit, on_committed)
        self._write = write
        self._on_checkpoint = on_checkpoint

    def first_due(self, now: float, interval_s: float) -> float:
        return now + interval_s

    async def take(
        self, checkpoint: Checkpoint, changes: Callable[[], Awaitable[list[Change]]]
    ) -> None:
        checkpoint.changes = await changes()

    async def commit_unclosed(self, checkpoint: Checkpoint) -> None:
        """Nothing: offsets past the changelog's states would skip ticks after a restore;
        the next owner reads them again."""

    async def commit(self, checkpoint: Checkpoint) -> None:
        if checkpoint.changes:
            try:
                await asyncio.gather(*await self._write(checkpoint.changes))
            except Exception as exc:
                raise BrokerError(
                    f"changelog not acknowledged, offsets not committed: {exc!r}"
                ) from exc
        await self._commit_offsets(checkpoint.offsets)
        await self._on_checkpoint(checkpoint, time.perf_counter() - checkpoint.started)


class ExactlyOnce(AtLeastOnce):
    """``--guarantee exactly-once``: as ``AtLeastOnce``, but ``write`` sends the changelog
    records into each input partition's transaction, and ``commit`` commits the offsets
    by committing those transactions; closing the checkpoint waits for it, so that no
    later poll's output joins them."""

    waits_for_commit = True

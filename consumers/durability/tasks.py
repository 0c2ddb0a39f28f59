"""One task per input partition this instance holds: its lifecycle, and what its state reflects.

A ``PartitionTask`` is made when its partition is assigned and closed when
the partition moves away or comes back stale, through an explicit state
machine (a transition not in ``_LEGAL`` raises: a partition's state is never
served before its restore, nor kept after it was dropped):

- ``RESTORING``: newly held; its streams' state is read from the changelog
  (durable state) before any of its ticks is stepped;
- ``RUNNING``: its ticks are stepped; ``applied`` is the offset after the
  last one sent to the engine, which its streams' state reflects;
- ``REVOKED``: revoked, drained and checkpointed; its state is kept until
  the next assignment says whether the partition came back (Kafka's eager
  rebalance revokes every partition, and most come straight back);
- ``CLOSED``: moved away, or came back stale: its streams were dropped.

``PartitionTasks`` holds them and is what the rebalance listener drives: a
loop over tasks rather than sets of partition numbers.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition

from streamlstm.consumers.durability.transactions import PartitionTransaction
from streamlstm.errors import BrokerError, StreamLSTMError

__all__ = ["IllegalTransition", "PartitionTask", "PartitionTasks", "TaskState"]

logger = logging.getLogger(__name__)


class TaskState(enum.Enum):
    RESTORING = "restoring"
    RUNNING = "running"
    REVOKED = "revoked"
    CLOSED = "closed"


_LEGAL: dict[TaskState, frozenset[TaskState]] = {
    TaskState.RESTORING: frozenset({TaskState.RUNNING, TaskState.CLOSED}),
    TaskState.RUNNING: frozenset({TaskState.REVOKED, TaskState.CLOSED}),
    TaskState.REVOKED: frozenset({TaskState.RUNNING, TaskState.CLOSED}),
    TaskState.CLOSED: frozenset(),
}


class IllegalTransition(StreamLSTMError):
    """A partition task asked to go where its lifecycle does not lead."""


class PartitionTask:
    """One input partition: its lifecycle state and the offset its streams' state reflects."""

    def __init__(self, tp: TopicPartition, state: TaskState = TaskState.RESTORING) -> None:
        self.tp = tp
        self.state = state
        #: The offset after the last tick sent to the engine; None: none since it was held.
        self.applied: int | None = None
        #: Exactly-once: the partition's transactional producer, from its restore (which
        #: starts it, fencing the previous owner's) until the task closes (which aborts it).
        self.transaction: PartitionTransaction | None = None

    @property
    def partition(self) -> int:
        return int(self.tp.partition)

    def to(self, state: TaskState) -> None:
        if state not in _LEGAL[self.state]:
            raise IllegalTransition(
                f"partition {self.partition}: {self.state.value} -> {state.value} is not a "
                "transition of a partition task"
            )
        self.state = state

    async def close(self) -> None:
        """Closed for good: what its transaction holds is aborted (read again by the next
        owner), and its producer stopped."""
        self.to(TaskState.CLOSED)
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            await transaction.abort()

    async def stale(self, committed: Callable[[TopicPartition], Awaitable[int | None]]) -> bool:
        """Held again, but the group's committed offset is not where this state left it.

        After a session expiry, or a revoke whose commit failed, the group may
        have moved on without this instance (another member read and
        committed), or the state may reflect ticks that will be read again:
        either way keeping it would apply ticks twice or skip some.
        """
        if self.applied is None:
            return False  # no state from this partition's ticks in memory
        group = await committed(self.tp)
        if group == self.applied:
            return False
        logger.warning(
            "partition %d: the group committed %s, this instance applied up to %d; "
            "its streams' state is dropped",
            self.partition,
            group,
            self.applied,
        )
        return True


class PartitionTasks:
    """The tasks of the input partitions this instance holds."""

    def __init__(
        self,
        input_topic: str,
        *,
        drop: Callable[[list[int]], Awaitable[int]],
        committed: Callable[[TopicPartition], Awaitable[int | None]],
        restore: Callable[[list[PartitionTask]], Awaitable[None]] | None = None,
    ) -> None:
        self._topic = input_topic
        self._drop = drop
        self._committed = committed
        self._restore = restore
        self._tasks: dict[TopicPartition, PartitionTask] = {}

    def __iter__(self) -> Iterator[PartitionTask]:
        return iter(list(self._tasks.values()))

    def get(self, tp: TopicPartition) -> PartitionTask | None:
        return self._tasks.get(tp)

    def transaction(self, partition: int) -> PartitionTransaction:
        """Exactly-once: the open transaction of a partition held, for records it causes."""
        task = self._tasks.get(TopicPartition(self._topic, partition))
        if task is None or task.transaction is None:
            raise BrokerError(f"no transactional producer for input partition {partition}")
        return task.transaction

    def transactions(self) -> dict[int, PartitionTransaction]:
        """Exactly-once: every held partition's open transaction."""
        return {task.partition: task.transaction for task in self if task.transaction is not None}

    def applied(self, next_offsets: Mapping[Any, int]) -> None:
        """A batch went to the engine: each partition's state reflects it up to these."""
        tasks = self._tasks
        for tp, offset in next_offsets.items():
            task = tasks.get(tp)
            if task is None:  # stepped before its assignment was heard of: held as it is
                task = tasks[tp] = PartitionTask(tp, TaskState.RUNNING)
            task.applied = offset

    def partitions_of(self, tps: Iterable[TopicPartition]) -> list[int]:
        """The input topic's partition numbers among ``tps``, sorted."""
        return sorted(tp.partition for tp in tps if tp.topic == self._topic)

    def revoke(self, revoked: Iterable[TopicPartition]) -> list[int]:
        """Drained and checkpointed: each running task is revoked, its state kept until
        the next assignment. Returns the input partitions revoked."""
        for tp in revoked:
            task = self._tasks.get(tp)
            if task is not None and task.state is TaskState.RUNNING:
                task.to(TaskState.REVOKED)
        return self.partitions_of(revoked)

    async def assign(self, assigned: Sequence[TopicPartition]) -> None:
        """Close what moved away or came back stale, resume what came back in step,
        restore (durable state) and run what is new here."""
        mine = {tp for tp in assigned if tp.topic == self._topic}
        moved = [task for task in self if task.tp not in mine]
        stale = [task for task in self if task.tp in mine and await task.stale(self._committed)]
        await self._close(moved, stale)
        for tp in mine:
            task = self._tasks.get(tp)
            if task is None:
                self._tasks[tp] = PartitionTask(tp)
            elif task.state is TaskState.REVOKED:
                task.to(TaskState.RUNNING)
        await self._restore_new()

    async def _close(self, moved: list[PartitionTask], stale: list[PartitionTask]) -> None:
        gone = moved + stale
        for task in gone:
            del self._tasks[task.tp]
            await task.close()
        if not gone:
            return
        count = await self._drop(sorted(task.partition for task in gone))
        logger.info(
            "partitions %s moved away, %s came back stale: dropped %d streams' state",
            sorted(task.partition for task in moved),
            sorted(task.partition for task in stale),
            count,
        )

    async def _restore_new(self) -> None:
        """Durable state: what this instance does not hold comes from the changelog."""
        new = sorted(
            (task for task in self if task.state is TaskState.RESTORING),
            key=lambda task: task.partition,
        )
        if new and self._restore is not None:
            await self._restore(new)
        for task in new:
            task.to(TaskState.RUNNING)

    async def close_all(self) -> None:
        """At shutdown: every task closed (transactions aborted; the engine goes too)."""
        for task in self:
            del self._tasks[task.tp]
            await task.close()

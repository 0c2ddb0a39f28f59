"""Partition tasks: the lifecycle's legal transitions, and what an assignment does to each."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from aiokafka import TopicPartition

from streamlstm.consumers.durability.tasks import (
    IllegalTransition,
    PartitionTask,
    PartitionTasks,
    TaskState,
)
from streamlstm.consumers.durability.transactions import PartitionTransaction
from streamlstm.errors import BrokerError

TOPIC = "ticks"
R, U, V, C = TaskState.RESTORING, TaskState.RUNNING, TaskState.REVOKED, TaskState.CLOSED


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], V),  # revoked while restoring: none of its ticks was served yet
        ([], R),  # no restoring twice
        ([U], R),  # a running partition's state is not read again over itself
        ([U, V], V),
        ([C], U),  # closed is final
        ([U, V, C], R),
    ],
)
def test_illegal_transitions_raise_and_leave_the_state_as_it_was(
    path: list[TaskState], illegal: TaskState
) -> None:
    task = PartitionTask(TopicPartition(TOPIC, 0))
    for state in path:
        task.to(state)
    before = task.state
    with pytest.raises(IllegalTransition, match="partition 0"):
        task.to(illegal)
    assert task.state is before


def test_restoring_running_revoked_and_back_is_the_lifecycle() -> None:
    task = PartitionTask(TopicPartition(TOPIC, 3))
    assert task.state is R
    for state in (U, V, U, V, C):
        task.to(state)
    assert task.state is C


def test_an_assignment_restores_new_tasks_before_they_run_and_keeps_those_that_came_back() -> None:
    async def scenario() -> None:
        restored: list[list[int]] = []
        dropped: list[list[int]] = []
        states_at_restore: list[TaskState] = []

        async def drop(parts: list[int]) -> int:
            dropped.append(parts)
            return len(parts)

        async def committed(tp: TopicPartition) -> int | None:
            return 5

        async def restore(new: list[PartitionTask]) -> None:
            restored.append([task.partition for task in new])
            states_at_restore.extend(t.state for t in tasks)

        tasks = PartitionTasks(TOPIC, drop=drop, committed=committed, restore=restore)
        await tasks.assign([TopicPartition(TOPIC, p) for p in (0, 1)])
        assert restored == [[0, 1]] and states_at_restore == [R, R]
        assert [t.state for t in tasks] == [U, U]
        tasks.applied({TopicPartition(TOPIC, 0): 5, TopicPartition(TOPIC, 1): 7})
        assert tasks.revoke([TopicPartition(TOPIC, p) for p in (0, 1)]) == [0, 1]
        assert [t.state for t in tasks] == [V, V]
        # 0 comes back in step; 1 came back stale (the group says 5, its state 7); 2 is new.
        await tasks.assign([TopicPartition(TOPIC, p) for p in (0, 1, 2)])
        assert dropped == [[1]]
        assert restored[-1] == [1, 2]
        assert {t.partition: t.state for t in tasks} == {0: U, 1: U, 2: U}
        task0 = tasks.get(TopicPartition(TOPIC, 0))
        assert task0 is not None and task0.applied == 5

    asyncio.run(scenario())


class FakeTransaction:
    """Stands in for a partition's transactional producer: records its abort."""

    def __init__(self, partition: int, log: list[str]) -> None:
        self.partition = partition
        self.log = log

    async def abort(self) -> None:
        self.log.append(f"abort {self.partition}")


def test_a_task_that_moves_away_aborts_its_transaction_before_its_streams_are_dropped() -> None:
    async def scenario() -> None:
        log: list[str] = []

        async def drop(parts: list[int]) -> int:
            log.append(f"drop {parts}")
            return 0

        async def committed(tp: TopicPartition) -> int | None:
            return None

        async def restore(new: list[PartitionTask]) -> None:
            for task in new:  # exactly-once: the restore starts each task's transaction
                task.transaction = cast(PartitionTransaction, FakeTransaction(task.partition, log))

        tasks = PartitionTasks(TOPIC, drop=drop, committed=committed, restore=restore)
        await tasks.assign([TopicPartition(TOPIC, p) for p in (0, 1)])
        assert sorted(tasks.transactions()) == [0, 1]
        tasks.revoke([TopicPartition(TOPIC, p) for p in (0, 1)])
        await tasks.assign([TopicPartition(TOPIC, 0)])
        assert log == ["abort 1", "drop [1]"]
        assert sorted(tasks.transactions()) == [0]
        with pytest.raises(BrokerError, match="no transactional producer for input partition 1"):
            tasks.transaction(1)
        await tasks.close_all()
        assert log[-1] == "abort 0" and not tasks.transactions()

    asyncio.run(scenario())

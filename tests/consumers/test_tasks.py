"""Partition tasks: the lifecycle's legal transitions, and what an assignment does to each."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from streamlstm.consumers.tasks import IllegalTransition, PartitionTask, PartitionTasks, TaskState

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

        async def restore(parts: list[int]) -> None:
            restored.append(parts)
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

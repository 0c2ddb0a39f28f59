"""The rebalance handler with fakes: what it drops, what it keeps, and that errors are not lost."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamlstm.consumers.durability.rebalance import RebalanceHandler
from streamlstm.consumers.durability.tasks import PartitionTasks
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.consumers.observability.reporting import Reporter

TOPIC = "ticks"


class Fakes:
    def __init__(self, committed: dict[int, int | None]) -> None:
        self.committed = committed
        self.dropped: list[list[int]] = []
        self.drains = 0
        self.errors: list[BaseException] = []
        self.tasks = PartitionTasks(TOPIC, drop=self.drop, committed=self.read_committed)
        self.fail_drain = False

    def apply(self, applied: dict[Any, int]) -> None:
        """Ticks up to these offsets went to the engine (the loop's part)."""
        self.tasks.applied(applied)

    def applied(self) -> set[Any]:
        """The partitions whose state in memory reflects some of their ticks."""
        return {task.tp for task in self.tasks if task.applied is not None}

    async def drain(self) -> None:
        self.drains += 1
        if self.fail_drain:
            raise RuntimeError("commit failed in the drain")

    async def drop(self, partitions: list[int]) -> int:
        self.dropped.append(partitions)
        return len(partitions)

    async def read_committed(self, tp: TopicPartition) -> int | None:
        return self.committed.get(tp.partition)

    def handler(self) -> RebalanceHandler:
        return RebalanceHandler(
            lock=asyncio.Lock(),
            drain=self.drain,
            tasks=self.tasks,
            reporter=Reporter(ServeMetrics(CollectorRegistry()), instance_id="i", clock=lambda: 0),
            on_error=self.errors.append,
        )


def tps(*parts: int) -> list[TopicPartition]:
    return [TopicPartition(TOPIC, p) for p in parts]


def test_partitions_that_come_back_in_step_keep_their_state_and_moved_ones_are_dropped() -> None:
    async def scenario() -> None:
        fakes = Fakes(committed={0: 10, 1: 20, 2: 30})
        fakes.apply({tps(0)[0]: 10, tps(1)[0]: 20, tps(2)[0]: 30})
        handler = fakes.handler()
        await handler.on_partitions_revoked(tps(0, 1, 2))
        assert fakes.drains == 1
        await handler.on_partitions_assigned(tps(0, 2))
        assert fakes.dropped == [[1]]
        assert fakes.applied() == set(tps(0, 2))
        assert handler.joined and not fakes.errors

    asyncio.run(scenario())


def test_a_partition_whose_group_offset_moved_on_comes_back_without_its_state() -> None:
    async def scenario() -> None:
        # Partition 0: another member read and committed past this instance's state
        # (a session expiry). Partition 1: this instance's commit failed, so the state
        # is ahead of the group's offset and the ticks between would be applied twice.
        fakes = Fakes(committed={0: 55, 1: 17, 3: None})
        fakes.apply({tps(0)[0]: 40, tps(1)[0]: 20, tps(2)[0]: 8})
        handler = fakes.handler()
        # Partition 2: the group has no commit at all, yet this instance holds state.
        await handler.on_partitions_assigned(tps(0, 1, 2, 3))
        assert fakes.dropped == [[0, 1, 2]]
        assert not fakes.applied()
        # Nothing applied from partition 3: nothing to compare, nothing dropped.

    asyncio.run(scenario())


def test_an_error_in_the_revoke_path_fails_the_daemon_instead_of_vanishing() -> None:
    async def scenario() -> None:
        fakes = Fakes(committed={})
        fakes.fail_drain = True
        handler = fakes.handler()
        await handler.on_partitions_revoked(tps(0))  # aiokafka would swallow a raise here
        assert len(fakes.errors) == 1 and "commit failed" in str(fakes.errors[0])

    asyncio.run(scenario())


def test_an_empty_assignment_still_counts_as_joined() -> None:
    async def scenario() -> None:
        handler = Fakes(committed={}).handler()
        assert not handler.joined
        await handler.on_partitions_assigned([])
        assert handler.joined

    asyncio.run(scenario())

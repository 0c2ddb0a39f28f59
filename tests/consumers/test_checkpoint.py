"""The checkpoint strategies behind the committer, with fakes: the order of the protocol."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from streamlstm.consumers.codec.poll import Batch, Encoded
from streamlstm.consumers.durability.checkpoint import (
    AtLeastOnce,
    Checkpoint,
    ExactlyOnce,
    MemoryOnly,
)
from streamlstm.consumers.durability.committer import Committer, Sent
from streamlstm.consumers.engine.protocol import Change
from streamlstm.errors import BrokerError

TP = ("t", 0)


class Broker:
    """Fake changelog writes and offset commits, logged in the order they happen."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.changelog_acks: list[asyncio.Future[Any]] = []
        self.fail_changelog = False

    async def write(self, records: list[Change]) -> list[asyncio.Future[Any]]:
        future = asyncio.get_running_loop().create_future()
        self.log.append(("write", [r[0] for r in records]))
        if self.fail_changelog:
            future.set_exception(RuntimeError("changelog refused"))
        else:
            future.set_result(None)
        return [future]

    async def commit(self, offsets: dict[Any, int]) -> bool:
        self.log.append(("commit", dict(offsets)))
        return True

    async def checkpointed(self, checkpoint: Checkpoint, seconds: float) -> None:
        self.log.append(("checkpointed", seconds >= 0))


def _sent(offset: int) -> Sent:
    batch = Batch(received=0.0, next_offsets={TP: offset}, count=1)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return Sent([future], batch, Encoded(1, [], np.zeros(0)))


def _ack(sent: Sent) -> None:
    for future in sent.sends:
        future.set_result(None)


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def _changes(*streams: str) -> Any:
    async def take() -> list[Change]:
        return [Change(s, 0, b"state") for s in streams]

    return take


def test_durable_checkpoints_wait_for_the_output_then_the_changelog_then_commit() -> None:
    async def scenario() -> None:
        broker = Broker()
        reported: list[dict[Any, int]] = []
        strategy = AtLeastOnce(broker.write, broker.commit, reported.append, broker.checkpointed)
        now = [0.0]
        committer = Committer(strategy, max_unacked=8, interval_s=1.0, clock=lambda: now[0])
        committer.start()
        assert not committer.due()
        now[0] = 1.0
        assert committer.due()  # one deadline, from the start
        first, second = _sent(10), _sent(20)
        await committer.submit(first)
        await committer.close(_changes("a"))
        assert not committer.due()  # the next interval has begun
        await committer.submit(second)
        _ack(second)
        await _settle()
        assert broker.log == []  # the first poll's output is not acknowledged yet
        _ack(first)
        await committer.drain()
        # The changes before the offsets they go with; the second poll waits for its own.
        assert broker.log == [("write", ["a"]), ("commit", {TP: 10}), ("checkpointed", True)]
        assert reported == [{TP: 10}]
        await committer.stop()
        assert broker.log[-1] == ("checkpointed", True)  # a stop commits nothing more

    asyncio.run(scenario())


def test_a_changelog_write_that_fails_commits_nothing() -> None:
    async def scenario() -> None:
        broker = Broker()
        broker.fail_changelog = True
        committer = Committer(
            AtLeastOnce(broker.write, broker.commit, lambda offsets: None, broker.checkpointed),
            max_unacked=8,
            interval_s=1.0,
        )
        committer.start()
        sent = _sent(5)
        await committer.submit(sent)
        _ack(sent)
        await committer.close(_changes("a"))
        with pytest.raises(BrokerError, match="changelog not acknowledged"):
            await committer.drain()
        await committer.stop()
        assert [entry for entry in broker.log if entry[0] == "commit"] == []

    asyncio.run(scenario())


def test_exactly_once_close_returns_only_once_the_transactions_commit() -> None:
    async def scenario() -> None:
        broker = Broker()
        committed: list[dict[Any, int]] = []
        strategy = ExactlyOnce(broker.write, broker.commit, committed.append, broker.checkpointed)
        committer = Committer(strategy, max_unacked=8, interval_s=1.0)
        committer.start()
        sent = _sent(7)
        await committer.submit(sent)
        closing = asyncio.ensure_future(committer.close(_changes("a", "b")))
        await _settle()
        assert not closing.done()  # waiting for the poll's output, then the commit
        _ack(sent)
        await asyncio.wait_for(closing, 1.0)
        assert broker.log[:2] == [("write", ["a", "b"]), ("commit", {TP: 7})]
        assert committed == [{TP: 7}]
        await committer.stop()

    asyncio.run(scenario())


def test_memory_state_takes_no_changes_and_commits_once_an_interval() -> None:
    async def scenario() -> None:
        broker = Broker()
        now = [5.0]
        committer = Committer(
            MemoryOnly(broker.commit), max_unacked=8, interval_s=1.0, clock=lambda: now[0]
        )
        committer.start()
        asked: list[str] = []

        async def take() -> list[Change]:
            asked.append("asked")
            return []

        assert committer.due()  # nothing committed yet: the first is due at once
        await committer.close(take)
        sent = _sent(3)
        await committer.submit(sent)
        _ack(sent)
        await _settle()
        assert broker.log == []  # acknowledged after the close: waits for the next
        assert not committer.due()
        now[0] = 6.0
        assert committer.due()
        await committer.close(take)
        await _settle()
        assert asked == []
        assert broker.log == [("commit", {TP: 3})]
        await committer.stop()

    asyncio.run(scenario())


def test_only_offsets_the_group_took_are_reported_as_committed() -> None:
    async def scenario() -> None:
        reported: list[dict[Any, int]] = []
        answers = [False, True]

        async def commit(offsets: dict[Any, int]) -> bool:
            return answers.pop(0)  # first: the group moved on (a rebalance)

        committer = Committer(MemoryOnly(commit, reported.append), max_unacked=8, interval_s=0.0)
        committer.start()
        for offset in (4, 6):
            sent = _sent(offset)
            await committer.submit(sent)
            _ack(sent)
            await committer.close(_changes())
            await committer.drain()
        assert reported == [{TP: 6}]
        await committer.stop()

    asyncio.run(scenario())

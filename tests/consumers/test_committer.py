"""The committer with fake acknowledgements: order, failures, and what a stop commits."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from streamlstm.consumers.codec.poll import Batch, Encoded
from streamlstm.consumers.durability.checkpoint import MemoryOnly
from streamlstm.consumers.durability.committer import Committer, Sent
from streamlstm.consumers.engine.protocol import Change
from streamlstm.errors import BrokerError


class Commits:
    """A fake ``commit``: records each call's offsets."""

    def __init__(self) -> None:
        self.calls: list[dict[Any, int]] = []

    async def __call__(self, offsets: dict[Any, int]) -> bool:
        self.calls.append(dict(offsets))
        return True

    @property
    def last(self) -> dict[Any, int]:
        merged: dict[Any, int] = {}
        for call in self.calls:
            merged.update(call)
        return merged


def _sent(loop: asyncio.AbstractEventLoop, offsets: dict[Any, int], sends: int = 2) -> Sent:
    batch = Batch(received=0.0, next_offsets=offsets, count=1)
    futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(sends)]
    return Sent(futures, batch, Encoded(1, [], np.zeros(0)))


def _ack(sent: Sent) -> None:
    for future in sent.sends:
        future.set_result(None)


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def _no_changes() -> list[Change]:
    raise AssertionError("memory state asks the engine for no changes")


def test_polls_are_committed_in_order_after_their_acknowledgements() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        commits = Commits()
        acked: list[Sent] = []
        committer = Committer(
            MemoryOnly(commits), max_unacked=8, interval_s=0.0, on_acked=acked.append
        )
        committer.start()
        first, second, third = (_sent(loop, {("t", 0): n}) for n in (10, 20, 30))
        for sent in (first, second, third):
            await committer.submit(sent)
        await committer.close(_no_changes)  # the loop's close, behind the three
        # The second and third are acknowledged before the first: nothing commits.
        _ack(second)
        _ack(third)
        await _settle()
        assert commits.calls == []
        _ack(first)
        await committer.drain()
        assert commits.last == {("t", 0): 30}
        assert acked == [first, second, third]
        # Every commit moves forward: no offset is ever committed behind an earlier one.
        seen = [call[("t", 0)] for call in commits.calls]
        assert seen == sorted(seen)
        await committer.stop()

    asyncio.run(scenario())


def test_a_failed_send_stops_commits_and_fails_the_daemon() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        commits = Commits()
        committer = Committer(MemoryOnly(commits), max_unacked=8, interval_s=0.0)
        committer.start()
        good, bad, later = (_sent(loop, {("t", 1): n}) for n in (5, 9, 12))
        for sent in (good, bad, later):
            await committer.submit(sent)
        _ack(good)
        bad.sends[0].set_result(None)
        bad.sends[1].set_exception(RuntimeError("broker said no"))
        _ack(later)
        with pytest.raises(BrokerError, match="not acknowledged"):
            await committer.drain()
        # What was acknowledged before the failure is committed; nothing after it.
        assert commits.last == {("t", 1): 5}
        assert committer.failed
        with pytest.raises(BrokerError, match="not acknowledged"):
            await committer.submit(_sent(loop, {("t", 1): 20}))
        await committer.stop()
        assert commits.last == {("t", 1): 5}

    asyncio.run(scenario())


def test_stop_commits_the_acknowledged_polls_and_nothing_after_a_gap() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        commits = Commits()
        acked: list[Sent] = []
        committer = Committer(
            MemoryOnly(commits), max_unacked=8, interval_s=0.0, on_acked=acked.append
        )
        committer.start()
        polls = [_sent(loop, {("t", 2): n, ("t", 3): n + 100}) for n in (1, 2, 3, 4)]
        for sent in polls:
            await committer.submit(sent)
        _ack(polls[0])
        _ack(polls[1])
        _ack(polls[3])  # the third is still in flight: the fourth must wait for it
        await _settle()
        await committer.stop()
        assert commits.last == {("t", 2): 2, ("t", 3): 102}
        assert acked == polls[:2]  # each counted once, though the loop saw some already
        await committer.stop()  # safe twice
        assert commits.last == {("t", 2): 2, ("t", 3): 102}

    asyncio.run(scenario())


def test_submit_waits_for_room_and_the_queue_bounds_unacknowledged_polls() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        commits = Commits()
        committer = Committer(MemoryOnly(commits), max_unacked=1, interval_s=0.0)
        committer.start()
        first, second, third = (_sent(loop, {("t", 0): n}) for n in (1, 2, 3))
        await committer.submit(first)
        await _settle()  # the committer took the first; the queue has room for one
        await committer.submit(second)
        blocked = asyncio.ensure_future(committer.submit(third))
        await _settle()
        assert not blocked.done()
        _ack(first)
        await asyncio.wait_for(blocked, 1.0)
        _ack(second)
        _ack(third)
        await committer.close(_no_changes)
        await committer.drain()
        assert commits.last == {("t", 0): 3}
        await committer.stop()

    asyncio.run(scenario())


def test_a_failed_commit_fails_the_committer() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def commit(offsets: dict[Any, int]) -> bool:
            raise BrokerError("offsets not committed: group coordinator gone")

        committer = Committer(MemoryOnly(commit), max_unacked=4, interval_s=0.0)
        committer.start()
        sent = _sent(loop, {("t", 0): 1})
        await committer.submit(sent)
        _ack(sent)
        await committer.close(_no_changes)
        with pytest.raises(BrokerError, match="coordinator gone"):
            await committer.drain()
        await committer.stop()

    asyncio.run(scenario())


def test_a_checkpoint_closes_once_an_interval_and_never_passes_an_unacknowledged_poll() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        commits = Commits()
        now = [100.0]
        committer = Committer(
            MemoryOnly(commits), max_unacked=8, interval_s=1.0, clock=lambda: now[0]
        )
        committer.start()
        first, second, third, fourth = (_sent(loop, {("t", 0): n}) for n in (10, 20, 30, 40))
        await committer.submit(first)
        _ack(first)
        assert committer.due()  # the first checkpoint is due at once
        await committer.close(_no_changes)
        await _settle()
        assert commits.calls == [{("t", 0): 10}]
        for sent in (second, third):
            await committer.submit(sent)
            _ack(sent)
        await _settle()
        assert not committer.due()
        assert commits.calls == [{("t", 0): 10}]  # acknowledged, held back: not due yet
        now[0] += 1.0
        assert committer.due()
        await committer.close(_no_changes)
        await committer.submit(fourth)  # after the close: not in its checkpoint
        await _settle()
        assert commits.last == {("t", 0): 30}  # not held back behind the fourth's acks
        _ack(fourth)
        await committer.close(_no_changes)  # a drain closes too, due or not
        await committer.drain()
        assert commits.last == {("t", 0): 40}
        seen = [call[("t", 0)] for call in commits.calls]
        assert seen == sorted(seen)
        await committer.stop()

    asyncio.run(scenario())

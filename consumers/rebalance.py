"""Rebalance handling: finish and commit before partitions go; drop what moved away.

On revoke, in-flight polls are sent, acknowledged and committed first (the
serving loop is held off through the shared lock meanwhile). State is kept
until the new assignment is known: Kafka's eager rebalance revokes every
partition from every member, and most come straight back to the same
instance, with nobody reading them between. On the assignment that follows,
the streams of partitions that did not come back are dropped from memory
(with ``--state durable`` their new owner restores them from the changelog;
with ``--state memory`` they start again from zero state there), and the
partitions that are new here are restored before they are served.

aiokafka logs and swallows an exception raised in a listener; here such an
exception marks the daemon failed instead (``on_error``), so that a drain
that could not commit is never followed by serving as if nothing happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition

from streamlstm.consumers.reporting import Reporter

__all__ = ["RebalanceHandler"]

logger = logging.getLogger(__name__)


class RebalanceHandler(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer's rebalance listener for the input topic."""

    def __init__(
        self,
        *,
        input_topic: str,
        lock: asyncio.Lock,
        drain: Callable[[], Awaitable[None]],
        drop_partitions: Callable[[list[int]], Awaitable[int]],
        reporter: Reporter,
        on_error: Callable[[BaseException], None],
        applied: MutableMapping[Any, int],
        committed: Callable[[TopicPartition], Awaitable[int | None]],
        restore: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        self._topic = input_topic
        self._lock = lock
        self._drain = drain
        self._drop = drop_partitions
        self._reporter = reporter
        self._on_error = on_error
        self._applied = applied
        self._committed = committed
        self._restore = restore
        #: Input partitions whose streams' state is in the engine (durable state).
        self._held: set[int] = set()
        self._revoked: set[int] = set()  # input partitions revoked since the last assignment
        #: The group has given this instance an assignment (perhaps an empty one).
        self.joined = False

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        try:
            async with self._lock:
                await self._drain()
                parts = {tp.partition for tp in revoked if tp.topic == self._topic}
                self._revoked |= parts
                self._reporter.metrics.rebalances.inc(len(revoked))
                logger.info("partitions %s revoked", sorted(parts))
        except Exception as exc:
            logger.exception("finishing the revoked partitions' work failed")
            self._on_error(exc)

    async def _stale(self, assigned: Sequence[TopicPartition]) -> set[int]:
        """Partitions held again whose state does not match the group's committed offset.

        After a session expiry, or a revoke whose commit failed, the group
        may have moved on without this instance (another member read and
        committed), or the state may reflect ticks that will be read again:
        either way the state in memory is not what the committed offset
        says, and keeping it would apply ticks twice or skip some.
        """
        stale = set()
        for tp in assigned:
            mine = self._applied.get(tp) if tp.topic == self._topic else None
            if mine is None:
                continue  # no state from this partition in memory
            group = await self._committed(tp)
            if group != mine:
                logger.warning(
                    "partition %d: the group committed %s, this instance applied up to %d; "
                    "its streams' state is dropped",
                    tp.partition,
                    group,
                    mine,
                )
                stale.add(tp.partition)
        return stale

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self._topic}
        logger.info("partitions assigned: %s", sorted(parts))
        self.joined = True
        try:
            async with self._lock:
                # Committed positions (for lag) of partitions that stay are still right.
                self._reporter.keep_positions(set(assigned))
                moved, self._revoked = self._revoked - parts, set()
                stale = await self._stale(assigned)
                gone = sorted(moved | stale)
                for tp in [tp for tp in self._applied if tp.partition in gone]:
                    del self._applied[tp]
                if gone:
                    count = await self._drop(gone)
                    logger.info(
                        "partitions %s moved away, %s came back stale: dropped %d streams' state",
                        sorted(moved),
                        sorted(stale),
                        count,
                    )
                self._held -= set(gone)
                if self._restore is not None:
                    # Durable state: what this instance does not hold comes from the changelog
                    # (while the lock holds the loop off, so no tick of it is stepped first).
                    new = sorted(parts - self._held)
                    if new:
                        await self._restore(new)
                    self._held = set(parts)
        except Exception as exc:
            logger.exception("dropping the state of partitions that moved away failed")
            self._on_error(exc)

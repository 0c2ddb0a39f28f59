"""Rebalance handling: finish and commit before partitions go; drop what moved away.

On revoke, in-flight polls are sent, acknowledged and committed first (the
serving loop is held off through the shared lock meanwhile). State is kept
until the new assignment is known: Kafka's eager rebalance revokes every
partition from every member, and most come straight back to the same
instance, with nobody reading them between. On the assignment that follows,
the streams of partitions that did not come back are dropped from memory
(until durable state lands, a moved partition's streams restart from zero
state on their new owner).

aiokafka logs and swallows an exception raised in a listener; here such an
exception marks the daemon failed instead (``on_error``), so that a drain
that could not commit is never followed by serving as if nothing happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

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
    ) -> None:
        self._topic = input_topic
        self._lock = lock
        self._drain = drain
        self._drop = drop_partitions
        self._reporter = reporter
        self._on_error = on_error
        self._revoked: set[int] = set()  # input partitions revoked since the last assignment

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

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self._topic}
        logger.info("partitions assigned: %s", sorted(parts))
        try:
            async with self._lock:
                # Committed positions (for lag) of partitions that stay are still right.
                self._reporter.keep_positions(set(assigned))
                gone, self._revoked = sorted(self._revoked - parts), set()
                if gone:
                    count = await self._drop(gone)
                    logger.info("partitions %s moved away: dropped %d streams' state", gone, count)
        except Exception as exc:
            logger.exception("dropping the state of partitions that moved away failed")
            self._on_error(exc)

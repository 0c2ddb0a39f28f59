"""Rebalance handling: finish and commit before partitions go; drop what moved away.

On revoke, in-flight polls are sent, acknowledged and committed first (the
serving loop is held off through the shared lock meanwhile), and each
revoked partition's task is marked revoked. Its state is kept until the new
assignment is known: Kafka's eager rebalance revokes every partition from
every member, and most come straight back to the same instance, with nobody
reading them between. On the assignment that follows, the partition tasks
(``tasks.py``) close what did not come back or came back stale (their
streams are dropped from memory: with ``--state durable`` their new owner
restores them from the changelog; with ``--state memory`` they start again
from zero state there), resume what came back in step, and restore what is
new here before any of its ticks is served.

aiokafka logs and swallows an exception raised in a listener; here such an
exception marks the daemon failed instead (``on_error``), so that a drain
that could not commit is never followed by serving as if nothing happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import ConsumerRebalanceListener, TopicPartition

from streamlstm.consumers.durability.tasks import PartitionTasks
from streamlstm.consumers.observability.reporting import Reporter

__all__ = ["RebalanceHandler"]

logger = logging.getLogger(__name__)


class RebalanceHandler(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer's rebalance listener for the input topic: drives the partition tasks."""

    def __init__(
        self,
        *,
        lock: asyncio.Lock,
        drain: Callable[[], Awaitable[None]],
        tasks: PartitionTasks,
        reporter: Reporter,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._lock = lock
        self._drain = drain
        self._tasks = tasks
        self._reporter = reporter
        self._on_error = on_error
        #: The group has given this instance an assignment (perhaps an empty one).
        self.joined = False

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        try:
            async with self._lock:
                await self._drain()
                parts = self._tasks.revoke(revoked)
                self._reporter.metrics.rebalances.inc(len(revoked))
                logger.info("partitions %s revoked", parts)
        except Exception as exc:
            logger.exception("finishing the revoked partitions' work failed")
            self._on_error(exc)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        logger.info("partitions assigned: %s", self._tasks.partitions_of(assigned))
        self.joined = True
        try:
            async with self._lock:
                # Committed positions (for lag) of partitions that stay are still right.
                self._reporter.keep_positions(set(assigned))
                # While the lock holds the loop off: no tick of a partition being
                # restored is stepped first.
                await self._tasks.assign(assigned)
        except Exception as exc:
            logger.exception("dropping the state of partitions that moved away failed")
            self._on_error(exc)

"""What ``--state durable`` and ``--guarantee exactly-once`` add to the daemon.

Durable state (at-least-once): checkpoints to the changelog with the
daemon's producer, offsets committed by the consumer after the changelog is
acknowledged; restores read the changelog on assignment.

Exactly-once: the same checkpoints, but every record a tick of input
partition p causes (prediction, dead letter, changelog state) and p's
offsets go in one transaction of p's own producer (``transactions``), the
loop waits for each checkpoint's commit, and a refused record fails the
daemon rather than being sent again outside the transaction.

``strategy`` picks which of ``checkpoint.py``'s strategies the committer's
checkpoints follow; ``partition_tasks`` makes the input partitions' tasks
(``tasks.py``), whose restore is here: each new task's transactional
producer started first (fencing the previous owner's), then the changelog
read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from streamlstm.consumers.durability.changelog import Changelog, ensure_changelog
from streamlstm.consumers.durability.checkpoint import (
    AtLeastOnce,
    CommitFn,
    CommittedHook,
    ExactlyOnce,
    MemoryOnly,
    Strategy,
)
from streamlstm.consumers.durability.tasks import PartitionTask, PartitionTasks
from streamlstm.consumers.durability.transactions import (
    PartitionOutbox,
    PartitionTransaction,
    Transactions,
)
from streamlstm.consumers.engine.process import EngineClient
from streamlstm.consumers.kafka.clients import KafkaClients
from streamlstm.consumers.kafka.outbox import Box, Outbox
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import BrokerError

__all__ = ["Durability"]


class Durability:
    """The changelog and the transactions the config asks for (either may be None)."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        clients: KafkaClients,
        engine: EngineClient,
        metrics: ServeMetrics,
        clock: Callable[[], float],
        producer_settings: Mapping[str, Any],
    ) -> None:
        self.config = config
        self._clients = clients
        self._engine = engine
        self._clock = clock
        self.changelog: Changelog | None = None
        self.transactions: Transactions | None = None
        #: The input partitions' tasks (``partition_tasks``), which own their transactions.
        self.tasks: PartitionTasks | None = None
        if config.state == "durable":
            self.changelog = Changelog(
                clients.options,
                str(config.changelog_topic),
                engine=engine,
                metrics=metrics,
                swap_state=config.swap_state,
                isolation_level="read_committed",
                local=config.state_dir is not None,
            )
        if config.guarantee == "exactly-once":
            self.transactions = Transactions(
                clients,
                prefix=str(config.transactional_id_prefix),
                input_topic=config.input_topic,
                group_id=config.group_id,
                metrics=metrics,
                producer_settings=producer_settings,
            )

    @property
    def exactly_once(self) -> bool:
        return self.transactions is not None

    async def prepare(self, producer: AIOKafkaProducer, partitions: dict[str, list[int]]) -> None:
        """Before the group is joined: the changelog made or checked, transactions probed."""
        if self.transactions is not None:
            await self.transactions.probe(self.config.instance_id)
        if self.changelog is not None:
            self.changelog.attach(self.outboxes(producer, partitions))
            await ensure_changelog(
                self._clients.options,
                self.changelog.topic,
                partitions=len(partitions[self.config.input_topic]),
                replication_factor=self.config.changelog_replication_factor,
            )

    def outboxes(
        self, producer: AIOKafkaProducer, partitions: Mapping[str, Sequence[int]]
    ) -> Callable[[], Box]:
        """A new outbox per poll (and checkpoint): exactly-once routes by input partition."""
        transactions = self.transactions
        if transactions is None:
            return lambda: Outbox(producer, partitions)
        return lambda: PartitionOutbox(self._transaction, partitions, self._clock)

    def strategy(self, offsets_commit: CommitFn, on_committed: CommittedHook) -> Strategy:
        """How each checkpoint commits: ``offsets_commit`` is the consumer's commit (or,
        exactly-once, the transactions'); ``on_committed`` hears of every commit."""
        changelog, transactions = self.changelog, self.transactions
        if changelog is None:
            return MemoryOnly(offsets_commit, on_committed)
        write, checkpointed = changelog.write, changelog.checkpointed
        if transactions is None:
            return AtLeastOnce(write, offsets_commit, on_committed, checkpointed)

        async def commit(offsets: dict[Any, int]) -> bool:
            await transactions.commit(self._held(), offsets)
            return True

        return ExactlyOnce(write, commit, on_committed, checkpointed)

    def _held(self) -> Mapping[int, PartitionTransaction]:
        return {} if self.tasks is None else self.tasks.transactions()

    def _transaction(self, partition: int) -> PartitionTransaction:
        if self.tasks is None:
            raise BrokerError(f"no transactional producer for input partition {partition}")
        return self.tasks.transaction(partition)

    def partition_tasks(
        self, committed: Callable[[TopicPartition], Awaitable[int | None]]
    ) -> PartitionTasks:
        """The input partitions' tasks: restored from the changelog (durable state),
        their streams and producers dropped when they move away or come back stale."""
        self.tasks = PartitionTasks(
            self.config.input_topic,
            drop=self._engine.drop_partitions,
            committed=committed,
            restore=self.restore if self.changelog is not None else None,
        )
        return self.tasks

    async def restore(self, tasks: list[PartitionTask]) -> None:
        """Newly held partitions: fence their previous owner (each task's transaction is
        started first), then read their changelog."""
        transactions = self.transactions
        if transactions is not None:
            opening = [task for task in tasks if task.transaction is None]
            opened = await transactions.open([task.partition for task in opening])
            for task in opening:
                task.transaction = opened[task.partition]
        if self.changelog is not None:
            await self.changelog.restore([task.partition for task in tasks])

    async def close(self) -> None:
        """At shutdown: the tasks' open transactions aborted, their producers stopped."""
        if self.tasks is not None:
            await self.tasks.close_all()

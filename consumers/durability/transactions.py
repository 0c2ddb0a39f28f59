"""Exactly-once mode: one transactional producer per input partition.

aiokafka's transactions predate KIP-447 (a transaction cannot be tied to the
consumer group's generation), so zombies are fenced as Kafka Streams' first
exactly-once did: the producer that writes what input partition p caused has
``transactional.id = <prefix>-<input topic>-<p>``. Whoever holds p next starts
a producer with that id, which fences the old one and aborts its open
transaction before the new owner reads p's changelog or input.

Each producer (a ``PartitionTransaction``) belongs to its partition's task
(``tasks.py``): started by the task's restore, aborted and stopped when the
task closes. Each is always inside a transaction. Per commit interval and
partition, its transaction holds the predictions and dead letters of p's
ticks, the changelog records of p's streams, and p's input offsets (sent with
``send_offsets_to_transaction``); it commits, and the next begins. Closing a
checkpoint waits for the commit (``checkpoint.ExactlyOnce``) before the poll
loop sends more, so that no later poll's output joins a transaction whose
offsets do not cover it.

``PartitionOutbox`` is the ``Outbox`` of this mode: it routes each record to
the producer of the input partition it answers (the codec's ``source``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamlstm.consumers.kafka.clients import KafkaClients, stop_client
from streamlstm.consumers.kafka.outbox import Headers, Outbox
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.errors import BrokerError

__all__ = ["PartitionOutbox", "PartitionTransaction", "Transactions"]

logger = logging.getLogger(__name__)

#: Kafka refuses, by default, a record stamped more than an hour ahead of its clock
#: (``message.timestamp.after.max.ms``). Inside a transaction one refused record
#: fails the whole transaction, so such records go stamped with the producer's time.
_MAX_AHEAD_MS = 3_600_000 - 60_000


class PartitionTransaction:
    """Input partition p's transactional producer, always inside a transaction; owned by
    p's task (``tasks.py``) from its restore until the partition is closed."""

    def __init__(
        self, partition: int, producer: AIOKafkaProducer, *, group: str, metrics: ServeMetrics
    ) -> None:
        self.partition = partition
        self._producer = producer
        self._group = group
        self._metrics = metrics
        #: The open transaction holds records (an abort of it is counted).
        self.dirty = False

    def producer(self) -> AIOKafkaProducer:
        """The producer, for records that go in this transaction."""
        self.dirty = True
        return self._producer

    async def commit(self, offset: tuple[TopicPartition, int] | None) -> None:
        """The partition's offsets into its transaction, commit, begin the next."""
        producer = self._producer
        if offset is not None:
            tp, next_offset = offset
            await producer.send_offsets_to_transaction({tp: next_offset}, self._group)
        await producer.commit_transaction()
        if self.dirty or offset is not None:
            self._metrics.transactions.labels("committed").inc()
        self.dirty = False
        await producer.begin_transaction()

    async def abort(self) -> None:
        """Abort what is open and stop the producer (the partition is no longer held)."""
        if self.dirty:
            logger.warning(
                "partition %d: aborting a transaction with records (read again later)",
                self.partition,
            )
        try:
            await asyncio.wait_for(self._producer.abort_transaction(), 10.0)
            if self.dirty:
                self._metrics.transactions.labels("aborted").inc()
        except (KafkaError, AssertionError, TimeoutError):
            # Fenced, or already failed: the broker aborts it (or the next owner does).
            logger.debug(
                "abort of partition %d's transaction failed", self.partition, exc_info=True
            )
        self.dirty = False
        await stop_client(self._producer)


class Transactions:
    """Starts (and so fences) the input partitions' transactional producers; commits the
    transactions of the partitions held, all together."""

    def __init__(
        self,
        clients: KafkaClients,
        *,
        prefix: str,
        input_topic: str,
        group_id: str,
        metrics: ServeMetrics,
        producer_settings: Mapping[str, Any],
        timeout_s: float = 60.0,
    ) -> None:
        self._clients = clients
        self._prefix = prefix
        self._topic = input_topic
        self._group = group_id
        self._metrics = metrics
        self._settings = dict(producer_settings)
        self._timeout_s = timeout_s

    def transactional_id(self, partition: int) -> str:
        return f"{self._prefix}-{self._topic}-{partition}"

    async def probe(self, instance_id: str) -> None:
        """Fail at start-up, clearly, on a broker without transactions."""
        producer = AIOKafkaProducer(
            **self._clients.options, transactional_id=f"{self._prefix}-probe-{instance_id}"
        )
        try:
            await asyncio.wait_for(self._begin(producer), self._timeout_s)
            await producer.abort_transaction()
        except (KafkaError, TimeoutError, OSError) as exc:
            raise BrokerError(
                f"--guarantee exactly-once needs a broker with transactions (Apache Kafka); "
                f"{self._clients.bootstrap} did not start one: {exc!r}"
            ) from exc
        finally:
            await stop_client(producer)

    async def open(self, partitions: Sequence[int]) -> dict[int, PartitionTransaction]:
        """Start (and so fence the previous owner of) each partition's producer, in a
        transaction; before its changelog is read, so no zombie's transaction is left open.
        If any fails, those started are stopped again and the error raised."""
        started = time.perf_counter()
        producers = await asyncio.gather(
            *(self._start(p) for p in partitions), return_exceptions=True
        )
        opened = {
            p: PartitionTransaction(p, producer, group=self._group, metrics=self._metrics)
            for p, producer in zip(partitions, producers, strict=True)
            if not isinstance(producer, BaseException)
        }
        failed = next((p for p in producers if isinstance(p, BaseException)), None)
        if failed is not None:
            for transaction in opened.values():
                await transaction.abort()
            raise BrokerError(f"cannot start transactional producers: {failed!r}") from failed
        if opened:
            logger.info(
                "transactional producers for partitions %s ready in %.2f s",
                list(opened),
                time.perf_counter() - started,
            )
        return opened

    async def _start(self, partition: int) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **self._clients.options,
            **self._settings,
            transactional_id=self.transactional_id(partition),
        )
        try:
            await asyncio.wait_for(self._begin(producer), self._timeout_s)
        except BaseException:
            await stop_client(producer)
            raise
        return producer

    @staticmethod
    async def _begin(producer: AIOKafkaProducer) -> None:
        await producer.start()
        await producer.begin_transaction()

    async def commit(
        self, held: Mapping[int, PartitionTransaction], offsets: Mapping[Any, int]
    ) -> None:
        """Every held partition's transaction, with its offsets where it has some."""
        mine = {tp.partition: (tp, o) for tp, o in offsets.items() if tp.topic == self._topic}
        results = await asyncio.gather(
            *(transaction.commit(mine.get(p)) for p, transaction in held.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise BrokerError(
                    f"transaction not committed (its records are not visible to "
                    f"read_committed consumers and its input is read again): {result!r}"
                ) from result


class PartitionOutbox:
    """An ``Outbox`` per input partition, each with that partition's producer."""

    def __init__(
        self,
        transaction: Callable[[int], PartitionTransaction],
        partitions: Mapping[str, Sequence[int]],
        clock: Callable[[], float],
    ) -> None:
        self._transaction = transaction
        self._partitions = partitions
        self._clock = clock
        self._boxes: dict[int, Outbox] = {}
        self.batches: list[tuple[asyncio.Future[Any], list[Any]]] = []

    def add(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
        partition: int | None = None,
        *,
        source: int = -1,
    ) -> None:
        if timestamp_ms is not None and timestamp_ms > self._clock() * 1000.0 + _MAX_AHEAD_MS:
            timestamp_ms = None
        self._box(source).add(topic, key, value, headers, timestamp_ms, partition)

    def add_many(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        timestamps_ms: Sequence[int | None],
        sources: Sequence[int],
    ) -> None:
        """``Outbox.add_many``, each record to its source partition's outbox."""
        latest = self._clock() * 1000.0 + _MAX_AHEAD_MS
        split: dict[int, tuple[list[Any], list[Any], list[Any]]] = {}
        for key, value, stamp, source in zip(keys, values, timestamps_ms, sources, strict=True):
            part = split.get(source)
            if part is None:
                part = split[source] = ([], [], [])
            part[0].append(key)
            part[1].append(value)
            part[2].append(None if stamp is not None and stamp > latest else stamp)
        for source, (k, v, t) in split.items():
            self._box(source).add_many(topic, k, v, t, [source] * len(k))

    def _box(self, source: int) -> Outbox:
        box = self._boxes.get(source)
        if box is None:
            producer = self._transaction(source).producer()
            box = self._boxes[source] = Outbox(producer, self._partitions)
        return box

    async def send(self) -> list[asyncio.Future[Any]]:
        futures: list[asyncio.Future[Any]] = []
        for box in self._boxes.values():
            futures += await box.send()
            self.batches += box.batches
        self._boxes = {}
        return futures

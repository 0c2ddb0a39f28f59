"""Exactly-once mode: one transactional producer per input partition.

aiokafka's transactions predate KIP-447 (a transaction cannot be tied to the
consumer group's generation), so zombies are fenced as Kafka Streams' first
exactly-once did: the producer that writes what input partition p caused has
``transactional.id = <prefix>-<input topic>-<p>``. Whoever holds p next starts
a producer with that id, which fences the old one and aborts its open
transaction before the new owner reads p's changelog or input.

Each producer is always inside a transaction. Per commit interval and
partition, its transaction holds the predictions and dead letters of p's
ticks, the changelog records of p's streams, and p's input offsets (sent with
``send_offsets_to_transaction``); it commits, and the next begins. The poll
loop waits for the commit before it sends more, so that no later poll's
output joins a transaction whose offsets do not cover it.

``PartitionOutbox`` is the ``Outbox`` of this mode: it routes each record to
the producer of the input partition it answers (the codec's ``source``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamlstm.consumers.kafka import KafkaClients, stop_client
from streamlstm.consumers.metrics import ServeMetrics
from streamlstm.consumers.outbox import Headers, Outbox
from streamlstm.errors import BrokerError

__all__ = ["PartitionOutbox", "Transactions"]

logger = logging.getLogger(__name__)

#: Kafka refuses, by default, a record stamped more than an hour ahead of its clock
#: (``message.timestamp.after.max.ms``). Inside a transaction one refused record
#: fails the whole transaction, so such records go stamped with the producer's time.
_MAX_AHEAD_MS = 3_600_000 - 60_000


class Transactions:
    """The transactional producers of the input partitions this instance holds."""

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
        self._producers: dict[int, AIOKafkaProducer] = {}
        #: Partitions whose open transaction holds records (an abort of one is counted).
        self._dirty: set[int] = set()

    def transactional_id(self, partition: int) -> str:
        return f"{self._prefix}-{self._topic}-{partition}"

    @property
    def partitions(self) -> list[int]:
        return sorted(self._producers)

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

    async def open(self, partitions: Sequence[int]) -> None:
        """Start (and so fence the previous owner of) each partition's producer, in a
        transaction; before its changelog is read, so no zombie's transaction is left open."""
        new = [p for p in partitions if p not in self._producers]
        started = time.perf_counter()
        producers = await asyncio.gather(*(self._start(p) for p in new), return_exceptions=True)
        failed = None
        for p, producer in zip(new, producers, strict=True):
            if isinstance(producer, BaseException):
                failed = failed or producer
            else:
                self._producers[p] = producer
        if failed is not None:
            raise BrokerError(f"cannot start transactional producers: {failed!r}") from failed
        if new:
            logger.info(
                "transactional producers for partitions %s ready in %.2f s",
                new,
                time.perf_counter() - started,
            )

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

    def producer(self, partition: int) -> AIOKafkaProducer:
        """Partition ``partition``'s producer, for records that go in its transaction."""
        try:
            producer = self._producers[partition]
            self._dirty.add(partition)
            return producer
        except KeyError:
            raise BrokerError(
                f"no transactional producer for input partition {partition}"
            ) from None

    async def commit(self, offsets: Mapping[Any, int]) -> None:
        """Per partition: its offsets into its transaction, commit, begin the next."""
        mine = {tp.partition: (tp, o) for tp, o in offsets.items() if tp.topic == self._topic}
        await self._each(self._commit_one, mine)

    async def _commit_one(self, partition: int, offset: tuple[TopicPartition, int] | None) -> None:
        producer = self._producers[partition]
        if offset is not None:
            tp, next_offset = offset
            await producer.send_offsets_to_transaction({tp: next_offset}, self._group)
        await producer.commit_transaction()
        if partition in self._dirty or offset is not None:
            self._metrics.transactions.labels("committed").inc()
        self._dirty.discard(partition)
        await producer.begin_transaction()

    async def _each(
        self,
        step: Callable[[int, tuple[TopicPartition, int] | None], Awaitable[None]],
        by_partition: Mapping[int, tuple[TopicPartition, int]],
    ) -> None:
        results = await asyncio.gather(
            *(step(p, by_partition.get(p)) for p in list(self._producers)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise BrokerError(
                    f"transaction not committed (its records are not visible to "
                    f"read_committed consumers and its input is read again): {result!r}"
                ) from result

    async def close(self, partitions: Sequence[int]) -> None:
        """Abort what is open and stop the producers of partitions this instance lost."""
        for partition in partitions:
            producer = self._producers.pop(partition, None)
            if producer is None:
                continue
            if partition in self._dirty:
                logger.warning(
                    "partition %d: aborting a transaction with records (read again later)",
                    partition,
                )
            try:
                await asyncio.wait_for(producer.abort_transaction(), 10.0)
                if partition in self._dirty:
                    self._metrics.transactions.labels("aborted").inc()
            except (KafkaError, AssertionError, TimeoutError):
                # Fenced, or already failed: the broker aborts it (or the next owner does).
                logger.debug("abort of partition %d's transaction failed", partition, exc_info=True)
            self._dirty.discard(partition)
            await stop_client(producer)

    async def close_all(self) -> None:
        await self.close(list(self._producers))


class PartitionOutbox:
    """An ``Outbox`` per input partition, each with that partition's producer."""

    def __init__(
        self,
        transactions: Transactions,
        partitions: Mapping[str, Sequence[int]],
        clock: Callable[[], float],
    ) -> None:
        self._transactions = transactions
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
            producer = self._transactions.producer(source)
            box = self._boxes[source] = Outbox(producer, self._partitions)
        return box

    async def send(self) -> list[asyncio.Future[Any]]:
        futures: list[asyncio.Future[Any]] = []
        for box in self._boxes.values():
            futures += await box.send()
            self.batches += box.batches
        self._boxes = {}
        return futures

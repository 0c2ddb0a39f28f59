"""One poll's output messages, sent as one record batch per topic partition.

``AIOKafkaProducer.send`` costs about 20 µs of event-loop time a message
(a coroutine, pure-Python murmur2 partitioning, a future and its callback
each); at 10k ticks/s that alone is a fifth of a core. A poll's predictions
are known all at once, so they go into record batches built directly, with
one acknowledgement future per batch. Keys are partitioned as Kafka's
default partitioner does (murmur2 of the key bytes), remembered per key, so
a stream's outputs keep landing on one partition.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from streamlstm.consumers.kafka.internals import raw_append, seal

__all__ = ["Box", "OutRecord", "Outbox", "partition_of"]

Headers = Sequence[tuple[str, bytes]]
#: One queued record: (topic, partition, key, value, headers, timestamp_ms).
OutRecord = tuple[str, int, bytes | None, bytes | None, Headers, int | None]


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition for ``key`` among ``partitions`` (Java client, aiokafka)."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


#: Keys whose partition index the outbox remembers, per partition count (then it
#: starts over): a dict lookup, where an LRU cache cost ~0.1 µs a record in bookkeeping.
_KNOWN_KEYS = 1 << 17
_known: dict[int, dict[bytes, int]] = {}


def _partition_index(key: bytes, count: int) -> int:
    """``partition_of(key, count)``, remembered."""
    known = _known.setdefault(count, {})
    index = known.get(key)
    if index is None:
        if len(known) >= _KNOWN_KEYS:
            known.clear()
        index = known[key] = partition_of(key, count)
    return index


class Outbox:
    """Collects messages with ``add``; ``send`` queues them and returns the ack futures.

    ``partitions`` maps each topic to its partition ids (from the producer's
    metadata at start-up).
    """

    def __init__(self, producer: AIOKafkaProducer, partitions: Mapping[str, Sequence[int]]) -> None:
        self._producer = producer
        self._partitions = partitions
        self._open: dict[tuple[str, int], tuple[Any, list[OutRecord]]] = {}
        self._ready: list[tuple[str, int, Any, list[OutRecord]]] = []
        #: After ``send``: each batch's acknowledgement and the records it holds (so that a
        #: batch the broker refuses can be sent again record by record).
        self.batches: list[tuple[asyncio.Future[Any], list[OutRecord]]] = []

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
        """Queue one record; ``partition`` None picks it as Kafka's default partitioner does.
        ``source`` (the input partition it answers) is for routers such as exactly-once's."""
        if partition is None:
            parts = self._partitions[topic]
            # As the default partitioner: keyless messages go to any partition.
            partition = (
                random.choice(parts) if key is None else parts[_partition_index(key, len(parts))]
            )
        record: OutRecord = (topic, partition, key, value, headers, timestamp_ms)
        entry = self._open.get((topic, partition))
        if entry is None:
            entry = self._open[(topic, partition)] = (self._producer.create_batch(), [])
        builder, records = entry
        if (
            builder.append(key=key, value=value, timestamp=timestamp_ms, headers=list(headers))
            is None
        ):
            # Full: queue it as it is; an empty batch always takes one message.
            self._ready.append((topic, partition, builder, records))
            builder, records = self._open[(topic, partition)] = (self._producer.create_batch(), [])
            builder.append(key=key, value=value, timestamp=timestamp_ms, headers=list(headers))
        records.append(record)

    def add_many(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        timestamps_ms: Sequence[int | None],
        sources: Sequence[int],
    ) -> None:
        """``add(topic, keys[i], values[i], (), timestamps_ms[i], source=sources[i])`` for
        each i, without headers, partitioned by key; one call a poll, not one a record."""
        parts = self._partitions[topic]
        count = len(parts)
        known = _known.setdefault(count, {})
        opened = self._open
        # Per open batch of this call: the record batch's own append, where that fast
        # path is engaged (``kafka.internals.raw_append``); None: the public append.
        raws: dict[int, Any] = {}
        for key, value, stamp in zip(keys, values, timestamps_ms, strict=True):
            if key is None:
                partition = random.choice(parts)
            else:
                index = known.get(key)  # inline: the common case, one lookup a record
                if index is None:
                    index = _partition_index(key, count)
                partition = parts[index]
            entry = opened.get((topic, partition))
            if entry is None:
                entry = opened[(topic, partition)] = (self._producer.create_batch(), [])
            builder, records = entry
            raw = raws.get(partition, _UNSEEN)
            if raw is _UNSEEN:
                raw = raws[partition] = raw_append(builder, len(records))
            if raw is None:
                appended = builder.append(key=key, value=value, timestamp=stamp, headers=[])
            else:
                appended = raw(len(records), stamp, key, value, _NO_HEADERS)
            if appended is None:
                # Full: queue it as it is; an empty batch always takes one message.
                if raw is not None:
                    seal(builder, len(records))
                builder.close()  # as its own append closes it when full
                self._ready.append((topic, partition, builder, records))
                builder, records = opened[(topic, partition)] = (self._producer.create_batch(), [])
                builder.append(key=key, value=value, timestamp=stamp, headers=[])
                raws.pop(partition)  # looked up again with the next record
            records.append((topic, partition, key, value, (), stamp))
        for partition, raw in raws.items():
            if raw is not None:
                builder, records = opened[(topic, partition)]
                seal(builder, len(records))

    async def send(self) -> list[asyncio.Future[Any]]:
        """Queue every batch, in order per partition; waits only for room in the queue."""
        batches = self._ready + [(t, p, b, r) for (t, p), (b, r) in self._open.items()]
        self._ready, self._open = [], {}
        for topic, partition, builder, records in batches:
            future = await self._producer.send_batch(builder, topic, partition=partition)
            self.batches.append((future, records))
        return [future for future, _ in self.batches]


#: Headers of every ``add_many`` record: none (the record batch only reads them).
_NO_HEADERS: list[tuple[str, bytes]] = []
_UNSEEN = object()


class Box(Protocol):
    """What the loop and the changelog need of an outbox (``Outbox``, or exactly-once's
    ``PartitionOutbox`` that routes by ``source``)."""

    batches: list[tuple[asyncio.Future[Any], list[OutRecord]]]

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
    ) -> None: ...

    def add_many(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        timestamps_ms: Sequence[int | None],
        sources: Sequence[int],
    ) -> None: ...

    async def send(self) -> list[asyncio.Future[Any]]: ...

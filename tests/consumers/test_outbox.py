"""Output keys land where Kafka's default partitioner puts them."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from streamlstm.consumers.kafka.outbox import Outbox, partition_of


def test_partition_of_matches_the_default_partitioner() -> None:
    reference = DefaultPartitioner()
    rng = random.Random(7)
    for _ in range(2000):
        key = rng.randbytes(rng.randint(1, 40))
        count = rng.randint(1, 64)
        everything = list(range(count))
        assert partition_of(key, count) == reference(key, everything, everything)


def test_add_many_queues_what_add_queues_record_for_record() -> None:
    async def queued(bulk: bool) -> list[tuple[Any, ...]]:
        # Never started: batches are built, nothing is sent.
        producer = AIOKafkaProducer(bootstrap_servers="localhost:1")
        outbox = Outbox(producer, {"out": [0, 1, 2]})
        keys = [f"s{i % 50}".encode() for i in range(400)]
        values = [b"v" * (i % 300) for i in range(400)]  # enough to fill batches
        stamps = [None if i % 7 else 1_700_000_000_000 + i for i in range(400)]
        if bulk:
            outbox.add_many("out", keys, values, stamps, [i % 4 for i in range(400)])
        else:
            for i, (k, v, t) in enumerate(zip(keys, values, stamps, strict=True)):
                outbox.add("out", k, v, (), t, source=i % 4)
        batches = outbox._ready + [(t, p, b, r) for (t, p), (b, r) in outbox._open.items()]
        await producer.stop()
        return [(t, p, b.record_count(), r) for t, p, b, r in batches]

    many, one_by_one = asyncio.run(queued(True)), asyncio.run(queued(False))
    assert many == one_by_one
    assert len(many) > 3  # several partitions, and full batches started anew

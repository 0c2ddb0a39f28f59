"""Output keys land where Kafka's default partitioner puts them."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from streamlstm.consumers.outbox import partition_of


def test_partition_of_matches_the_default_partitioner() -> None:
    reference = DefaultPartitioner()
    rng = random.Random(7)
    for _ in range(2000):
        key = rng.randbytes(rng.randint(1, 40))
        count = rng.randint(1, 64)
        everything = list(range(count))
        assert partition_of(key, count) == reference(key, everything, everything)

"""Reading a control's acknowledgement from the output topic.

The partition's owner answers each control it applies with an
acknowledgement record (``{"stream", "control", "partition", "offset"}``) on
the output topic. ``AckReader`` reads that topic from its end as it was
before the control was sent, ``read_committed`` (in exactly-once mode an
acknowledgement counts once its transaction commits), until the one for a
given (partition, offset) appears. ``streamlstm streams reset|delete``
uses it, and the admin API where another instance holds the partition.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

__all__ = ["AckReader"]


class AckReader:
    """``reader = await AckReader.start(options, topic, producer)``, then send the
    control, then ``await reader.wait(partition, offset, wait_s)``; ``stop`` at the end."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    @classmethod
    async def start(
        cls, options: dict[str, Any], topic: str, producer: AIOKafkaProducer
    ) -> AckReader:
        """A reader of ``topic`` from its end now: the acknowledgement comes after."""
        numbers = await producer.partitions_for(topic)  # fetches the topic's metadata
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer = AIOKafkaConsumer(
            **options, enable_auto_commit=False, isolation_level="read_committed"
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)  # fixed now, before the control is sent
        except BaseException:
            await consumer.stop()
            raise
        return cls(consumer)

    async def wait(self, partition: int, offset: int, wait_s: float) -> dict[str, Any] | None:
        """The acknowledgement of the control at ``partition``/``offset``, or None if it
        was not read within ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            batch = await self._consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            for records in batch.values():
                for record in records:
                    ack = _acknowledgement(record.value)
                    if ack is not None and (ack["partition"], ack["offset"]) == (partition, offset):
                        return ack
        return None

    async def stop(self) -> None:
        await self._consumer.stop()


def _acknowledgement(value: bytes | None) -> dict[str, Any] | None:
    """An acknowledgement's body; None for a prediction or anything else."""
    try:
        body = json.loads(value) if value is not None else None
    except ValueError:
        return None
    if isinstance(body, dict) and "control" in body and "partition" in body and "offset" in body:
        return body
    return None

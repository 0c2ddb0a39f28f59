"""Reading a control's acknowledgement from the output topic.

The partition's owner answers each control it applies with an
acknowledgement record (``{"stream", "control", "partition", "offset"}``) on
the output topic, keyed by the stream like its predictions, so in the
output partition the key gives. ``AckReader`` reads that one partition from
its end as it was before the control was sent, ``read_committed`` (in
exactly-once mode an acknowledgement counts once its transaction commits),
parsing only the stream's own records, until the one for a given
(partition, offset) appears. Kafka's errors come out as ``BrokerError``.
``streamlstm streams reset|delete`` uses it, and the admin API where another
instance holds the partition.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamlstm.consumers.kafka.outbox import partition_of
from streamlstm.errors import BrokerError

__all__ = ["AckReader"]


class AckReader:
    """``reader = await AckReader.start(options, topic, producer, key)``, then send
    the control, then ``await reader.wait(partition, offset, wait_s)``; ``stop`` at
    the end."""

    def __init__(self, consumer: AIOKafkaConsumer, key: bytes) -> None:
        self._consumer = consumer
        self._key = key

    @classmethod
    async def start(
        cls, options: dict[str, Any], topic: str, producer: AIOKafkaProducer, key: bytes
    ) -> AckReader:
        """A reader of the partition of ``topic`` that ``key``'s records go to, from its
        end now: the acknowledgement comes after."""
        consumer = AIOKafkaConsumer(
            **options, enable_auto_commit=False, isolation_level="read_committed"
        )
        try:
            numbers = await producer.partitions_for(topic)  # the topic's metadata
            tp = TopicPartition(topic, partition_of(key, len(numbers)))
            await consumer.start()
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.position(tp)  # fixed now, before the control is sent
        except BaseException as exc:
            await consumer.stop()
            if isinstance(exc, KafkaError):
                raise BrokerError(f"cannot read {topic} for the acknowledgement: {exc}") from exc
            raise
        return cls(consumer, key)

    async def wait(self, partition: int, offset: int, wait_s: float) -> dict[str, Any] | None:
        """The acknowledgement of the control at ``partition``/``offset``, or None if it
        was not read within ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            try:
                batch = await self._consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            except KafkaError as exc:
                raise BrokerError(f"reading the acknowledgement: {exc}") from exc
            for records in batch.values():
                for record in records:
                    if record.key != self._key:
                        continue  # another stream's: not even parsed
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

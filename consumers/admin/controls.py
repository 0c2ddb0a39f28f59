"""Sending a control record for the admin API, and waiting until it is applied.

The control goes onto the input topic keyed by its stream, at the partition
the default partitioner gives that key (where the stream's ticks are), so the
partition's owner applies it in offset order with them. Where this instance
holds that partition, the wait is on its own poll loop (``ControlAcks``);
elsewhere, on the owner's acknowledgement in the output topic
(``AckReader``). Either way the control is in the topic once ``send``
returns: a wait that runs out means "not yet", never "not at all".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamlstm.consumers.admin.ack_reader import AckReader
from streamlstm.consumers.admin.acks import ControlAcks
from streamlstm.consumers.codec.wire import CONTROL_HEADER
from streamlstm.consumers.kafka.outbox import partition_of
from streamlstm.errors import BrokerError

__all__ = ["ControlOutcome", "ControlSender", "input_partition"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlOutcome:
    """Where a control went, and whether it was applied within the wait."""

    stream: str
    op: str
    partition: int
    offset: int
    acknowledged: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "control": self.op,
            "partition": self.partition,
            "offset": self.offset,
            "acknowledged": self.acknowledged,
        }


class ControlSender:
    """Controls onto ``input_topic`` through ``producer``; ``reader(key)`` starts an
    ``AckReader`` of the output partition of ``key``."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        input_topic: str,
        acks: ControlAcks,
        held: Callable[[], Collection[int]],
        reader: Callable[[bytes], Awaitable[AckReader]],
    ) -> None:
        self._producer = producer
        self._topic = input_topic
        self._acks = acks
        self._held = held
        self._reader = reader

    async def send(self, stream: str, key: bytes, op: str, wait_s: float) -> ControlOutcome:
        """Send ``op`` for the stream keyed ``key``; wait up to ``wait_s`` for it. Raises
        ``BrokerError`` where it was not sent; once sent, a failed wait is a wait that
        ran out (the control is applied all the same)."""
        partition = await input_partition(self._producer, self._topic, key)
        # The reader starts before the control is sent: its acknowledgement comes after.
        reader = None if partition in self._held() else await self._reader(key)
        try:
            try:
                meta = await self._producer.send_and_wait(
                    self._topic, b"", key=key, partition=partition,
                    headers=[(CONTROL_HEADER, op.encode())],
                )  # fmt: skip
            except KafkaError as exc:
                raise BrokerError(f"the {op} control was not sent: {exc}") from exc
            try:
                if reader is None:
                    done = await self._acks.wait(meta.partition, meta.offset, wait_s)
                else:
                    done = await reader.wait(meta.partition, meta.offset, wait_s) is not None
            except BrokerError as exc:
                logger.warning("waiting for the %s of %r: %s", op, stream, exc)
                done = False
        finally:
            if reader is not None:
                await reader.stop()
        return ControlOutcome(stream, op, meta.partition, meta.offset, done)


async def input_partition(producer: AIOKafkaProducer, topic: str, key: bytes) -> int:
    """The partition of ``topic`` that records keyed ``key`` go to now, from the
    producer's metadata (refreshed as Kafka's clients do: a topic that gained
    partitions sends a stream's ticks elsewhere, and its controls must follow)."""
    try:
        numbers = await producer.partitions_for(topic)
    except KafkaError as exc:
        raise BrokerError(f"no metadata for {topic}: {exc}") from exc
    return partition_of(key, len(numbers))

"""When the broker refuses a batch for one record's sake: send its records one by one.

A record batch fails whole when one of its records is refused for what it is
(too large for the topic's ``max.message.bytes``, a timestamp outside the
topic's ``message.timestamp.*.max.ms``, an invalid record). Stopping the daemon
for that would stop every stream for one message, and restarting it would
meet the same record again. So the committer hands such a batch here: each
record is sent alone; one the broker still refuses is sent again without its
timestamp (the broker's or producer's time then), and if still refused it is
replaced by a small dead letter that says why (its value cut to 1 KiB). Only
errors of the broker as a whole (unreachable, not enough replicas, ...) stop
the daemon, and then nothing unacknowledged is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from streamlstm.consumers.kafka.outbox import Outbox, OutRecord
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.errors import BrokerError

__all__ = ["PER_RECORD_ERRORS", "Rescuer"]

logger = logging.getLogger(__name__)

#: Errors that are about the records of a batch, not the broker.
PER_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    CorruptRecordException,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
#: A replacement dead letter's value is cut to this.
_CUT_BYTES = 1024


class Rescuer:
    """``await rescuer(records, error)``: deliver a refused batch's records one by one."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        partitions: Mapping[str, Sequence[int]],
        dlq_topic: str,
        metrics: ServeMetrics,
    ) -> None:
        self._producer = producer
        self._partitions = partitions
        self._dlq = dlq_topic
        self._metrics = metrics

    async def __call__(self, records: list[OutRecord], error: BaseException) -> None:
        logger.warning(
            "the broker refused a batch of %d records (%r); sending them one by one",
            len(records),
            error,
        )
        for record in records:
            await self._one(record)

    async def _one(self, record: OutRecord) -> None:
        topic, partition, key, value, headers, timestamp = record
        try:
            await self._send(topic, partition, key, value, list(headers), timestamp)
            return
        except PER_RECORD_ERRORS as exc:
            first = exc
        if timestamp is not None:
            try:  # refused for its time stamp, perhaps: the broker's time instead
                await self._send(topic, partition, key, value, list(headers), None)
                return
            except PER_RECORD_ERRORS:
                pass
        size = len(key or b"") + len(value or b"")
        letter = [
            *[(k, v) for k, v in headers if not k.startswith("streamlstm-")],
            ("streamlstm-error", f"refused by the broker: {first!r}".encode()),
            ("streamlstm-field", b"output" if topic != self._dlq else b"value"),
            ("streamlstm-refused-topic", topic.encode()),
            ("streamlstm-truncated", str(size).encode()),
        ]
        if topic == self._dlq:  # keep where a refused dead letter came from
            letter += [(k, v) for k, v in headers if k.startswith("streamlstm-source-")]
        cut_key = None if key is None else key[:256]
        cut_value = None if value is None else value[:_CUT_BYTES]
        try:
            await self._send(self._dlq, None, cut_key, cut_value, letter, None)
        except PER_RECORD_ERRORS as exc:
            raise BrokerError(
                f"the dead-letter topic {self._dlq} refuses even a 1 KiB record ({exc!r})"
            ) from exc
        self._metrics.dead_letters.labels("refused").inc()
        logger.warning("a record for %s was refused (%r); it is a dead letter now", topic, first)

    async def _send(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        timestamp: int | None,
    ) -> None:
        # A record batch of its own: through ``producer.send`` it could share a batch
        # with other records, and the broker judges (and refuses) whole batches.
        outbox = Outbox(self._producer, self._partitions)
        outbox.add(topic, key, value, headers, timestamp, partition=partition)
        try:
            (future,) = await outbox.send()
            await future
        except PER_RECORD_ERRORS:
            raise
        except KafkaError as exc:
            raise BrokerError(f"output not acknowledged, offsets not committed: {exc!r}") from exc

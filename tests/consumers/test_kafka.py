"""The lean consumer (``kafka.internals.lean_records``) against a real broker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from streamlstm.consumers.kafka.clients import client_options, ensure_topics, start_client


async def _read(bootstrap: str, topic: str, count: int, *, lean: bool) -> dict[Any, list[Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        **client_options(bootstrap),
        group_id=f"lean-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await start_client(consumer, bootstrap, lean=lean)
    polled: dict[Any, list[Any]] = {}
    try:
        for _ in range(100):
            for tp, records in (await consumer.getmany(timeout_ms=200, max_records=3)).items():
                polled.setdefault(tp, []).extend(records)
            if sum(map(len, polled.values())) >= count:
                break
    finally:
        await consumer.stop()
    return polled


def test_a_lean_consumer_reads_what_a_plain_one_reads_aborted_transactions_left_out(
    kafka_bootstrap: str,
) -> None:
    # Apache Kafka even on a Tansu suite run: transactions.
    bootstrap = kafka_bootstrap
    topic = f"lean-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[dict[Any, list[Any]], dict[Any, list[Any]]]:
        await ensure_topics(client_options(bootstrap), [topic], create=True, partitions=2)
        producer = AIOKafkaProducer(
            **client_options(bootstrap), transactional_id=f"lean-{uuid.uuid4().hex[:8]}"
        )
        await producer.start()
        try:
            for commit, tag in ((True, b"a"), (False, b"x"), (True, b"b")):
                async with producer.transaction() if commit else _Aborted(producer):
                    for i in range(4):
                        await producer.send(
                            topic, key=b"k%d" % i, value=tag + b"%d" % i, headers=[("h", tag)]
                        )
        finally:
            await producer.stop()
        return await _read(bootstrap, topic, 8, lean=True), await _read(
            bootstrap, topic, 8, lean=False
        )

    lean, plain = asyncio.run(scenario())
    assert lean.keys() == plain.keys()
    for tp, records in plain.items():
        assert all(isinstance(r, ConsumerRecord) for r in records)
        assert not any(isinstance(r, ConsumerRecord) for r in lean[tp])  # as read: no topic
        fields = [(r.offset, r.key, r.value, r.timestamp, list(r.headers)) for r in records]
        assert [(r.offset, r.key, r.value, r.timestamp, list(r.headers)) for r in lean[tp]] == (
            fields
        )
    values = sorted(r.value for records in lean.values() for r in records)
    assert values == sorted([b"a%d" % i for i in range(4)] + [b"b%d" % i for i in range(4)])


class _Aborted:
    """``async with``: a transaction that is aborted at the end."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def __aenter__(self) -> None:
        await self._producer.begin_transaction()

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.abort_transaction()


def test_a_queued_poll_is_written_to_the_broker_within_the_loops_produce_turns(
    bootstrap: str, monkeypatch: Any
) -> None:
    # The poll loop gives aiokafka's sender PRODUCE_HOPS turns of the event loop after
    # queueing a poll's output, so that the produce request is written before the next
    # poll's decoding: that many must suffice on the aiokafka installed.
    from aiokafka.conn import AIOKafkaConnection

    from streamlstm.consumers import loop
    from streamlstm.consumers.kafka.outbox import Outbox

    written: list[str] = []
    send = AIOKafkaConnection.send

    def recorded(self: Any, request: Any, expect_response: bool = True) -> Any:
        written.append(type(request).__name__)
        return send(self, request, expect_response)

    topic = f"turns-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list[str]:
        options = client_options(bootstrap)
        await ensure_topics(options, [topic], create=True, partitions=2)
        producer = AIOKafkaProducer(**options, acks="all")
        await start_client(producer, bootstrap)
        try:
            await producer.send_and_wait(topic, b"warm", key=b"k")  # metadata, connection
            monkeypatch.setattr(AIOKafkaConnection, "send", recorded)
            outbox = Outbox(producer, {topic: [0, 1]})
            outbox.add_many(topic, [b"a", b"b", b"c"], [b"1", b"2", b"3"], [None] * 3, [0] * 3)
            sends = await outbox.send()
            await loop._turns(loop.PRODUCE_HOPS)
            seen = list(written)
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        return seen

    seen = asyncio.run(scenario())
    assert any(name.startswith("ProduceRequest") for name in seen), seen

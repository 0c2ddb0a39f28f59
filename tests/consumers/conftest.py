"""The test broker: Apache Kafka (KRaft, one node), started once per session.

The jars come from Maven Central on first use (``streamlstm broker`` does the
same). ``STREAMLSTM_TEST_BROKER=tansu`` runs the suite on Tansu instead;
``STREAMLSTM_TEST_BOOTSTRAP=host:port`` on a broker already running. If the
broker cannot start, every test that needs it fails (never skips).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlstm.consumers.devtools.brokers import local_broker


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    external = os.environ.get("STREAMLSTM_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    # "kafka", not "auto": a machine without Java fails loudly instead of quietly using Tansu.
    with local_broker(broker_kind()) as broker:
        yield broker.bootstrap


def broker_kind() -> str:
    """The broker the suite starts: ``STREAMLSTM_TEST_BROKER`` (kafka by default)."""
    return os.environ.get("STREAMLSTM_TEST_BROKER", "kafka")


@pytest.fixture
def make_topics(bootstrap: str) -> Callable[..., list[str]]:
    """``make_topics("in", "out", partitions=4)``: fresh, uniquely named topics."""

    def factory(*names: str, partitions: int = 4) -> list[str]:
        suffix = uuid.uuid4().hex[:8]
        topics = [f"{name}-{suffix}" for name in names]

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
            finally:
                await admin.close()

        asyncio.run(create())
        return topics

    return factory


async def send_raw(
    bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]], **kwargs: Any
) -> list[Any]:
    """Send (key, value) pairs; returns their RecordMetadata, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_request_size=4 << 20)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k, **kwargs) for k, v in messages]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 60.0) -> list[Any]:
    """Read ``count`` messages from the start of ``topic`` (fewer if the timeout passes)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(out) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                out.extend(messages)
    finally:
        await consumer.stop()
    return out

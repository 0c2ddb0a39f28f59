"""Helpers for tests against the broker (the ``bootstrap`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


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

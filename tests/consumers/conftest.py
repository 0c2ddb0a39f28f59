"""Helpers for tests against the broker (the ``bootstrap`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlstm import Engine, StepResult


async def send_raw(
    bootstrap: str,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes | None]],
    producer_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Send (key, value) pairs; returns their RecordMetadata, in order."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=2,
        max_request_size=4 << 20,
        **(producer_options or {}),
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k, **kwargs) for k, v in messages]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def read_all(
    bootstrap: str,
    topic: str,
    count: int,
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
) -> list[Any]:
    """Read ``count`` messages from the start of ``topic`` (fewer if the timeout passes)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
        isolation_level=isolation_level,
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


class FragileEngine(Engine):
    """An engine whose step fails (``ValueError``) whenever the call holds the stream "boom"."""

    def step(self, stream_ids: Any, *args: Any, **kwargs: Any) -> StepResult:
        if "boom" in stream_ids:
            raise ValueError("kaboom")
        return super().step(stream_ids, *args, **kwargs)


def start_serve(cmd: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``streamlstm serve`` logging to a file (a pipe nobody reads would wedge it), once it
    serves; returns the process and its metrics port."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=out)
    deadline = time.monotonic() + 90
    while True:
        text = log.read_text(errors="replace")
        found = re.search(r"metrics on http://[^ ]*:(\d+)/metrics", text)
        if found:
            return proc, int(found.group(1))
        assert proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.1)


def await_answers(
    bootstrap: str,
    topic: str,
    metas: list[Any],
    timeout_s: float,
    isolation_level: str = "read_uncommitted",
) -> set[Any]:
    """Read ``topic`` again and again until every tick of ``metas`` (the input records'
    metadata) has an answer there, or ``timeout_s`` passes; the ticks answered."""
    keys = {(m.partition, m.offset) for m in metas}
    answered: set[Any] = set()
    deadline = time.monotonic() + timeout_s
    while not answered >= keys and time.monotonic() < deadline:
        read = read_all(bootstrap, topic, 10**9, timeout_s=3, isolation_level=isolation_level)
        for msg in asyncio.run(read):
            body = json.loads(msg.value)
            answered.add((body["partition"], body["offset"]))
    return answered

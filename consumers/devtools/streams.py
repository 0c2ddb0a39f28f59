"""``streamlstm streams reset|delete STREAM``: a control record, straight to Kafka.

The control (``wire.CONTROL_HEADER``) goes onto the input topic keyed by the
stream, acknowledged by every in-sync replica and sent idempotently; the
partition's owner applies it in offset order with the stream's ticks and
answers on the output topic. With ``--output-topic`` the command waits (up to
``--wait-s``) for that acknowledgement and exits 0 once it is read, 3 if it was
not in time (the control stays in the topic and will still be applied).
Anyone who may produce to the input topic may send controls, as they may send
ticks: Kafka's ACLs govern both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamlstm.consumers.codec.wire import CONTROL_HEADER, MAX_STREAM_ID_BYTES
from streamlstm.consumers.devtools.connection import add_connection_arguments, connection_options

__all__ = ["main"]

#: Exit status when the acknowledgement did not come within --wait-s.
NOT_YET = 3


def main(argv: Sequence[str]) -> int:
    """``argv``: ``["streams", OP, STREAM, options...]``, as ``streamlstm`` passes it."""
    parser = argparse.ArgumentParser(
        prog="streamlstm streams",
        description="Reset or delete one stream's state through a control record on the "
        "input topic (applied in order with its ticks).",
    )
    parser.add_argument("op", choices=["reset", "delete"])
    parser.add_argument("stream", help="the stream id (the ticks' message key)")
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", help="wait for the acknowledgement there")
    parser.add_argument("--wait-s", type=float, default=30.0, help="(default 30)")
    add_connection_arguments(parser)
    args = parser.parse_args(list(argv)[1:])  # argv[0]: the command's name, "streams"
    key = args.stream.encode()
    if not key or len(key) > MAX_STREAM_ID_BYTES:
        parser.error(f"stream: 1 to {MAX_STREAM_ID_BYTES} bytes of UTF-8")
    if not args.wait_s > 0:
        parser.error("--wait-s: must be positive")
    return asyncio.run(_run(args, key))


async def _run(args: argparse.Namespace, key: bytes) -> int:
    options = connection_options(args, "streamlstm-streams")
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    await producer.start()
    watcher = None
    try:
        if args.output_topic:
            watcher = await _watch(options, args.output_topic, producer)
        meta = await producer.send_and_wait(
            args.input_topic, b"", key=key, headers=[(CONTROL_HEADER, args.op.encode())]
        )
        sent = {"sent": args.op, "stream": args.stream, "partition": meta.partition}
        print(json.dumps({**sent, "offset": meta.offset}), flush=True)
        if watcher is None:
            return 0
        ack = await _acknowledgement(watcher, meta.partition, meta.offset, args.wait_s)
    finally:
        await producer.stop()
        if watcher is not None:
            await watcher.stop()
    if ack is None:
        print(
            f"not acknowledged within {args.wait_s:g} s (it will still be applied)",
            file=sys.stderr,
        )
        return NOT_YET
    print(json.dumps(ack))
    return 0


async def _watch(
    options: dict[str, Any], topic: str, producer: AIOKafkaProducer
) -> AIOKafkaConsumer:
    """A consumer of ``topic`` from its end now: the acknowledgement comes after."""
    numbers = await producer.partitions_for(topic)  # fetches the topic's metadata
    partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)  # fixed now, before the control is sent
    return consumer


async def _acknowledgement(
    consumer: AIOKafkaConsumer, partition: int, offset: int, wait_s: float
) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while (left := deadline - loop.time()) > 0:
        batch = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
        for records in batch.values():
            for record in records:
                try:
                    body = json.loads(record.value)
                except (TypeError, ValueError):
                    continue
                if (
                    isinstance(body, dict)
                    and "control" in body
                    and (body.get("partition"), body.get("offset")) == (partition, offset)
                ):
                    return body
    return None

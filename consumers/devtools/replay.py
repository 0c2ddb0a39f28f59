"""``streamlstm produce`` (replay a file as ticks) and ``streamlstm tail``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlstm import Bundle
from streamlstm.consumers.devtools.connection import add_connection_arguments, connection_options
from streamlstm.consumers.kafka.clients import (
    client_options,
    ensure_topics,
    partitions_of,
    start_client,
)
from streamlstm.consumers.kafka.outbox import Outbox
from streamlstm.training.data import numeric_columns, read_table, require_columns, time_values

__all__ = ["Encoded", "encode_ticks", "main", "produce_main", "replay", "tail_main"]

logger = logging.getLogger(__name__)


def produce_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="streamlstm produce", description="Replay a file as ticks."
    )
    parser.add_argument("--data", required=True, help="CSV or Parquet file")
    parser.add_argument("--topic", required=True)
    add_connection_arguments(parser)
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--features", help="comma-separated columns (default: every numeric one)")
    chosen.add_argument(
        "--model", help="a bundle directory: send exactly the features it was trained on"
    )
    parser.add_argument("--stream-column", help="column naming each row's stream")
    parser.add_argument("--stream", default="stream-0", help="stream id without --stream-column")
    parser.add_argument("--time-column", help="event-time column (epoch ms or ISO-8601)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="ticks per second, all streams together")
    pace.add_argument("--speedup", type=float, help="replay event-time gaps this many times faster")
    parser.add_argument("--limit", type=int, help="stop after this many ticks")
    parser.add_argument("--create-topic", action="store_true")
    args = parser.parse_args(list(argv))
    frame = read_table(args.data)
    times = None
    if args.time_column:
        require_columns(frame, [args.time_column], "time_column")
        parsed = time_values(frame[args.time_column])
        order = np.argsort(parsed.to_numpy(), kind="stable")
        frame, times = frame.iloc[order], parsed.to_numpy(dtype=np.float64)[order]
    skip = {args.stream_column, args.time_column}
    if args.model:
        features = _model_features(args.model)
    elif args.features:
        features = args.features.split(",")
    else:
        features = [
            c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])
        ]
    values = numeric_columns(frame, features, "features").to_numpy()
    streams = (
        frame[args.stream_column].astype(str).tolist()
        if args.stream_column
        else [args.stream] * len(frame)
    )
    if args.speedup and times is None:
        parser.error("--speedup needs --time-column")
    count = asyncio.run(
        replay(
            args.bootstrap_servers,
            args.topic,
            streams,
            values,
            times,
            rate=args.rate,
            speedup=args.speedup,
            limit=args.limit,
            create=args.create_topic,
            options=connection_options(args, "streamlstm-produce"),
        )
    )
    print(f"produced {count} ticks to {args.topic}", file=sys.stderr)
    return 0


#: As fast as possible, ticks are sent in chunks of this many.
_CHUNK = 1000
#: Least seconds between two paced sends (at most 200 produce requests/s).
_PACE_S = 0.005


async def replay(
    bootstrap: str,
    topic: str,
    streams: Sequence[str],
    values: np.ndarray,
    times: np.ndarray | None,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    create: bool = False,
    options: dict[str, Any] | None = None,
    encoded: Encoded | None = None,
) -> int:
    """Send rows as ticks, keyed by stream, paced by ``rate`` or event time / ``speedup``.

    Whatever is due is sent at once through an ``Outbox`` (one record batch
    per partition): ``producer.send`` for every message cost ~20 µs of CPU
    each, so at tens of thousands of ticks/s the generator took the CPU that
    the daemon it was measuring needed. Paced sends go out at most every
    ``_PACE_S``, without linger: with a 5 ms linger each send waited for the
    partition's previous batch to leave and then lingered itself, and at
    38k ticks/s a tick took 13.8 ms from its time stamp to the broker's
    acknowledgement (now 1.9 ms); with no linger and no pace, many tiny
    produce requests swamped the broker. Ticks without a time column carry
    the wall-clock time at which they are sent. ``encoded`` (``encode_ticks``
    of the same streams and values) moves the JSON encoding out of the sending
    (the bench's load generator encodes before its clock starts); without it,
    each send encodes its own ticks.
    """
    options = options or client_options(bootstrap)
    await ensure_topics(options, [topic], create=create, partitions=4)
    producer = AIOKafkaProducer(**options, linger_ms=0, acks="all")
    await start_client(producer, bootstrap)
    total = min(len(streams), limit or len(streams))
    partitions = await partitions_of(producer, [topic])
    # Seconds after the start at which each tick is due (None: as fast as possible).
    due_s: np.ndarray | None = None
    if rate:
        due_s = np.arange(total) / rate
    elif speedup and times is not None:
        due_s = (np.asarray(times[:total], dtype=np.float64) - times[0]) / 1000.0 / speedup
    start = time.monotonic()
    last_report = start
    last_send = -_PACE_S  # seconds after the start
    futures: list[asyncio.Future[Any]] = []
    sent = 0
    try:
        while sent < total:
            if due_s is None:
                upto = min(total, sent + _CHUNK)
            else:
                elapsed = time.monotonic() - start
                upto = int(np.searchsorted(due_s, elapsed, side="right"))
                if upto <= sent:
                    await asyncio.sleep(float(due_s[sent]) - elapsed)
                    continue
                if elapsed - last_send < _PACE_S:
                    await asyncio.sleep(last_send + _PACE_S - elapsed)
                    continue
                last_send = elapsed
                upto = min(upto, sent + _CHUNK)
            chunk = encoded or encode_ticks(streams, values, sent, upto)
            lo, hi = (sent, upto) if encoded else (0, upto - sent)
            heads, tails = chunk.heads[lo:hi], chunk.tails[lo:hi]
            if times is None:
                stamp = b"%d" % int(time.time() * 1000)
                bodies = [head + stamp + tail for head, tail in zip(heads, tails, strict=True)]
            else:
                stamps = times[sent:upto].astype(np.int64).tolist()
                bodies = [b"%b%d%b" % parts for parts in zip(heads, stamps, tails, strict=True)]
            keys: list[bytes | None] = list(chunk.keys[lo:hi])
            # A new outbox a send: an outbox keeps every batch it sent (a poll's, in the
            # daemon), and one kept for the whole replay made each send return, and the
            # generator wait on, every earlier send's futures again: quadratic, 15 us of
            # CPU a tick paced at 64k ticks/s for 7 s (5 us without; 4 encoded beforehand).
            outbox = Outbox(producer, partitions)
            outbox.add_many(topic, keys, bodies, [None] * len(keys), [-1] * len(keys))
            futures += await outbox.send()
            sent = upto
            if len(futures) >= 200:
                await asyncio.gather(*futures)
                futures.clear()
            now = time.monotonic()
            if now - last_report >= 5:
                logger.info("produced %d / %d ticks (%.0f/s)", sent, total, sent / (now - start))
                last_report = now
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return total


@dataclass(frozen=True)
class Encoded:
    """Ticks as the bytes ``replay`` sends: each one's key, and its JSON body before and
    after the time stamp (``{"stream": ..., "ts": `` and ``, "values": [...]}``), so that a
    send only splices in its time."""

    keys: list[bytes]
    heads: list[bytes]
    tails: list[bytes]


def encode_ticks(
    streams: Sequence[str], values: np.ndarray, lo: int = 0, hi: int | None = None
) -> Encoded:
    """Ticks ``lo:hi`` of ``streams`` and ``values`` encoded for ``replay``; a body is
    byte for byte ``orjson.dumps({"stream": s, "ts": ts, "values": row})``."""
    ids = streams[lo:hi]
    rows = values[lo:hi].tolist()
    return Encoded(
        [s.encode() for s in ids],
        [b'{"stream":%b,"ts":' % orjson.dumps(s) for s in ids],
        [b',"values":%b}' % orjson.dumps(row) for row in rows],
    )


def _model_features(model_dir: str) -> list[str]:
    """The input columns a bundle was trained on, in its order."""
    return list(Bundle.load(model_dir).feature_names)


def main(argv: Sequence[str]) -> int:
    """``streamlstm produce ...`` or ``streamlstm tail ...`` (``argv[0]`` names which)."""
    command, rest = argv[0], list(argv[1:])
    if command == "produce":
        return produce_main(rest)
    if command == "tail":
        return tail_main(rest)
    raise SystemExit(f"unknown command {command}")


def tail_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="streamlstm tail", description="Print messages from a topic."
    )
    parser.add_argument("--topic", required=True)
    add_connection_arguments(parser)
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--max-messages", type=int)
    parser.add_argument("--timeout-s", type=float, help="stop after this long without a message")
    args = parser.parse_args(list(argv))
    return asyncio.run(_tail(args))


async def _tail(args: argparse.Namespace) -> int:
    consumer = AIOKafkaConsumer(
        args.topic,
        **connection_options(args, "streamlstm-tail"),
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,  # print as they arrive, not up to aiokafka's 500 ms later
    )
    await start_client(consumer, args.bootstrap_servers)
    seen = 0
    try:
        while args.max_messages is None or seen < args.max_messages:
            batch = await consumer.getmany(timeout_ms=int((args.timeout_s or 3600) * 1000))
            if not batch:
                break
            for messages in batch.values():
                for msg in messages:
                    key = msg.key.decode(errors="replace") if msg.key else ""
                    print(
                        f"{key}\t{msg.value.decode(errors='replace') if msg.value else ''}",
                        flush=True,
                    )
                    seen += 1
    finally:
        await consumer.stop()
    return 0

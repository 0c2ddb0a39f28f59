"""``bench kafka``'s paced load: the generator process, the transport's own latency, and
the percentiles of a latency run.

The generator runs as ``python -m streamlstm.consumers.devtools.bench_load``, a
process of its own, so that the daemon measured does not share its event loop.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import uuid

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from streamlstm.consumers.devtools.replay import encode_ticks, replay
from streamlstm.consumers.kafka.clients import client_options, ensure_topics, start_client
from streamlstm.consumers.settings import ServeConfig

__all__ = ["WARMUP_S", "figures", "start_generator", "transport_latency"]

#: Seconds of paced load before latencies count.
WARMUP_S = 2.0


async def start_generator(
    bootstrap: str, topic: str, streams: int, rate: float, seconds: float
) -> asyncio.subprocess.Process:
    """The paced load generator (``_paced``) in a separate process, warm-up included."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamlstm.consumers.devtools.bench_load",
        bootstrap,
        topic,
        str(streams),
        str(rate),
        str(WARMUP_S + seconds),
        stdout=asyncio.subprocess.PIPE,
    )


def figures(rate: float, pairs: np.ndarray) -> dict[str, float]:
    """Percentiles of ``pairs [N, 2]`` (receive time, latency; seconds), the warm-up left out."""
    latencies_ms = pairs[pairs[:, 0] >= pairs[:, 0].min() + WARMUP_S, 1] * 1e3
    return {
        "rate_ticks_per_s": rate,
        "warmup_s": WARMUP_S,
        "ticks": int(latencies_ms.size),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
    }


async def transport_latency(
    bootstrap: str, streams: int, rate: float, seconds: float
) -> dict[str, float]:
    """Latency from event time to a plain consumer's receipt, paced as the daemon's runs."""
    topic = f"bench-transport-{uuid.uuid4().hex[:6]}"
    options = client_options(bootstrap)
    await ensure_topics(options, [topic], create=True, partitions=4)
    consumer = AIOKafkaConsumer(
        topic,
        **options,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=ServeConfig.fetch_max_wait_ms,  # as the daemon's consumer
    )
    await start_client(consumer, bootstrap)
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        proc = await start_generator(bootstrap, topic, streams, rate, seconds)
        pairs: list[tuple[float, float]] = []
        waiting = asyncio.ensure_future(proc.wait())
        idle_since = None
        while idle_since is None or time.monotonic() - idle_since < 1.0:
            records = await consumer.getmany(timeout_ms=100, max_records=1024)
            now = time.time()
            for messages in records.values():
                pairs.extend((now, now - orjson.loads(m.value)["ts"] / 1000.0) for m in messages)
            if waiting.done() and not records and idle_since is None:
                idle_since = time.monotonic()
            elif records:
                idle_since = None
        await waiting
    finally:
        await consumer.stop()
    return figures(rate, np.array(pairs))


def _paced(bootstrap: str, topic: str, streams: int, rate: float, seconds: float) -> None:
    count = int(rate * seconds)
    rng = np.random.default_rng(1)
    ids = [f"stream-{i}" for i in rng.integers(0, streams, count).tolist()]
    values = rng.standard_normal((count, 1))
    # Encoded before the clock starts, so that the generator takes as little as it
    # can of the CPU the daemon it measures shares: a send only stamps and queues.
    encoded = encode_ticks(ids, values)
    gc.freeze()
    start = time.process_time()
    asyncio.run(replay(bootstrap, topic, ids, values, None, rate=rate, encoded=encoded))
    print(time.process_time() - start, flush=True)  # CPU seconds spent sending


if __name__ == "__main__":
    _paced(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))

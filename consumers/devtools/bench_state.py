"""``bench kafka``'s durable-state figures: restore speed from a filled changelog.

Throughput with durable state is measured by ``bench.py`` beside memory-only
state (same topic, same loop, checkpoints every second). Here: a changelog
partition filled with ``streams`` states of the bench's model (one record
per stream, as compaction leaves it), then restored into a real engine child
process exactly as the daemon restores an assigned partition (read to the
end, last record per stream, bulk-load): streams per second, end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from streamlstm import Bundle, ModelConfig, StreamState
from streamlstm.consumers.durability.changelog import Changelog, ensure_changelog
from streamlstm.consumers.engine.process import ProcessClient
from streamlstm.consumers.kafka.clients import client_options, start_client
from streamlstm.consumers.kafka.outbox import Outbox
from streamlstm.consumers.observability.metrics import ServeMetrics

__all__ = ["fill_changelog", "restore_once", "run_restore_bench"]


async def fill_changelog(
    bootstrap: str, topic: str, bundle: Bundle, streams: int, *, seed: int = 0
) -> int:
    """``streams`` states of ``bundle``'s shape in partition 0 (streams ``stream-0`` on);
    returns the bytes written."""
    rng = np.random.default_rng(seed)
    sizes = bundle.config.hidden_sizes
    producer = AIOKafkaProducer(**client_options(bootstrap), acks="all", linger_ms=5)
    await start_client(producer, bootstrap)
    written = 0
    # A few distinct states, reused: building 100k StreamStates in Python would take
    # longer than the restore it prepares.
    values = [
        StreamState(
            h=tuple(rng.standard_normal(s).astype(np.float32) for s in sizes),
            c=tuple(rng.standard_normal(s).astype(np.float32) for s in sizes),
            step=100,
            offset=k,
            last_seen=1.7e9,
            partition=0,
            model=bundle.model_id,
        ).to_bytes()
        for k in range(16)
    ]
    try:
        futures: list[Any] = []
        for lo in range(0, streams, 5000):
            outbox = Outbox(producer, {})
            for i in range(lo, min(streams, lo + 5000)):
                value = values[i % len(values)]
                written += len(value)
                outbox.add(topic, f"stream-{i}".encode(), value, partition=0)
            futures += await outbox.send()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return written


async def restore_once(
    bootstrap: str, topic: str, bundle: Bundle, streams: int, state_dir: str | None = None
) -> dict[str, Any]:
    engine = ProcessClient(
        bundle,
        max_streams=max(streams, 1024),
        idle_ttl_s=None,
        state_dir=state_dir,
        local_checkpoint_topic=topic if state_dir else None,
    )
    await engine.start()
    try:
        metrics = ServeMetrics(CollectorRegistry())
        changelog = Changelog(
            client_options(bootstrap),
            topic,
            engine=engine,
            metrics=metrics,
            swap_state="reset",
            isolation_level="read_committed",
            local=state_dir is not None,
        )
        started = time.perf_counter()
        await changelog.restore([0])
        seconds = time.perf_counter() - started
        assert engine.stats is not None
        loaded = engine.stats.active_streams
    finally:
        await engine.close()
    return {"restored_streams": loaded, "restore_seconds": round(seconds, 3)}


def run_restore_bench(
    bootstrap: str, bundle: Bundle, streams: int, *, repeat: int = 1
) -> dict[str, Any]:
    """Restore speed of ``streams`` states from one changelog partition (streams/s); the
    fastest of ``repeat`` restores (a fresh engine child each) counts."""
    topic = f"bench-changelog-{uuid.uuid4().hex[:6]}"
    asyncio.run(
        ensure_changelog(client_options(bootstrap), topic, partitions=1, replication_factor=1)
    )
    size = asyncio.run(fill_changelog(bootstrap, topic, bundle, streams))
    runs = [asyncio.run(restore_once(bootstrap, topic, bundle, streams)) for _ in range(repeat)]
    result = min(runs, key=lambda run: float(run["restore_seconds"]))
    result["restore_runs_seconds"] = [run["restore_seconds"] for run in runs]
    result["restore_bytes"] = size
    result["restore_streams_per_s"] = round(streams / max(result["restore_seconds"], 1e-9))
    return result


def main(argv: Sequence[str]) -> int:
    """The restore figure alone (``bench kafka`` measures it after the drains and before
    the latency runs): ``python -m streamlstm.consumers.devtools.bench_state``."""
    parser = argparse.ArgumentParser(prog="python -m streamlstm.consumers.devtools.bench_state")
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="restores of one filled topic")
    args = parser.parse_args(list(argv))
    # The bench's model (bench.run_kafka_bench): states of about 2 KiB.
    bundle = Bundle.random(ModelConfig(input_size=1), seed=0)
    result = run_restore_bench(args.bootstrap_servers, bundle, args.streams, repeat=args.repeat)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

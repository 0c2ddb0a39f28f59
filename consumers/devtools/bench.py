"""``streamlstm bench kafka``: end to end through a broker, beside a passthrough.

Both runs use the same daemon loop, batching, encoding and producing; the
passthrough only skips the engine step. Throughput is measured on a
pre-filled input topic (the best of ``--drains`` drains per kind, taking
turns); latency (event time to acknowledged prediction) with
a producer in a separate process pacing ticks at half the measured maximum
(and at ``--latency-rate`` where given). A third latency, the transport's
(event time to a plain consumer receiving the tick, no daemon), shows what the
generator and the broker alone cost; the daemon-added latency (receipt of a
poll to the acknowledgement of its predictions) what the daemon adds.

Beside each figure, the CPU each process spent per tick (daemon parent,
engine child, broker, load generator; utime + stime from /proc): on a shared
machine, throughput says little without it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from streamlstm import Bundle, ModelConfig
from streamlstm.consumers.devtools.bench_report import (
    Passthrough,
    Watched,
    broker_pids,
    cpu_per_tick,
    cpu_seconds,
    report,
)
from streamlstm.consumers.devtools.bench_state import run_restore_bench
from streamlstm.consumers.devtools.brokers import describe, local_broker
from streamlstm.consumers.devtools.replay import encode_ticks, replay
from streamlstm.consumers.engine_process import (
    EngineFactory,
    default_engine,
)
from streamlstm.consumers.kafka import client_options, ensure_topics, start_client
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig

__all__ = ["main"]

#: Seconds of paced load before latencies count.
WARMUP_S = 2.0


def _progress(message: str) -> None:
    print(f"[bench kafka] {message}", file=sys.stderr, flush=True)


def _config(bootstrap: str, src: str, out: str, max_records: int, **overrides: Any) -> ServeConfig:
    # Memory-only unless a kind asks for durable state: the baseline the others are put beside.
    return ServeConfig(
        **{"state": "memory", **overrides},
        model="(in memory)",
        bootstrap_servers=bootstrap,
        input_topic=src,
        output_topic=out,
        dlq_topic=f"{src}-dlq",
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        metrics_port=0,
        max_records=max_records,
        create_topics=True,
        metrics_interval_s=3600,
    )


async def _drain(
    kind: EngineFactory,
    config: ServeConfig,
    bundle: Bundle,
    total: int,
    others: dict[str, list[int]],
) -> tuple[float, dict[str, float]]:
    """Ticks/s to answer a pre-filled topic of ``total`` ticks, and CPU µs per tick of each
    process (from the first tick to the last prediction)."""
    watched = Watched(kind)
    async with Server(config, bundle=bundle, engine=watched) as server:
        start = None
        before: dict[str, float] = {}
        pids = watched.pids(others)
        while server.totals.get("predictions", 0) < total:
            if start is None and server.totals.get("ticks", 0):
                start = time.perf_counter()
                pids = watched.pids(others)
                before = {name: cpu_seconds(group) for name, group in pids.items()}
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - (start or time.perf_counter())
        cpu = cpu_per_tick(before, pids, total)
        server.request_stop()
        await server.wait()
    return total / max(elapsed, 1e-9), cpu


def _prefill(bootstrap: str, topic: str, streams: int, total: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = [f"stream-{i}" for i in rng.permutation(np.resize(np.arange(streams), total)).tolist()]
    values = rng.standard_normal((total, 1))
    asyncio.run(replay(bootstrap, topic, ids, values, None, create=True))


async def _latency(
    kind: EngineFactory,
    config: ServeConfig,
    bundle: Bundle,
    streams: int,
    rate: float,
    seconds: float,
    others: dict[str, list[int]],
) -> dict[str, Any]:
    """Latency of ticks paced at ``rate`` for ``WARMUP_S + seconds``, the warm-up left out.

    In the warm-up most of the streams tick for the first time (the state
    store grows, new batch shapes get their kernels).
    """
    watched = Watched(kind)
    async with Server(config, bundle=bundle, engine=watched) as server:
        while not server.ready():
            await asyncio.sleep(0.05)
        proc = await _start_generator(
            config.bootstrap_servers, config.input_topic, streams, rate, seconds
        )
        pids = watched.pids(others)
        before = {name: cpu_seconds(group) for name, group in pids.items()}
        out, _ = await proc.communicate()
        await asyncio.sleep(1.0)
        ticks = int(rate * (WARMUP_S + seconds))
        cpu = cpu_per_tick(before, pids, ticks)
        # The generator's own figure: its CPU while sending, not while importing.
        cpu["load_generator"] = round(float(out.split()[-1]) * 1e6 / max(ticks, 1), 2)
        pairs = np.concatenate(list(server.recent_event_latency))
        added = np.concatenate(list(server.reporter.recent_daemon_latency))
        server.request_stop()
        await server.wait()
    figures = _figures(rate, pairs)
    daemon = _figures(rate, added)
    figures.update(daemon_p50_ms=daemon["p50_ms"], daemon_p99_ms=daemon["p99_ms"])
    return {**figures, "cpu_us_per_tick": cpu}


async def _transport_latency(
    bootstrap: str, streams: int, rate: float, seconds: float
) -> dict[str, float]:
    """Latency from event time to a plain consumer's receipt, paced as ``_latency``."""
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
        proc = await _start_generator(bootstrap, topic, streams, rate, seconds)
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
    return _figures(rate, np.array(pairs))


async def _start_generator(
    bootstrap: str, topic: str, streams: int, rate: float, seconds: float
) -> asyncio.subprocess.Process:
    """The paced load generator (``_paced``) in a separate process, warm-up included."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamlstm.consumers.devtools.bench",
        "_paced",
        bootstrap,
        topic,
        str(streams),
        str(rate),
        str(WARMUP_S + seconds),
        stdout=asyncio.subprocess.PIPE,
    )


def _figures(rate: float, pairs: np.ndarray) -> dict[str, float]:
    """Percentiles of ``pairs [N, 2]`` (receive time, latency; seconds), the warm-up left out."""
    latencies_ms = pairs[pairs[:, 0] >= pairs[:, 0].min() + WARMUP_S, 1] * 1e3
    return {
        "rate_ticks_per_s": rate,
        "warmup_s": WARMUP_S,
        "ticks": int(latencies_ms.size),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
    }


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


def run_kafka_bench(
    bootstrap: str,
    *,
    streams: int,
    ticks: int,
    max_records: int,
    latency_seconds: float,
    latency_rate: float | None = None,
    drains: int = 2,
    restore_streams: int = 0,
    broker_pids: Sequence[int] = (),
) -> dict[str, Any]:
    bundle = Bundle.random(ModelConfig(input_size=1), seed=0)
    result: dict[str, Any] = {
        "streams": streams,
        "ticks": ticks,
        "max_records": max_records,
        # The daemon, the broker and the load generator share these (see the module docstring).
        "cpu_cores": os.cpu_count(),
    }
    # One input topic, read by both runs through separate consumer groups.
    src = f"bench-in-{uuid.uuid4().hex[:6]}"
    _progress(f"filling {src} with {ticks} ticks of {streams} streams")
    _prefill(bootstrap, src, streams, ticks, seed=0)
    # The best of ``drains`` rounds, the two kinds taking turns: a drain of
    # 100k ticks lasts about a second, and one disturbed by the machine's other
    # tenants once measured the engine at 0.60x where undisturbed rounds gave 0.79-0.85x.
    # "durable" is the engine with durable state: checkpoints to a changelog every second.
    durable = {"state": "durable", "commit_interval_ms": 1000}
    kinds: list[tuple[str, EngineFactory, dict[str, Any]]] = [
        ("passthrough", Passthrough, {}),
        ("engine", default_engine, {}),
        ("durable", default_engine, durable),
        ("exactly_once", default_engine, {**durable, "guarantee": "exactly-once"}),
    ]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in kinds}
    drain_cpu: dict[str, dict[str, float]] = {}
    others = {"broker": list(broker_pids)} if broker_pids else {}
    for round_ in range(1, drains + 1):
        for name, kind, overrides in kinds:
            out = f"bench-out-{name}-{uuid.uuid4().hex[:6]}"
            _progress(f"{name}: draining {src} through the daemon ({round_}/{drains})")
            config = _config(bootstrap, src, out, max_records, **overrides)
            rate, cpu = asyncio.run(_drain(kind, config, bundle, ticks, others))
            runs[name].append(rate)
            if rate >= max(runs[name]):
                drain_cpu[name] = cpu  # of the best drain, as the rate reported
    rates = {name: max(each) for name, each in runs.items()}
    result["drain_cpu_us_per_tick"] = drain_cpu
    result["drains"] = {name: [round(r) for r in each] for name, each in runs.items()}
    result["passthrough_ticks_per_s"] = round(rates["passthrough"])
    result["engine_ticks_per_s"] = round(rates["engine"])
    result["engine_over_passthrough"] = round(rates["engine"] / rates["passthrough"], 3)
    result["durable_ticks_per_s"] = round(rates["durable"])
    result["durable_over_engine"] = round(rates["durable"] / rates["engine"], 3)
    result["exactly_once_ticks_per_s"] = round(rates["exactly_once"])
    result["exactly_once_over_engine"] = round(rates["exactly_once"] / rates["engine"], 3)
    if restore_streams:
        _progress(f"restore: {restore_streams} streams from one changelog partition")
        result.update(run_restore_bench(bootstrap, bundle, restore_streams))
    half = rates["engine"] / 2
    # At --latency-rate where given (a rate that runs can compare), and at half the maximum.
    paced = [("", latency_rate), ("half_max_", half)] if latency_rate else [("", half)]
    for label, rate in paced:
        # The passthrough at the same rate shows what the generator, the broker and
        # the loop cost on this machine; the difference is the engine's.
        for name, kind in (("engine", default_engine), ("passthrough", Passthrough)):
            src, out = f"bench-lat-{uuid.uuid4().hex[:6]}", f"bench-lat-out-{uuid.uuid4().hex[:6]}"
            _progress(f"{name} latency: {rate:.0f} ticks/s for {latency_seconds:.0f} s")
            # The server creates its topics (create_topics=True) before the paced producer.
            config = _config(bootstrap, src, out, max_records)
            result[f"{label}{name}_latency"] = asyncio.run(
                _latency(kind, config, bundle, streams, rate, latency_seconds, others)
            )
        _progress(f"transport latency (no daemon): {rate:.0f} ticks/s for {latency_seconds:.0f} s")
        result[f"{label}transport_latency"] = asyncio.run(
            _transport_latency(bootstrap, streams, rate, latency_seconds)
        )
    result["latency_rate_is_half_max"] = latency_rate is None
    return result


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm bench kafka")
    parser.add_argument(
        "--bootstrap-servers", help="an existing broker (default: start a local one)"
    )
    parser.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        default="kafka",
        help="the local broker to start without --bootstrap-servers (default: %(default)s)",
    )
    parser.add_argument("--streams", type=int, default=10_000)
    # Drains of a few seconds: durable state checkpoints every second, and a drain of
    # 100k ticks (under a second) measured it with no checkpoint or one.
    parser.add_argument("--ticks", type=int, default=400_000, help="ticks per drain")
    parser.add_argument("--max-records", type=int, default=1024)
    parser.add_argument(
        "--drains",
        type=int,
        default=2,
        help="drains of the filled topic per kind; the best counts (default: 2)",
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="ticks/s for the latency run (default: half the measured end-to-end maximum)",
    )
    parser.add_argument(
        "--restore-streams",
        type=int,
        default=100_000,
        help="streams restored from a changelog for the restore speed (0 skips it)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))
    if args.drains < 1:
        parser.error("--drains: must be at least 1")
    broker = None if args.bootstrap_servers else local_broker(args.broker).start()
    try:
        if broker is not None:
            _progress(f"local broker: {describe(broker)}")
        bootstrap = args.bootstrap_servers or broker.bootstrap  # type: ignore[union-attr]
        result = run_kafka_bench(
            bootstrap,
            streams=args.streams,
            ticks=args.ticks,
            max_records=args.max_records,
            latency_seconds=args.latency_seconds,
            latency_rate=args.latency_rate,
            drains=args.drains,
            restore_streams=args.restore_streams,
            broker_pids=broker_pids(broker, bootstrap),
        )
        result["broker"] = describe(broker) if broker is not None else args.bootstrap_servers
    finally:
        if broker is not None:
            broker.stop()
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result, args.drains))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "_paced":
        _paced(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    else:
        sys.exit(main(sys.argv[1:]))

"""``streamlstm demo``: broker, training, serving, replay and live output, locally.

Runs until Ctrl-C, or for about ``DEMO_DURATION_S`` seconds when that is set,
then prints a summary (ticks/s, latency p50/p99, MAE against the truth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamlstm.consumers.devtools.apache_kafka import KafkaCluster
from streamlstm.consumers.devtools.brokers import describe, local_broker
from streamlstm.consumers.devtools.tansu import free_port
from streamlstm.consumers.kafka.clients import client_options, ensure_topics
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig
from streamlstm.training.train import TrainOptions

__all__ = ["main"]

STREAMS = 8
PERIOD = 25
BASE_TS = 1_700_000_000_000


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def synthetic(streams: int = STREAMS, length: int = 800, seed: int = 0) -> pd.DataFrame:
    """Noisy seasonal load curves, one per machine, with different phases and levels."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(streams):
        t = np.arange(length)
        level = rng.uniform(5, 15)
        value = (
            level
            + 3 * np.sin(2 * np.pi * t / PERIOD + rng.uniform(0, 6))
            + 0.2 * rng.normal(size=length)
        )
        frames.append(pd.DataFrame({"machine": f"machine-{s}", "t": t, "load": value}))
    return pd.concat(frames, ignore_index=True)


def train_options() -> TrainOptions:
    """The demo's small stateful model for :func:`synthetic` data."""
    return TrainOptions(
        features=("load",),
        stream_column="machine",
        time_column="t",
        hidden_size=32,
        seq_len=30,
        epochs=25,
        lr=3e-3,
        progress=False,
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm demo")
    parser.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default=os.environ.get("STREAMLSTM_DEMO_BROKER", "tansu"),
        help="tansu starts at once; kafka is Apache Kafka (Java; jars downloaded once) "
        "[env STREAMLSTM_DEMO_BROKER] (default: %(default)s)",
    )
    args = parser.parse_args(list(argv)[1:] if argv[:1] == ["demo"] else list(argv))
    logging.getLogger().setLevel(logging.WARNING)
    duration = float(os.environ.get("DEMO_DURATION_S", "0") or 0)
    return asyncio.run(_demo(duration, args.broker))


async def _demo(duration: float, broker_kind: str) -> int:
    from streamlstm.training.train import train

    workdir = Path("demo-out")
    workdir.mkdir(exist_ok=True)
    frame = synthetic()
    frame.to_csv(workdir / "machines.csv", index=False)
    _say(f"training a small stateful model on {workdir / 'machines.csv'} ({STREAMS} streams)")
    opts = train_options()
    bundle = await asyncio.to_thread(train, frame, opts)
    bundle.save(workdir / "model")
    m = bundle.metrics
    _say(f"test RMSE {m['rmse']:.3f} vs persistence {m['persistence_rmse']:.3f}")
    broker = local_broker(broker_kind).start()
    _say(f"{describe(broker)} on {broker.bootstrap}")
    try:
        tansu = not isinstance(broker, KafkaCluster)
        return await _serve_and_replay(broker.bootstrap, workdir, frame, duration, tansu)
    finally:
        broker.stop()


async def _serve_and_replay(
    bootstrap: str, workdir: Path, frame: pd.DataFrame, duration: float, bootstrap_is_tansu: bool
) -> int:
    port = free_port()
    config = ServeConfig(
        model=str(workdir / "model"),
        bootstrap_servers=bootstrap,
        input_topic="ticks",
        output_topic="predictions",
        metrics_topic="streamlstm-metrics",
        create_topics=True,
        metrics_port=port,
        metrics_interval_s=5,
        group_id="demo",
        # Tansu has no compaction or topic configs: durable state needs Apache Kafka.
        state="memory" if bootstrap_is_tansu else "durable",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    values = {str(s): g.sort_values("t")["load"].to_numpy() for s, g in frame.groupby("machine")}
    stats: dict[str, Any] = {"errors": [], "latency": [], "shown": 0, "predictions": 0}
    sent_at: dict[tuple[str, int], float] = {}  # (stream, ts) -> when the tick was sent
    async with Server(config) as server:
        _say(f"serving; metrics at http://127.0.0.1:{port}/metrics (Ctrl-C to stop)")
        started = time.monotonic()
        tasks = [
            asyncio.create_task(_replay(bootstrap, values, stop, sent_at)),
            asyncio.create_task(_watch(bootstrap, values, stats, stop, sent_at)),
        ]
        await stop.wait()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        server.request_stop()
        await server.wait()
        totals = server.totals
    lat = np.array(stats["latency"]) if stats["latency"] else np.zeros(1)
    errors = np.abs(np.array(stats["errors"])) if stats["errors"] else np.zeros(1)
    _say("summary")
    ticks = totals.get("ticks", 0)
    print(f"  ticks served        {ticks} ({ticks / elapsed:.1f} ticks/s)")
    print(
        f"  delivery p50 / p99  {np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} ms "
        "(tick sent to prediction read here)"
    )
    print(f"  MAE against truth   {errors.mean():.3f} over {len(stats['errors'])} forecasts")
    return 0


async def _replay(
    bootstrap: str,
    values: dict[str, np.ndarray],
    stop: asyncio.Event,
    sent_at: dict[tuple[str, int], float],
) -> None:
    producer = AIOKafkaProducer(**client_options(bootstrap), linger_ms=5)
    await producer.start()
    try:
        i = 0
        length = min(len(v) for v in values.values())
        while not stop.is_set():
            index = i % length
            for stream, series in values.items():
                body = {
                    "stream": stream,
                    "ts": BASE_TS + i * 1000,
                    "values": [float(series[index])],
                    "reset": index == 0 and i > 0,
                }
                sent_at[(stream, BASE_TS + i * 1000)] = time.time()
                await producer.send("ticks", json.dumps(body).encode(), key=stream.encode())
            i += 1
            await asyncio.sleep(0.02)
    finally:
        await producer.stop()


async def _watch(
    bootstrap: str,
    values: dict[str, np.ndarray],
    stats: dict[str, Any],
    stop: asyncio.Event,
    sent_at: dict[tuple[str, int], float],
) -> None:
    await ensure_topics(client_options(bootstrap), ["predictions"], create=True, partitions=4)
    consumer = AIOKafkaConsumer(
        "predictions",
        **client_options(bootstrap),
        auto_offset_reset="earliest",
        # aiokafka's default (500 ms) is how long an idle fetch may wait: the
        # delivery figure would measure that, not the pipeline.
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    length = min(len(v) for v in values.values())
    last_shown = 0.0
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for messages in batch.values():
                for msg in messages:
                    body = json.loads(msg.value)
                    i = (body["ts"] - BASE_TS) // 1000
                    # The output's record time is the tick's event time (synthetic here):
                    # the delivery figure runs from when the tick was sent.
                    sent = sent_at.pop((body["stream"], body["ts"]), None)
                    if sent is not None:
                        stats["latency"].append((now - sent) * 1000)
                    nxt = (i + 1) % length
                    if nxt and body["ready"]:
                        stats["errors"].append(body["prediction"][0] - values[body["stream"]][nxt])
                    if now - last_shown > 1.0 and body["ready"]:
                        truth = values[body["stream"]][nxt]
                        print(
                            f"  {body['stream']:<10} step {body['step']:>5}  forecast "
                            f"{body['prediction'][0]:7.3f}  next actual {truth:7.3f}",
                            flush=True,
                        )
                        last_shown = now
    finally:
        await consumer.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Serving the test model against the test broker: the model, ticks, configs, the
daemon's command line, what it committed and exposes, and the oracle's answers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streamlstm import Affine, Bundle, Engine, ModelConfig
from streamlstm.consumers.settings import ServeConfig
from tests.conftest import default_state
from tests.consumers.conftest import await_answers, read_all
from tests.helpers.polling import wait_for
from tests.streamlstm.oracle import expected_outputs

#: A plausible event time (epoch ms, Nov 2023): times in seconds are refused.
EPOCH_MS = 1_700_000_000_000

Tick = tuple[str, list[float], bool]


def saved_bundle(tmp_path: Path, cell: str = "lstm") -> Path:
    """The serving tests' model (2 inputs, 1 output, scaled; an LSTM unless ``cell``
    says), saved under ``tmp_path``."""
    cfg = ModelConfig(
        input_size=2, hidden_sizes=(16, 16), head_sizes=(8,), output_size=1, cell=cell
    )
    bundle = Bundle.random(
        cfg,
        seed=3,
        input_scaler=Affine.from_min_max([-10.0, 0.0], [10.0, 100.0]),
        target_scaler=Affine.from_min_max([0.0], [5.0]),
    )
    return bundle.save(tmp_path / "model")


def random_ticks(rng: np.random.Generator, streams: int, n: int) -> list[Tick]:
    """``n`` ticks (stream, values, reset) over ``streams`` streams, 2% of them resets."""
    out = []
    for _ in range(n):
        stream = f"sensor-{int(rng.integers(0, streams))}"
        values = [float(rng.normal() * 5), float(rng.uniform(0, 100))]
        out.append((stream, values, bool(rng.random() < 0.02)))
    return out


def tick_messages(ticks: list[Tick], start: int) -> list[tuple[bytes | None, bytes | None]]:
    """The ticks as (key, value) messages, event times from ``EPOCH_MS + start`` on."""
    return [
        (s.encode(), json.dumps({"values": v, "ts": EPOCH_MS + start + i, "reset": r}).encode())
        for i, (s, v, r) in enumerate(ticks)
    ]


def serve_config(
    model_dir: Path, bootstrap: str, src: str, out: str, dlq: str, **overrides: Any
) -> ServeConfig:
    """A config for ``src -> out`` in a fresh group, metrics on a free port."""
    return ServeConfig(
        model=str(model_dir),
        bootstrap_servers=bootstrap,
        input_topic=src,
        output_topic=out,
        dlq_topic=dlq,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        metrics_port=0,
        **{"state": default_state(), **overrides},
    )


def serve_cmd(
    model_dir: Path, bootstrap: str, src: str, out: str, dlq: str, group: str
) -> list[str]:
    """``streamlstm serve`` for ``src -> out`` in ``group`` (a later ``--state`` wins)."""
    return [
        sys.executable,
        "-m",
        "streamlstm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--bootstrap-servers",
        bootstrap,
        "--input-topic",
        src,
        "--output-topic",
        out,
        "--dlq-topic",
        dlq,
        "--group-id",
        group,
        "--metrics-port",
        "0",
        "--max-records",
        "64",
        "--state",  # a later --state of the caller's wins
        default_state(),
    ]


async def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int = 4
) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` that has one."""
    # OffsetFetch through a consumer that never joins: the admin client's
    # list_consumer_group_offsets does not decode Tansu's answer.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, p))
            if offset is not None:
                out[p] = offset
        return out
    finally:
        await consumer.stop()


def end_offsets(metas: list[Any]) -> dict[int, int]:
    """Per partition: the offset after the last of the sent records (``metas``)."""
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return ends


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` from the daemon's HTTP port: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return int(head.split()[1]), body


def metric_total(text: str, name: str) -> float:
    """The sum of a counter's ``_total`` samples (all labels) in a /metrics page; 0 if absent."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
        if s.name.endswith("_total")
    )


def scraped_total(port: int, name: str) -> float:
    """``metric_total`` of the daemon's /metrics now (0 if it does not answer)."""
    try:
        status, text = asyncio.run(http_get(port, "/metrics"))
    except OSError:
        return 0.0
    return metric_total(text, name) if status == 200 else 0.0


def engine_child_pid(pid: int) -> int:
    """The daemon's engine child (its one child process)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    assert len(children) == 1, children
    return children[0]


def oracle_predictions(
    bundle_dir: Path,
    ticks: list[Tick],
    metas: list[Any],
    valid_mask: list[bool],
) -> dict[tuple[int, int], float]:
    """(partition, offset) of every valid tick -> the oracle's prediction."""
    bundle = Bundle.load(bundle_dir)
    valid = [meta for meta, ok in zip(metas, valid_mask, strict=True) if ok]
    assert len(valid) == len(ticks)
    ids = [t[0] for t in ticks]
    x = np.array([t[1] for t in ticks], np.float32)
    want, _ = expected_outputs(bundle, ids, x, [t[2] for t in ticks])
    return {(meta.partition, meta.offset): float(want[i, 0]) for i, meta in enumerate(valid)}


def check_against_oracle(
    model_dir: Path,
    ticks: list[Tick],
    metas: list[Any],
    outputs: list[Any],
    atol: float = 1e-5,
) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Every tick answered; every answer (repeats included) equals the oracle over the whole
    history of its stream, to ``atol`` (float32 steps summed in another order: pass a
    larger one for predictions in the hundreds); returns the answers by (partition, offset)."""
    bundle = Bundle.load(model_dir)
    want, steps = expected_outputs(
        bundle,
        [t[0] for t in ticks],
        np.array([t[1] for t in ticks], np.float32),
        [t[2] for t in ticks],
    )
    by_tick: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for msg in outputs:
        body = json.loads(msg.value)
        by_tick[(body["partition"], body["offset"])].append(body)
    index = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    assert set(by_tick) == set(index), "a tick without a prediction, or one for no tick"
    for key, answers in by_tick.items():
        i = index[key]
        for body in answers:
            assert abs(body["prediction"][0] - float(want[i, 0])) <= atol, (key, body, want[i])
            assert body["step"] == int(steps[i]), (key, body["step"], steps[i])
    return by_tick


def check_scores_against_replay(
    model_dir: Path,
    ticks: list[Tick],
    metas: list[Any],
    by_tick: dict[tuple[int, int], list[dict[str, Any]]],
) -> int:
    """Every answer's anomaly score (repeats included) equals that of one uninterrupted
    in-process ``Engine`` fed the same ticks in order: the score's own state (each
    stream's residual mean and variance) went through every restart with the stream's
    ``h``. Returns how many scores were compared (``None`` where the replay has none)."""
    replay = Engine(Bundle.load(model_dir)).step(
        [t[0] for t in ticks],
        np.array([t[1] for t in ticks], np.float32),
        resets=[t[2] for t in ticks],
    )
    index = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    compared = 0
    for key, answers in by_tick.items():
        want = float(replay.scores[index[key]])
        for body in answers:
            if math.isnan(want):
                assert body["score"] is None, (key, body)
                continue
            got = body["score"]
            close = got is not None and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4)
            assert close, (key, body, want)
            compared += 1
    return compared


def wait_checkpointed(port: int, checkpoints: float = 1, timeout_s: float = 60) -> None:
    """Until the daemon's /metrics counts ``checkpoints`` durable checkpoints committed."""
    name = "streamlstm_checkpoints"
    what = f"{checkpoints:g} checkpoints"
    wait_for(lambda: scraped_total(port, name) >= checkpoints, timeout_s, what)


def wait_consumed(port: int, ticks: float, timeout_s: float = 60) -> None:
    """Until the daemon's /metrics counts ``ticks`` consumed messages (or more)."""
    name = "streamlstm_ticks_consumed"
    wait_for(lambda: scraped_total(port, name) >= ticks, timeout_s, f"{ticks:g} ticks consumed")


def read_answers(
    bootstrap: str, topic: str, metas: list[Any], guarantee: str, group: str, src: str
) -> list[Any]:
    """Wait until every tick is answered and the group committed them all (nothing is
    answered again after that), then every answer (only the committed ones in
    exactly-once mode: what a read_committed consumer sees)."""
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
    await_answers(bootstrap, topic, metas, timeout_s=180, isolation_level=isolation)
    ends = end_offsets(metas)

    def committed() -> bool:
        return asyncio.run(committed_offsets(bootstrap, group, src, max(ends) + 1)) == ends

    wait_for(committed, 60, f"the commit of {ends}")
    return asyncio.run(read_all(bootstrap, topic, 10**9, timeout_s=5, isolation_level=isolation))

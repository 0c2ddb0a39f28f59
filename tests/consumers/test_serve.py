"""The daemon against a real broker: nothing lost, answers equal the oracle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from streamlstm import BrokerError, BundleError
from streamlstm.consumers.batch_sizing import FLOOR
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig
from streamlstm.kernels import native_available
from tests.consumers.conftest import read_all, send_raw, start_serve
from tests.helpers.polling import await_for, wait_for
from tests.helpers.serving import (
    EPOCH_MS,
    check_against_oracle,
    committed_offsets,
    http_get,
    metric_total,
    oracle_predictions,
    random_ticks,
    saved_bundle,
    serve_cmd,
    serve_config,
    tick_messages,
)

BAD: list[tuple[bytes | None, bytes | None, str]] = [
    (b"sensor-1", b"{not json", "value"),
    (None, b'{"values": [1.0, 2.0]}', "stream"),
    (b"sensor-2", b'{"stream": "sensor-3", "values": [1.0, 2.0]}', "stream"),
    (b"sensor-4", b'{"values": [1.0]}', "values"),
    (b"sensor-5", b'{"values": [NaN, 2.0]}', "values"),
    (b"sensor-6", b'{"values": ["a", 2.0]}', "values"),
    (b"sensor-7", b'{"values": [1.0, 2.0], "pad": "' + b"x" * 1_000_000 + b'"}', "value"),
    (b"sensor-8", b'{"values": [1e39, 2.0]}', "values"),
    (b"sensor-9", b'{"values": [1.0, 2.0], "ts": "yesterday"}', "ts"),
    (b"sensor-10", b"[1, 2]", "value"),
]


def _messages(
    ticks: list[tuple[str, list[float], bool]], rng: np.random.Generator
) -> tuple[list[tuple[bytes | None, bytes | None]], list[bool]]:
    """The ticks as messages with the bad ones mixed in, and which messages are ticks."""
    msgs: list[tuple[bytes | None, bytes | None]] = []
    valid: list[bool] = []
    bad_at = set(rng.choice(len(ticks), len(BAD), replace=False).tolist())
    bad = iter(BAD)
    for i, (stream, values, reset) in enumerate(ticks):
        if i in bad_at:
            key, value, _ = next(bad)
            msgs.append((key, value))
            valid.append(False)
        body: dict[str, Any] = {"ts": 1_700_000_000_000 + i, "values": values}
        if reset:
            body["reset"] = True
        if i % 3:
            body["stream"] = stream
        msgs.append((stream.encode(), json.dumps(body).encode()))
        valid.append(True)
    return msgs, valid


async def _counted(port: int, predictions: int, dead_letters: int) -> bool:
    """/metrics counts at least these many acknowledged predictions and dead letters."""
    _, page = await http_get(port, "/metrics")
    return (
        metric_total(page, "streamlstm_predictions_produced") >= predictions
        and metric_total(page, "streamlstm_dead_letters") >= dead_letters
    )


def test_every_tick_answered_once_and_equal_to_the_oracle(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq, metrics_topic = make_topics("ticks", "preds", "dlq", "metrics", partitions=4)
    ticks = random_ticks(rng, streams=300, n=2500)
    msgs, valid_mask = _messages(ticks, rng)
    config = serve_config(
        model_dir,
        bootstrap,
        src,
        out,
        dlq,
        metrics_topic=metrics_topic,
        max_records=300,
        metrics_interval_s=0.5,
    )

    async def scenario() -> tuple[list[Any], list[Any], list[Any], dict[int, int], str, list[Any]]:
        async with Server(config) as server:
            metas = await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, len(ticks), timeout_s=90)
            dead = await read_all(bootstrap, dlq, len(BAD), timeout_s=30)
            # The counters count acknowledged sends, which a reader can see first.
            await await_for(
                lambda: _counted(server.metrics_port, len(ticks), len(BAD)), 30, "/metrics"
            )
            assert await read_all(bootstrap, metrics_topic, 1, timeout_s=30)  # one summary
            status, _ = await http_get(server.metrics_port, "/readyz")
            assert status == 200
            assert (await http_get(server.metrics_port, "/healthz"))[0] == 200
            _, text = await http_get(server.metrics_port, "/metrics")
            # The parent read bundle.json only: the weights live in the engine child.
            assert not server.bundle.weights_loaded
            server.request_stop()
            await server.wait()
        summaries = await read_all(bootstrap, metrics_topic, 1, timeout_s=10)
        committed = await committed_offsets(bootstrap, config.group_id, src)
        return metas, outputs, dead, committed, text, summaries

    metas, outputs, dead, committed, text, summaries = asyncio.run(scenario())

    expected = oracle_predictions(model_dir, ticks, metas, valid_mask)
    got: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    kafka_default = DefaultPartitioner()
    for msg in outputs:
        body = json.loads(msg.value)
        assert msg.key.decode() == body["stream"]
        # Keyed as any Kafka client would key it: a stream's outputs share a partition.
        assert msg.partition == kafka_default(msg.key, [0, 1, 2, 3], [0, 1, 2, 3])
        got[(body["partition"], body["offset"])].append(body)
    assert set(got) == set(expected)
    assert all(len(v) == 1 for v in got.values())
    worst = max(abs(got[k][0]["prediction"][0] - v) for k, v in expected.items())
    assert worst <= 1e-5

    # Each dead letter: the original bytes, the field at fault, and where it came from.
    sent_at = {m[1]: meta for m, meta, ok in zip(msgs, metas, valid_mask, strict=True) if not ok}
    field_of: dict[bytes | None, str] = {value: field for _, value, field in BAD}
    assert sorted(m.value or b"" for m in dead) == sorted(v or b"" for v in field_of)
    for msg in dead:
        headers = dict(msg.headers)
        assert headers["streamlstm-field"].decode() == field_of[msg.value]
        assert headers["streamlstm-error"]
        assert headers["streamlstm-source-topic"].decode() == src
        origin = sent_at[msg.value]
        assert int(headers["streamlstm-source-partition"]) == origin.partition
        assert int(headers["streamlstm-source-offset"]) == origin.offset

    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    assert committed == ends

    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str) -> float:
        return sum(s.value for s in families[name].samples if s.name.endswith("_total"))

    assert value("streamlstm_ticks_consumed") == len(msgs)
    assert value("streamlstm_predictions_produced") == len(ticks)
    assert value("streamlstm_dead_letters") == len(BAD)
    assert families["streamlstm_active_streams"].samples[0].value > 0
    assert "streamlstm_latency_from_event_seconds" in families
    assert "streamlstm_consumer_lag" in families
    info = families["streamlstm_model_info"].samples[0].labels
    assert info["recurrent_step"] == ("C kernels" if native_available() else "NumPy")
    assert json.loads(summaries[0].value)["instance"] == config.instance_id


def test_a_rebalance_hands_over_partitions_and_their_streams_restart(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    # Memory mode: a moved partition's streams restart from zero (durable: test_chaos).
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=50, state="memory")
    streams = [f"sensor-{i}" for i in range(40)]
    rng = np.random.default_rng(5)

    def wave(rounds: int, start: int) -> list[tuple[bytes | None, bytes | None]]:
        return [
            (
                s.encode(),
                json.dumps(
                    {"stream": s, "ts": EPOCH_MS + start + k, "values": rng.normal(size=2).tolist()}
                ).encode(),
            )
            for k in range(rounds)
            for s in streams
        ]

    first, second = wave(3, 0), wave(2, 1000)

    async def scenario() -> tuple[list[Any], list[Any], set[int], float]:
        async with Server(config) as a:
            metas = await send_raw(bootstrap, src, first)
            assert len(await read_all(bootstrap, out, len(first), timeout_s=60)) == len(first)
            async with Server(config) as b:
                deadline = time.monotonic() + 90
                while not (a.assignment() and b.assignment()):
                    assert time.monotonic() < deadline, "the second instance got no partitions"
                    await asyncio.sleep(0.2)
                assert sorted(a.assignment() + b.assignment()) == [0, 1, 2, 3]
                moved = set(b.assignment())
                metas += await send_raw(bootstrap, src, second)
                total = len(first) + len(second)
                assert len(await read_all(bootstrap, out, total, timeout_s=60)) >= total
                # Once more, asking for one more than expected: any duplicate is in.
                outputs = await read_all(bootstrap, out, total + 1, timeout_s=3)
                revoked = a.metrics.rebalances._value.get()
                for server in (a, b):
                    server.request_stop()
                    await server.wait()
        return metas, outputs, moved, revoked

    metas, outputs, moved, revoked = asyncio.run(scenario())
    assert revoked >= len(moved) > 0
    by_tick: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for msg in outputs:
        body = json.loads(msg.value)
        by_tick[(body["partition"], body["offset"])].append(body)
    # Every tick answered exactly once: the instance that gave a partition up
    # committed it first, and the new owner started from that commit.
    assert sorted(by_tick) == sorted((m.partition, m.offset) for m in metas)
    assert all(len(v) == 1 for v in by_tick.values())
    # A moved partition's streams start again from zero state; the others go on.
    for meta, (key, _) in zip(metas[len(first) :], second, strict=True):
        body = by_tick[(meta.partition, meta.offset)][0]
        round_ = 1 if body["ts"] == EPOCH_MS + 1000 else 2
        assert body["step"] == (round_ if meta.partition in moved else 3 + round_), key


def test_sigterm_commits_what_was_answered_and_restart_skips_nothing(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    ticks = random_ticks(rng, streams=200, n=4000)
    msgs = [
        (s.encode(), json.dumps({"values": v, "ts": 1_700_000_000_000 + i}).encode())
        for i, (s, v, _) in enumerate(ticks)
    ]
    metas = asyncio.run(send_raw(bootstrap, src, msgs))
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    seen: list[Any] = []
    while time.monotonic() < deadline and len(seen) < 300:
        seen = asyncio.run(read_all(bootstrap, out, 300, timeout_s=2))
    assert len(seen) >= 300, "no output from streamlstm serve"
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err[-3000:]

    committed = asyncio.run(committed_offsets(bootstrap, group, src))
    answered = {
        (json.loads(m.value)["partition"], json.loads(m.value)["offset"])
        for m in asyncio.run(read_all(bootstrap, out, len(ticks), timeout_s=5))
    }
    for meta in metas:
        if meta.offset < committed.get(meta.partition, 0):
            assert (meta.partition, meta.offset) in answered  # nothing committed unanswered

    second = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    outputs: list[Any] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        outputs = asyncio.run(read_all(bootstrap, out, 10**9, timeout_s=3))
        if {(json.loads(m.value)["partition"], json.loads(m.value)["offset"]) for m in outputs} >= {
            (m.partition, m.offset) for m in metas
        }:
            break
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err[-3000:]
    answered = {(json.loads(m.value)["partition"], json.loads(m.value)["offset"]) for m in outputs}
    assert answered >= {(m.partition, m.offset) for m in metas}
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    assert asyncio.run(committed_offsets(bootstrap, group, src)) == ends


def test_startup_errors_are_clear(bootstrap: str, make_topics: Any, tmp_path: Path) -> None:
    model_dir = saved_bundle(tmp_path)
    (src,) = make_topics("ticks")
    base = dict(
        model=str(model_dir),
        bootstrap_servers=bootstrap,
        input_topic=src,
        output_topic=f"missing-{uuid.uuid4().hex[:6]}",
        metrics_port=0,
    )

    async def start(**overrides: Any) -> None:
        async with Server(ServeConfig(**{**base, **overrides})):
            pass

    with pytest.raises(BrokerError, match="--create-topics"):
        asyncio.run(start())
    with pytest.raises(BundleError, match="does not exist"):
        asyncio.run(start(model=str(tmp_path / "nope")))
    with pytest.raises(BrokerError, match="cannot reach Kafka"):
        asyncio.run(start(bootstrap_servers="127.0.0.1:1"))
    asyncio.run(start(create_topics=True))  # creates the missing output topic


def _scraped(port: int) -> dict[str, Metric]:
    status, text = asyncio.run(http_get(port, "/metrics"))
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def _steps_over_floor(families: dict[str, Metric]) -> float:
    """Engine steps of more than ``FLOOR`` ticks so far."""
    samples = {
        (s.name, s.labels.get("le")): s.value for s in families["streamlstm_batch_size"].samples
    }
    return (
        samples[("streamlstm_batch_size_count", None)]
        - samples[("streamlstm_batch_size_bucket", f"{float(FLOOR)}")]
    )


def test_a_latency_target_sizes_the_polls_and_every_tick_is_answered(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    first, second = random_ticks(rng, 200, 2000), random_ticks(rng, 200, 2000)
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, f"g-{uuid.uuid4().hex[:8]}")
    # A target no poll can meet: idle, the size falls to the floor; a burst of ticks
    # fills the polls, which grow it again.
    cmd += ["--max-records", "512", "--latency-target-ms", "0.01"]
    proc, port = start_serve(cmd, tmp_path / "serve.log")
    gauge = "streamlstm_poll_batch_target_records"
    try:
        metas = asyncio.run(send_raw(bootstrap, src, tick_messages(first, 0)))
        assert len(asyncio.run(read_all(bootstrap, out, len(first), timeout_s=90))) >= len(first)
        wait_for(lambda: _scraped(port)[gauge].samples[0].value == FLOOR, 60, "the floor")
        before = _steps_over_floor(_scraped(port))
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(second, len(first))))
        outputs = asyncio.run(read_all(bootstrap, out, len(metas), timeout_s=90))
        families = _scraped(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    answers = check_against_oracle(model_dir, first + second, metas, outputs)
    assert all(len(each) == 1 for each in answers.values())
    # The burst filled the floor's polls: they grew (up to --max-records).
    assert _steps_over_floor(families) > before
    assert FLOOR <= families[gauge].samples[0].value <= 512

"""A shadow model over Apache Kafka: it answers the same ticks to its own topic, both
models' live errors are in /metrics side by side, and a reload to its bundle promotes it
with every stream going on from the shadow's own state (no warm-up), each answer on the
oracle (``predict_sequence``) over the stream's whole history."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamlstm import Affine, Bundle, ModelConfig, OutputSpec
from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw, start_serve
from tests.helpers.serving import (
    Tick,
    metric_total,
    read_answers,
    serve_cmd,
    serve_config,
    tick_messages,
    wait_checkpointed,
)

pytestmark = pytest.mark.apache_kafka

STREAMS = [f"meter-{i}" for i in range(5)]
WARMUP = 6  # ticks a stream is "not ready" after a reset
STRONG = {"acks": "all", "enable_idempotence": True}


def _bundle(seed: int, name: str) -> Bundle:
    cfg = ModelConfig(input_size=2, hidden_sizes=(12,), head_sizes=(6,), output_size=1)
    return Bundle.random(
        cfg,
        seed=seed,
        name=name,
        warmup_steps=WARMUP,
        input_scaler=Affine.from_min_max([0.0, -10.0], [100.0, 10.0]),
        target_scaler=Affine.from_min_max([0.0], [100.0]),
        outputs=OutputSpec(target_feature=0, horizon=1),
        feature_names=["load", "temp"],
    )


def _ticks(rng: np.random.Generator, n: int) -> list[Tick]:
    return [
        (str(rng.choice(STREAMS)), [float(rng.uniform(0, 100)), float(rng.normal() * 5)], False)
        for _ in range(n)
    ]


async def _admin(port: int, token: str, method: str, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{port}/v1{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.json()


def _errors(text: str) -> dict[str, tuple[float, float]]:
    """Each model's (count, sum) of realized absolute errors, from /metrics."""
    got: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("streamlstm_forecast_abs_error_"):
                column = {"_count": 0, "_sum": 1}.get(s.name.removeprefix(family.name))
                if column is not None:
                    got[s.labels["model"]][column] += s.value
    return {model: (count, total) for model, (count, total) in got.items()}


def _oracle_errors(bundle: Bundle, ticks: list[Tick]) -> tuple[float, float]:
    """The model's horizon-1 errors over the ticks: each stream's forecast at t against
    its load at t + 1 (count, sum), from the oracle's forecasts."""
    count, total = 0.0, 0.0
    for stream in STREAMS:
        x = np.array([v for s, v, _ in ticks if s == stream], np.float32)
        forecasts = bundle.predict_sequence(x)[:-1, 0]
        count += forecasts.size
        total += float(np.abs(forecasts - x[1:, 0]).sum())
    return count, total


def test_a_shadow_is_measured_beside_the_served_model_and_promoted_with_no_warm_up(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    served, candidate = _bundle(3, "serving"), _bundle(8, "candidate")
    served.save(root / "1")
    candidate.save(tmp_path / "candidate")
    src, out, dlq, shadow = make_topics("ticks", "preds", "dlq", "shadow", partitions=2)
    (tmp_path / "token").write_text(token := secrets.token_hex(24))
    config = serve_config(
        root, bootstrap, src, out, dlq, state="durable", guarantee="exactly-once",
        commit_interval_ms=200, max_records=16, admin_port=0,
        admin_token_file=str(tmp_path / "token"), swap_state="reset",
        shadow_model=str(tmp_path / "candidate"), shadow_topic=shadow,
    )  # fmt: skip
    ticks = _ticks(np.random.default_rng(5), 600)
    half = len(ticks) // 2

    async def scenario() -> tuple[list[Any], list[Any], list[Any], Any, Any, str, str]:
        async with Server(config) as server:
            port = server.admin_port or 0
            metas = await send_raw(bootstrap, src, tick_messages(ticks[:half], 0), STRONG)
            await read_all(bootstrap, out, half, 60, "read_committed")
            await read_all(bootstrap, shadow, half, 60, "read_committed")
            before = generate_latest(server.registry).decode()
            shadowing = await _admin(port, token, "GET", "/model")
            candidate.save(root / "2")
            promoted = await _admin(port, token, "POST", "/model/reload")
            assert (await _admin(port, token, "GET", "/model"))[1]["shadow"] is None
            more = await send_raw(bootstrap, src, tick_messages(ticks[half:], half), STRONG)
            answers = await read_all(bootstrap, out, len(ticks), 60, "read_committed")
            # Read past what is due: nothing more may come after the promotion.
            shadows = await read_all(bootstrap, shadow, half + 1, 5, "read_committed")
            after = generate_latest(server.registry).decode()
        return metas + more, answers, shadows, shadowing, promoted, before, after

    metas, answers, shadows, shadowing, promoted, before, after = asyncio.run(scenario())
    assert shadowing[1] == {"model": served.model_id, "version": "1", "shadow": candidate.model_id}
    assert promoted[0] == 200 and promoted[1]["outcome"] == "swapped", promoted
    assert promoted[1]["from_shadow"] == len(STREAMS), promoted
    # Both models' live errors, over the same ticks, each the oracle's.
    errors = _errors(before)
    for model, bundle in (("serving", served), ("shadow", candidate)):
        count, total = _oracle_errors(bundle, ticks[:half])
        assert errors[model][0] == count, model
        assert errors[model][1] == pytest.approx(total, rel=1e-4), model
    assert errors["serving"][1] != pytest.approx(errors["shadow"][1])
    assert "shadow" not in _errors(after)  # promoted: no shadow is measured any more
    info = f'streamlstm_shadow_model_info{{model="{candidate.model_id}"}} 1.0'
    assert info in before and "streamlstm_shadow_model_info{" not in after
    assert metric_total(after, "streamlstm_shadow_predictions") == half
    _check(served, candidate, ticks, metas, answers, shadows, half)


def _by_tick(records: list[Any]) -> dict[tuple[int, int], Any]:
    out = {}
    for message in records:
        body = json.loads(message.value)
        key = (body["partition"], body["offset"])
        assert key not in out, f"{key} answered twice"
        out[key] = body
    return out


def _check(
    served: Bundle,
    candidate: Bundle,
    ticks: list[Tick],
    metas: list[Any],
    answers: list[Any],
    shadows: list[Any],
    half: int,
) -> None:
    """Each tick answered once; the shadow's answers of the first half (and none after)
    are the candidate's oracle; the served answers are the served model's oracle before
    the promotion and the candidate's over the whole history after it, all ready."""
    index = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    served_by, shadow_by = _by_tick(answers), _by_tick(shadows)
    assert set(served_by) == set(index), "a tick without an answer, or an answer for none"
    assert set(shadow_by) == {k for k, i in index.items() if i < half}
    for stream in STREAMS:
        mine = [k for k in sorted(index, key=index.__getitem__) if ticks[index[k]][0] == stream]
        x = np.array([ticks[index[k]][1] for k in mine], np.float32)
        cut = sum(1 for k in mine if index[k] < half)
        want = np.concatenate(
            [served.predict_sequence(x[:cut]), candidate.predict_sequence(x)[cut:]]
        )
        got = np.array([served_by[k]["prediction"] for k in mine], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=stream)
        models = [served_by[k]["model"] for k in mine]
        assert models == [served.model_id] * cut + [candidate.model_id] * (len(mine) - cut)
        assert all(served_by[k]["ready"] for k in mine[cut:]), f"{stream}: warming up again"
        assert [served_by[k]["step"] for k in mine] == list(range(1, len(mine) + 1))
        mirrored = np.array([shadow_by[k]["prediction"] for k in mine[:cut]], np.float32)
        np.testing.assert_allclose(mirrored, candidate.predict_sequence(x[:cut]), atol=1e-5)
        assert {shadow_by[k]["model"] for k in mine[:cut]} == {candidate.model_id}


def test_a_kill_9_restores_the_served_and_the_shadow_states_each_on_its_oracle(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """Exactly-once, a shadow beside the served model, a kill -9 with ticks in flight and
    a restart: each tick answered once in each topic, the served answers on the served
    model's oracle and the shadow's on the candidate's, over each stream's whole
    history (both states restored from their own changelog keys)."""
    served, candidate = _bundle(3, "serving"), _bundle(8, "candidate")
    served.save(tmp_path / "served")
    candidate.save(tmp_path / "candidate")
    src, out, dlq, shadow = make_topics("ticks", "preds", "dlq", "shadow", partitions=2)
    group = f"g-{secrets.token_hex(4)}"
    cmd = [
        *serve_cmd(tmp_path / "served", bootstrap, src, out, dlq, group),
        "--state", "durable", "--guarantee", "exactly-once", "--commit-interval-ms", "200",
        "--group-instance-id", "shadow", "--shadow-model", str(tmp_path / "candidate"),
        "--shadow-topic", shadow,
    ]  # fmt: skip
    ticks = _ticks(np.random.default_rng(6), 900)
    proc, port = start_serve(cmd, tmp_path / "serve-1.log")
    try:
        metas = asyncio.run(send_raw(bootstrap, src, tick_messages(ticks[:300], 0), STRONG))
        wait_checkpointed(port, 3)
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(ticks[300:600], 300), STRONG))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = start_serve(cmd, tmp_path / "serve-2.log")[0]
    try:
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(ticks[600:], 600), STRONG))
        answers = read_answers(bootstrap, out, metas, "exactly-once", group, src)
        shadows = asyncio.run(read_all(bootstrap, shadow, 10**9, 5, "read_committed"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for bundle, records in ((served, answers), (candidate, shadows)):
        by_tick = _by_tick(records)
        assert set(by_tick) == {(m.partition, m.offset) for m in metas}, bundle.model_id
        for stream, keys, x in _histories(ticks, metas):
            got = np.array([by_tick[k]["prediction"] for k in keys], np.float32)
            np.testing.assert_allclose(got, bundle.predict_sequence(x), atol=1e-5, err_msg=stream)
            assert {by_tick[k]["model"] for k in keys} == {bundle.model_id}


def _histories(
    ticks: list[Tick], metas: list[Any]
) -> list[tuple[str, list[tuple[int, int]], np.ndarray]]:
    """Each stream's ticks in the order sent: their (partition, offset) and inputs."""
    out = []
    for stream in STREAMS:
        rows = [i for i, (s, _, _) in enumerate(ticks) if s == stream]
        keys = [(metas[i].partition, metas[i].offset) for i in rows]
        out.append((stream, keys, np.array([ticks[i][1] for i in rows], np.float32)))
    return out

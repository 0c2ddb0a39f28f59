"""A model reload under load over Apache Kafka: the swap at a checkpoint boundary, per
partition every tick before it answered by the old model and every tick after by the new,
each stream on the oracle for its policy (carried: the new model continued from the old
model's state; reset: from zero); a broken bundle refused while the old one serves on."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import generate_latest

from streamlstm import Affine, Bundle, ModelConfig
from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw, start_serve
from tests.helpers.serving import (
    Tick,
    metric_total,
    read_answers,
    serve_cmd,
    serve_config,
    tick_messages,
)
from tests.streamlstm.oracle import carried_outputs

pytestmark = pytest.mark.apache_kafka

STREAMS = [f"sensor-{i}" for i in range(6)]
#: --history-ticks: each stream's last ticks kept for a re-warm.
HISTORY = 8


def _bundle(seed: int, name: str) -> Bundle:
    cfg = ModelConfig(input_size=2, hidden_sizes=(16, 16), head_sizes=(8,), output_size=1)
    return Bundle.random(
        cfg,
        seed=seed,
        name=name,
        input_scaler=Affine.from_min_max([-10.0, 0.0], [10.0, 100.0]),
        target_scaler=Affine.from_min_max([0.0], [5.0]),
    )


def _ticks(rng: np.random.Generator, n: int) -> list[Tick]:
    return [
        (str(rng.choice(STREAMS)), [float(rng.normal() * 5), float(rng.uniform(0, 100))], False)
        for _ in range(n)
    ]


async def _send_steadily(bootstrap: str, topic: str, ticks: list[Tick], metas: list[Any]) -> None:
    """The ticks at a steady rate (a few every few milliseconds) through one idempotent
    producer with acks=all, so that polls are seldom empty when a reload comes."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1
    )
    await producer.start()
    try:
        messages = tick_messages(ticks, 0)
        for start in range(0, len(messages), 5):
            sends = [
                await producer.send(topic, value, key=key)
                for key, value in messages[start : start + 5]
            ]
            metas += await asyncio.gather(*sends)
            await asyncio.sleep(0.003)
    finally:
        await producer.stop()


async def _post(session: aiohttp.ClientSession, port: int, token: str, path: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"http://127.0.0.1:{port}/v1{path}", headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("policy", "guarantee", "new_name"),
    [
        ("auto", "at-least-once", "serving"),  # a retrain: carried
        ("auto", "exactly-once", "other"),  # another model: re-warmed
        ("reset", "exactly-once", "serving"),
    ],
)
def test_a_reload_under_load_swaps_at_one_point_per_partition_on_the_oracle(
    bootstrap: str, make_topics: Any, tmp_path: Path, policy: str, guarantee: str, new_name: str
) -> None:
    root = tmp_path / "models"
    old, new = _bundle(3, "serving"), _bundle(4, new_name)
    old.save(root / "1")
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    (tmp_path / "token").write_text(token := secrets.token_hex(24))
    config = serve_config(
        root, bootstrap, src, out, dlq, state="durable", guarantee=guarantee,
        swap_state=policy, commit_interval_ms=200, max_records=16, admin_port=0,
        admin_token_file=str(tmp_path / "token"), history_ticks=HISTORY,
    )  # fmt: skip
    ticks = _ticks(np.random.default_rng(7), 900)

    async def scenario() -> tuple[list[Any], list[Any], Any, Any, str]:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            port = server.admin_port or 0
            metas: list[Any] = []
            sending = asyncio.ensure_future(_send_steadily(bootstrap, src, ticks, metas))
            while len(metas) < 300:
                await asyncio.sleep(0.01)
            new.save(root / "2")
            swapped = await _post(session, port, token, "/model/reload")
            while len(metas) < 600:
                await asyncio.sleep(0.01)
            _broken(_bundle(5, new_name), root / "3")
            refused = await _post(session, port, token, "/model/reload")
            await sending
            isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
            answers = await read_all(bootstrap, out, len(ticks), 60, isolation)
            return metas, answers, swapped, refused, generate_latest(server.registry).decode()

    metas, answers, swapped, refused, text = asyncio.run(scenario())
    assert swapped[0] == 200 and swapped[1]["outcome"] == "swapped", swapped
    mode = {"serving": "carry", "other": "rewarm"}[new_name] if policy == "auto" else policy
    assert swapped[1]["mode"] == mode, swapped
    assert (swapped[1]["previous"], swapped[1]["model"]) == (old.model_id, new.model_id)
    assert refused[0] == 409 and refused[1]["outcome"] == "refused", refused
    assert refused[1]["model"] == new.model_id  # the new model serves on
    assert metric_total(text, "streamlstm_model_reloads") == 2
    _check_answers(old, new, ticks, metas, answers, mode=mode)


def _broken(bundle: Bundle, path: Path) -> None:
    """A version whose bundle.json reads but whose weights do not: the engine refuses it."""
    bundle.save(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _check_answers(
    old: Bundle,
    new: Bundle,
    ticks: list[Tick],
    metas: list[Any],
    answers: list[Any],
    *,
    mode: str,
) -> None:
    """Each tick answered once; per partition the old model's answers all come before the
    new one's; each stream's answers equal the oracle on each side of its cutover."""
    by_tick = {}
    for message in answers:
        body = json.loads(message.value)
        key = (body["partition"], body["offset"])
        assert key not in by_tick, f"{key} answered twice"
        by_tick[key] = body
    index = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    assert set(by_tick) == set(index), "a tick without an answer, or an answer for none"
    models: dict[int, list[str]] = defaultdict(list)
    for key in sorted(by_tick):
        models[key[0]].append(by_tick[key]["model"])
    for partition, seen in models.items():
        cut = seen.index(new.model_id)
        assert seen == [old.model_id] * cut + [new.model_id] * (len(seen) - cut), partition
    for stream in STREAMS:
        mine = [k for k in sorted(index, key=index.__getitem__) if ticks[index[k]][0] == stream]
        x = np.array([ticks[index[k]][1] for k in mine], np.float32)
        cut = next(i for i, k in enumerate(mine) if by_tick[k]["model"] == new.model_id)
        want_old = old.predict_sequence(x[:cut])
        if mode == "carry":
            want_new = carried_outputs(old, new, x[:cut], x[cut:])
        else:  # re-warmed over the last HISTORY ticks, or from zero
            replayed = x[max(cut - HISTORY, 0) : cut] if mode == "rewarm" else x[:0]
            want_new = new.predict_sequence(np.concatenate([replayed, x[cut:]]))[len(replayed) :]
        got = np.array([by_tick[k]["prediction"] for k in mine], np.float32)
        np.testing.assert_allclose(got[:cut], want_old, atol=1e-5, err_msg=stream)
        np.testing.assert_allclose(got[cut:], want_new, atol=1e-5, err_msg=stream)
        steps = [by_tick[k]["step"] for k in mine]
        restart = list(range(1, cut + 1)) + list(range(1, len(mine) - cut + 1))
        assert steps == (restart if mode == "reset" else list(range(1, len(mine) + 1))), stream


# -- kill -9 in the middle of a swap ---------------------------------------------------------

STRONG = {"acks": "all", "enable_idempotence": True}
TRACKED = [f"tracked-{i}" for i in range(4)]


@pytest.mark.parametrize(
    ("policy", "new_name", "guarantee", "delay_s"),
    [
        ("auto", "serving", "at-least-once", 0.05),  # carried
        ("auto", "other", "at-least-once", 0.2),  # re-warmed
        ("reset", "serving", "exactly-once", 0.4),
    ],
)
def test_a_kill_9_in_the_middle_of_a_swap_leaves_every_stream_on_one_of_the_rules(
    bootstrap: str,
    make_topics: Any,
    tmp_path: Path,
    policy: str,
    new_name: str,
    guarantee: str,
    delay_s: float,
) -> None:
    """Thousands of streams held, a SIGHUP with ticks still coming, a kill -9 soon after,
    a restart (which serves the newest version): every answer, repeats included, is the
    old model's oracle or the new model's from some cutover as the policy says (carried
    from the old state, re-warmed over the last ticks, or from zero), and after the
    restart every stream's answers are the new model's from one cutover; exactly-once
    shows each tick once."""
    root = tmp_path / "models"
    old, new = _bundle(3, "serving"), _bundle(4, new_name)
    old.save(root / "1")
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    group = f"g-{secrets.token_hex(4)}"
    mode = {"serving": "carry", "other": "rewarm"}[new_name] if policy == "auto" else policy
    cmd = [
        *serve_cmd(root, bootstrap, src, out, dlq, group),
        "--state", "durable", "--guarantee", guarantee, "--swap-state", policy,
        "--commit-interval-ms", "300", "--max-records", "512", "--group-instance-id", "swap",
        "--history-ticks", str(HISTORY),
    ]  # fmt: skip
    rng = np.random.default_rng(11)
    fillers = [(f"filler-{i}", [float(rng.normal()), float(rng.uniform(0, 100))], False)
               for i in range(1500)]  # fmt: skip
    first, during, last = (_tracked_ticks(rng, n) for n in (120, 60, 60))
    returning = fillers[:40]  # fillers that tick again after the restart
    proc = start_serve(cmd, tmp_path / "serve-1.log")[0]
    try:
        metas = asyncio.run(send_raw(bootstrap, src, tick_messages(fillers + first, 0), STRONG))
        read_answers(bootstrap, out, metas, guarantee, group, src)  # answered and committed
        new.save(root / "2")
        proc.send_signal(signal.SIGHUP)
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(during, 5000), STRONG))
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = start_serve(cmd, tmp_path / "serve-2.log")[0]
    try:
        again = [
            (s, [float(rng.normal()), float(rng.uniform(0, 100))], False) for s, _, _ in returning
        ]
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(last + again, 6000), STRONG))
        answers = read_answers(bootstrap, out, metas, guarantee, group, src)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    ticks = fillers + first + during + last + again
    _check_one_of_the_rules(old, new, ticks, metas, answers, mode=mode)
    if guarantee == "exactly-once":
        keys = [(b["partition"], b["offset"]) for b in map(json.loads, (m.value for m in answers))]
        assert len(keys) == len(set(keys)) == len(ticks)


def _tracked_ticks(rng: np.random.Generator, n: int) -> list[Tick]:
    return [
        (str(rng.choice(TRACKED)), [float(rng.normal() * 5), float(rng.uniform(0, 100))], False)
        for _ in range(n)
    ]


def _check_one_of_the_rules(
    old: Bundle,
    new: Bundle,
    ticks: list[Tick],
    metas: list[Any],
    answers: list[Any],
    *,
    mode: str,
) -> None:
    """Each answer is the old model's oracle or the new model's from a cutover; the last
    answer of each tick (the restart's, where it answered again) is the new model's from
    one cutover per stream, for every stream that ticked after the restart."""
    index = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    by_stream: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for message in answers:
        body = json.loads(message.value)
        by_stream[body["stream"]].append((index[(body["partition"], body["offset"])], body))
    for stream, seen in by_stream.items():
        mine = [i for i, t in enumerate(ticks) if t[0] == stream]
        x = np.array([ticks[i][1] for i in mine], np.float32)
        position = {i: j for j, i in enumerate(mine)}
        assert {position[i] for i, _ in seen} == set(range(len(mine))), stream
        # The cutovers found so far, tried first; the first tick the new model answered
        # is the likeliest (the swap's, or the restart's first replayed tick).
        cuts = sorted({position[i] for i, body in seen if body["model"] == new.model_id})[:1]
        explained = {id(body): _cut(old, new, x, position[i], body, cuts, mode) for i, body in seen}
        assert None not in explained.values(), stream
        final = {position[i]: body for i, body in seen}  # the last answer of each tick
        if final[len(mine) - 1]["model"] == new.model_id:
            after = {explained[id(b)] for b in final.values() if b["model"] == new.model_id}
            assert len(after) == 1, (stream, after)


def _cut(
    old: Bundle,
    new: Bundle,
    x: np.ndarray,
    j: int,
    body: dict[str, Any],
    cuts: list[int],
    mode: str,
) -> int | None:
    """The cutover that explains the answer to a stream's tick ``j`` (-1: the old model's),
    trying those in ``cuts`` first (and adding what it finds); None where none does."""
    got = np.asarray(body["prediction"], np.float32)
    if body["model"] == old.model_id:
        ok = np.allclose(old.predict_sequence(x[: j + 1])[-1], got, atol=1e-5)
        return -1 if ok else None
    if mode == "reset":  # the step count says where the state started from zero
        cut = j + 1 - body["step"]
        return (
            cut if np.allclose(new.predict_sequence(x[cut : j + 1])[-1], got, atol=1e-5) else None
        )
    for cut in [*cuts, *(c for c in range(j + 1) if c not in cuts)]:
        if cut <= j and np.allclose(_swapped(old, new, x, cut, j, mode), got, atol=1e-5):
            if cut not in cuts:
                cuts.append(cut)
            return cut
    return None


def _swapped(old: Bundle, new: Bundle, x: np.ndarray, cut: int, j: int, mode: str) -> np.ndarray:
    """The new model's answer to tick ``j`` after a swap before tick ``cut``: carried from
    the old model's state, or re-warmed over the last ``HISTORY`` ticks before the cut."""
    if mode == "carry":
        answers = carried_outputs(old, new, x[:cut], x[cut : j + 1])
    else:
        answers = new.predict_sequence(x[max(cut - HISTORY, 0) : j + 1])
    last: np.ndarray = answers[-1]
    return last

"""A model reload under load over Apache Kafka: the swap at a checkpoint boundary, per
partition every tick before it answered by the old model and every tick after by the new,
each stream on the oracle for its policy (carried: the new model continued from the old
model's state; reset: from zero); a broken bundle refused while the old one serves on."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client import generate_latest

from streamlstm import Affine, Bundle, ModelConfig
from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.serving import Tick, metric_total, serve_config, tick_messages
from tests.streamlstm.oracle import carried_outputs

pytestmark = pytest.mark.apache_kafka

STREAMS = [f"sensor-{i}" for i in range(6)]


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


async def _send_paced(bootstrap: str, topic: str, ticks: list[Tick], metas: list[Any]) -> None:
    for start in range(0, len(ticks), 20):
        metas += await send_raw(
            bootstrap,
            topic,
            tick_messages(ticks[start : start + 20], start),
            producer_options={"acks": "all", "enable_idempotence": True},
        )
        await asyncio.sleep(0.02)


async def _post(session: aiohttp.ClientSession, port: int, token: str, path: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"http://127.0.0.1:{port}/v1{path}", headers=headers) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("policy", "guarantee", "new_name"),
    [("auto", "at-least-once", "serving"), ("reset", "exactly-once", "serving")],
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
        admin_token_file=str(tmp_path / "token"),
    )  # fmt: skip
    ticks = _ticks(np.random.default_rng(7), 900)

    async def scenario() -> tuple[list[Any], list[Any], Any, Any, str]:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            port = server.admin_port or 0
            metas: list[Any] = []
            sending = asyncio.ensure_future(_send_paced(bootstrap, src, ticks, metas))
            while len(metas) < 300:
                await asyncio.sleep(0.01)
            new.save(root / "2")
            swapped = await _post(session, port, token, "/model/reload")
            while len(metas) < 600:
                await asyncio.sleep(0.01)
            _broken(_bundle(5, "serving"), root / "3")
            refused = await _post(session, port, token, "/model/reload")
            await sending
            isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
            answers = await read_all(bootstrap, out, len(ticks), 60, isolation)
            return metas, answers, swapped, refused, generate_latest(server.registry).decode()

    metas, answers, swapped, refused, text = asyncio.run(scenario())
    assert swapped[0] == 200 and swapped[1]["outcome"] == "swapped", swapped
    assert swapped[1]["carry"] is (policy == "auto"), swapped
    assert (swapped[1]["previous"], swapped[1]["model"]) == (old.model_id, new.model_id)
    assert refused[0] == 409 and refused[1]["outcome"] == "refused", refused
    assert refused[1]["model"] == new.model_id  # the new model serves on
    assert metric_total(text, "streamlstm_model_reloads") == 2
    _check_answers(old, new, ticks, metas, answers, carry=policy == "auto")


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
    carry: bool,
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
        want_new = (
            carried_outputs(old, new, x[:cut], x[cut:]) if carry else new.predict_sequence(x[cut:])
        )
        got = np.array([by_tick[k]["prediction"] for k in mine], np.float32)
        np.testing.assert_allclose(got[:cut], want_old, atol=1e-5, err_msg=stream)
        np.testing.assert_allclose(got[cut:], want_new, atol=1e-5, err_msg=stream)
        steps = [by_tick[k]["step"] for k in mine]
        restart = list(range(1, cut + 1)) + list(range(1, len(mine) - cut + 1))
        assert steps == (list(range(1, len(mine) + 1)) if carry else restart), stream

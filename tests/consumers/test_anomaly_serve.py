"""A scoring model served over Kafka: every output's ``score`` and ``anomaly`` equal the
engine's replay of its stream, the adaptive flag included (its threshold lives in the
engine child's state and its flags cross to the parent with the step's reply)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from streamlstm import Affine, Bundle, Engine, ModelConfig, OutputSpec
from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.serving import random_ticks, serve_config, tick_messages
from tests.streamlstm.oracle import threshold_levels

THRESHOLD, RATE, STEP = 1.0, 0.2, 0.05


def _scoring_bundle(tmp_path: Path) -> Path:
    bundle = Bundle.random(
        ModelConfig(input_size=2, hidden_sizes=(16,), head_sizes=(8,), output_size=4),
        seed=4,
        input_scaler=Affine.from_min_max([-10.0, 0.0], [10.0, 100.0]),
        outputs=OutputSpec(
            target_feature=1,
            score_span=8,
            score_scale=(20.0, 25.0, 30.0, 35.0),
            score_stages=2,
            score_baseline_span=40,
            threshold=THRESHOLD,
            false_alarm_rate=RATE,
            threshold_step=STEP,
        ),
    )
    return bundle.save(tmp_path / "model")


def test_scores_and_flags_over_kafka_equal_the_engine_replay(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    model_dir = _scoring_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    ticks = random_ticks(rng, streams=12, n=900)
    msgs = tick_messages(ticks, 0)
    config = serve_config(model_dir, bootstrap, src, out, dlq, state="memory", max_records=97)

    async def scenario() -> tuple[list[Any], list[Any]]:
        async with Server(config) as server:
            metas = await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, len(ticks), timeout_s=90)
            server.request_stop()
            await server.wait()
        return metas, outputs

    metas, outputs = asyncio.run(scenario())
    assert len(outputs) == len(ticks)
    tick_of = {(m.partition, m.offset): i for i, m in enumerate(metas)}
    served = {
        tick_of[(b["partition"], b["offset"])]: b
        for b in map(json.loads, (o.value for o in outputs))
    }

    replay = Engine(Bundle.load(model_dir)).step(
        [t[0] for t in ticks],
        np.array([t[1] for t in ticks], np.float32),
        resets=[t[2] for t in ticks],
    )
    checked = flagged = 0
    for stream in {t[0] for t in ticks}:
        rows = [i for i, t in enumerate(ticks) if t[0] == stream]
        scores = [float(replay.scores[i]) for i in rows]
        # Resets start a stream's threshold again: its levels run from each reset on.
        levels: list[float] = []
        start = 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or ticks[rows[k]][2]:
                levels += threshold_levels(scores[start:k], THRESHOLD, RATE, STEP)
                start = k
        for i, score, level in zip(rows, scores, levels, strict=True):
            body = served[i]
            if math.isnan(score):
                assert body["score"] is None and body["anomaly"] is None
                continue
            assert math.isclose(body["score"], score, rel_tol=1e-4), (i, body, score)
            assert body["anomaly"] is bool(replay.anomalies()[i] > 0.5)
            if abs(score - level) > 1e-3 * level:  # not on the threshold's last bits
                assert body["anomaly"] is (score > level), (i, body, score, level)
                checked += 1
            flagged += bool(body["anomaly"])
    # The flags moved the threshold both ways: some ticks flagged, most not.
    assert checked > 500 and 0 < flagged < checked

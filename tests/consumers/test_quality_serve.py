"""Live model quality over Kafka equals what ``train`` reported, exactly.

A model is trained on a real series (yearly sunspots, shipped with statsmodels,
one of the README's checked series) with a seasonal baseline; the daemon is fed
the series' ticks up to where the truths of test forecasts begin (the test
part's first tick plus the horizon), then the rest. While the rest is served,
the increase of the realized-error histogram's sum over the increase of its
count is the test MAE of ``train``'s report (to float32 rounding), and so for
the persistence and seasonal baselines; the count is the report's test ticks.
A refused record of the stream in the middle keeps no forecast from meeting
the wrong truth (the figures over a span with a hole are checked against the
pairs the hole leaves).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamlstm.consumers.server import Server
from streamlstm.training.train import TrainOptions, prepare, train
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.real_series import sunspots_frame
from tests.helpers.serving import EPOCH_MS, serve_config

SEASON = 11  # the sunspot cycle, in years

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(server: Server) -> Samples:
    text = generate_latest(server.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _mean_over(
    before: Samples, after: Samples, name: str, labels: dict[str, str]
) -> tuple[float, float]:
    key = tuple(sorted(labels.items()))
    count = after[(f"{name}_count", key)] - before.get((f"{name}_count", key), 0.0)
    total = after[(f"{name}_sum", key)] - before.get((f"{name}_sum", key), 0.0)
    return total / count, count


def test_live_error_while_the_test_part_is_served_equals_the_training_report(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    frame = sunspots_frame()
    opts = TrainOptions(
        features=("SUNACTIVITY",),
        time_column="YEAR",
        hidden_size=16,
        num_layers=1,
        seq_len=20,
        epochs=3,
        burn_in=5,
        season=SEASON,
        progress=False,
    )
    bundle = train(frame, opts)
    model_dir = bundle.save(tmp_path / "model")
    (series,) = prepare(frame, opts)
    values = frame.sort_values("YEAR")["SUNACTIVITY"].to_numpy(np.float64)
    first = series.split + opts.horizon  # the first test forecast's truth
    msgs = [
        (b"sunspots", json.dumps({"values": [v], "ts": EPOCH_MS + 1000 * i}).encode())
        for i, v in enumerate(values.tolist())
    ]
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=7)

    async def scenario() -> tuple[Samples, Samples]:
        async with Server(config) as server:
            await send_raw(bootstrap, src, msgs[:first])
            assert len(await read_all(bootstrap, out, first, timeout_s=60)) == first
            before = _scrape(server)
            await send_raw(bootstrap, src, msgs[first:])
            assert len(await read_all(bootstrap, out, len(msgs), timeout_s=60)) == len(msgs)
            after = _scrape(server)
            server.request_stop()
            await server.wait()
        return before, after

    before, after = asyncio.run(scenario())
    metrics = bundle.metrics
    labels = {"horizon": "1", "model": "serving", "target": "SUNACTIVITY"}
    mae, count = _mean_over(before, after, "streamlstm_forecast_abs_error", labels)
    assert count == metrics["test_ticks"] == len(values) - first
    assert mae == pytest.approx(metrics["mae"], rel=1e-5)
    for baseline in ("persistence", f"seasonal_{SEASON}"):
        got, _ = _mean_over(
            before,
            after,
            "streamlstm_forecast_baseline_abs_error",
            {**labels, "baseline": baseline},
        )
        assert got == pytest.approx(metrics[f"{baseline}_mae"], rel=1e-5), baseline
    key = tuple(sorted(labels.items()))
    assert after[("streamlstm_model_training_mae", key)] == pytest.approx(metrics["mae"])
    squares = after[("streamlstm_forecast_squared_error_sum_total", key)]
    squares -= before[("streamlstm_forecast_squared_error_sum_total", key)]
    assert np.sqrt(squares / count) == pytest.approx(metrics["rmse"], rel=1e-5)
    # Drift against the training part's statistics: sunspots' test part runs high.
    assert ("streamlstm_input_drift_z", (("feature", "SUNACTIVITY"), ("model", "serving"))) in after


def test_a_refused_record_leaves_a_hole_no_forecast_is_paired_across(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """One tick per poll (max_records 1): the hole's rule is exact, and the figures are
    the pairs (t, t + 1) that do not straddle the refused record."""
    from streamlstm import Affine, Bundle, ModelConfig, OutputSpec

    bundle = Bundle.random(
        ModelConfig(input_size=1, hidden_sizes=(8,), head_sizes=(4,), output_size=1),
        seed=1,
        input_scaler=Affine.from_min_max([0.0], [10.0]),
        target_scaler=Affine.from_min_max([0.0], [10.0]),
        outputs=OutputSpec(target_feature=0),
    )
    model_dir = bundle.save(tmp_path / "model")
    values = np.linspace(1.0, 9.0, 40)
    msgs = [(b"s", json.dumps({"values": [v]}).encode()) for v in values.tolist()]
    msgs.insert(20, (b"s", b'{"values": ["not a number"]}'))
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=1)
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=1, state="memory")

    async def scenario() -> tuple[Samples, list[Any]]:
        async with Server(config) as server:
            await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, len(values), timeout_s=60)
            assert len(await read_all(bootstrap, dlq, 1, timeout_s=30)) == 1
            samples = _scrape(server)
            server.request_stop()
            await server.wait()
        return samples, outputs

    samples, outputs = asyncio.run(scenario())
    forecasts = [json.loads(o.value)["prediction"][0] for o in outputs]
    pairs = [t for t in range(len(values) - 1) if t != 19]  # 19 -> 20 straddles the hole
    want = [abs(forecasts[t] - values[t + 1]) for t in pairs]
    mae, count = _mean_over(
        {},
        samples,
        "streamlstm_forecast_abs_error",
        {"horizon": "1", "model": "serving", "target": "x0"},
    )
    assert count == len(pairs)
    assert mae == pytest.approx(float(np.mean(want)), rel=1e-5)

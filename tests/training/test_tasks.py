"""Training tasks beyond the plain forecast: diff targets, anomaly scores, classes, baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from streamlstm import Bundle, ConfigError, Engine, InputError
from streamlstm.cli import main as cli_main
from streamlstm.training.train import TrainOptions, evaluate, prepare, train

SMALL: dict[str, Any] = {"hidden_size": 24, "seq_len": 30, "lr": 3e-3, "progress": False}


def _trend(length: int = 700, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    value = 0.05 * t + 3 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.2, length)
    return pd.DataFrame({"t": t, "value": value})


def test_diff_target_follows_a_trend_past_the_training_range() -> None:
    frame = _trend()
    level = train(
        frame, TrainOptions(features=("value",), epochs=12, target_transform="level", **SMALL)
    )
    diff = train(
        frame, TrainOptions(features=("value",), epochs=12, target_transform="diff", **SMALL)
    )
    assert diff.outputs.transform == "diff"
    assert level.outputs.transform == "level"
    # The default notices the trend and learns the change.
    assert train(frame, TrainOptions(features=("value",), epochs=1, **SMALL)).outputs.transform == (
        "diff"
    )
    # The test period lies above anything seen in training: a level model
    # saturates there, a diff model does not.
    assert diff.metrics["rmse"] < 0.5 * level.metrics["rmse"]
    assert diff.metrics["rmse_over_persistence"] < 1.0
    # The engine outputs levels: one tick at a time equals the recorded replay.
    engine = Engine(diff)
    series = prepare(frame, TrainOptions(features=("value",), **SMALL))[0]
    preds = [
        engine.step(["s"], series.x[t : t + 1]).predictions[0, 0] for t in range(len(series.x))
    ]
    err = np.array(preds[series.split :]) - series.y[series.split :, 0]
    assert float(np.sqrt(np.mean(err**2))) == pytest.approx(diff.metrics["rmse"], rel=1e-4)


def test_anomaly_score_ranks_injected_spikes() -> None:
    rng = np.random.default_rng(4)
    length = 900
    t = np.arange(length)
    value = np.sin(2 * np.pi * t / 30) + rng.normal(0, 0.05, length)
    label = np.zeros(length, dtype=int)
    spikes = rng.choice(np.arange(100, length), 25, replace=False)
    value[spikes] += rng.choice([-1.5, 1.5], spikes.size)
    label[spikes] = 1
    frame = pd.DataFrame({"t": t, "value": value, "is_anomaly": label})
    opts = TrainOptions(
        features=("value",), label_column="is_anomaly", epochs=10, score="residual", **SMALL
    )
    bundle = train(frame, opts)
    assert bundle.outputs.score_span == 100 and not bundle.outputs.score_scale
    assert bundle.metrics["score_roc_auc"] > 0.9
    _, out = evaluate(bundle, prepare(frame, opts))
    assert {"score", "label"} <= set(out.columns)


def _regimes(streams: int, length: int, classes: int, seed: int) -> pd.DataFrame:
    """Each tick's class is the regime its stream is in; the value only hints at it
    through its recent mean, so a model needs memory to tell."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(streams):
        regime = np.repeat(rng.integers(0, classes, length // 40 + 1), 40)[:length]
        value = regime * 1.0 + rng.normal(0, 0.6, length)
        names = np.array(["calm", "busy", "storm"])[regime]
        rows.append(
            pd.DataFrame({"sensor": f"s{s}", "t": np.arange(length), "v": value, "state": names})
        )
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("classes", [2, 3])
def test_classifier_beats_the_baselines(classes: int) -> None:
    frame = _regimes(6, 600, classes, seed=classes)
    opts = TrainOptions(
        features=("v",),
        stream_column="sensor",
        time_column="t",
        task="classify",
        label_column="state",
        epochs=20,
        **SMALL,
    )
    bundle = train(frame, opts)
    assert bundle.outputs.classes == tuple(sorted(frame["state"].unique()))
    assert bundle.outputs.activation == "softmax"
    metrics = bundle.metrics
    assert metrics["f1_average"] == ("binary" if classes == 2 else "macro")
    assert metrics["accuracy"] > metrics["majority_accuracy"] + 0.15
    # Class probabilities from the engine sum to one.
    probs = Engine(bundle).step(["s0"] * 3, np.array([[0.1], [0.5], [1.2]])).predictions
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_seasonal_baseline_is_the_value_one_season_back() -> None:
    frame = _trend(400)
    opts = TrainOptions(features=("value",), epochs=2, season=24, **SMALL)
    bundle = train(frame, opts)
    level = frame["value"].to_numpy(np.float32)
    n = len(level) - 1
    split = int(n * 0.8)
    target_times = np.arange(split, n) + 1
    naive = level[target_times - 24] - level[target_times]
    expected = float(np.sqrt(np.mean(naive.astype(np.float64) ** 2)))
    assert bundle.metrics["seasonal_24_rmse"] == pytest.approx(expected, rel=1e-6)
    assert bundle.metrics["rmse_over_seasonal_24"] == pytest.approx(
        bundle.metrics["rmse"] / expected
    )


def test_time_gaps_and_bad_options_are_clear_errors() -> None:
    frame = _trend(200)
    frame.loc[frame.index >= 120, "t"] += 50
    opts = TrainOptions(features=("value",), time_column="t", epochs=1, **SMALL)
    with pytest.raises(InputError, match="gap between 119 and 170"):
        prepare(frame, opts)
    relaxed = TrainOptions(features=("value",), time_column="t", max_gap_factor=None, **SMALL)
    assert len(prepare(frame, relaxed)[0].x) == 199
    with pytest.raises(ConfigError, match="among --features"):
        TrainOptions(features=("value",), target="other", target_transform="diff")
    with pytest.raises(ConfigError, match="--label-column"):
        TrainOptions(features=("value",), task="classify")
    dates = pd.DataFrame({"day": ["2024-01-01", "not a date"] * 50, "value": range(100)})
    with pytest.raises(InputError, match="neither a number nor a date"):
        prepare(dates, TrainOptions(features=("value",), time_column="day", seq_len=10))


def test_cli_reads_parquet_writes_plots_and_predictions(tmp_path: Path) -> None:
    frame = _trend(300)
    frame["t"] = pd.date_range("2024-01-01", periods=len(frame), freq="h")
    frame.to_parquet(tmp_path / "data.parquet")
    out = tmp_path / "model"
    code = cli_main(
        [
            "train", "--data", str(tmp_path / "data.parquet"), "--features", "value",
            "--time-column", "t", "--out", str(out), "--epochs", "2", "--hidden-size", "8",
            "--seq-len", "20", "--season", "24", "--predictions-out", str(tmp_path / "p.csv"),
        ]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "loss.png",
        "predictions.png",
        "residuals.png",
        "scores.png",  # the residual score over the test period
    ]
    assert all((out / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in ["loss.png"])
    predictions = pd.read_csv(tmp_path / "p.csv")
    bundle = Bundle.load(out)
    assert len(predictions) == bundle.metrics["test_ticks"]
    err = predictions["prediction"] - predictions["truth"]
    assert float(np.sqrt(np.mean(err**2))) == pytest.approx(bundle.metrics["rmse"], rel=1e-4)
    assert "seasonal_24_rmse" in bundle.metrics

"""Anomaly scores that see shape: the multi-horizon score ``train`` gives a model
when anomaly labels are given, its calibrated flag, and the honest evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamlstm import Bundle, ConfigError, Engine
from streamlstm.cli import main as cli_main
from streamlstm.training.series import Series
from streamlstm.training.train import (
    TrainOptions,
    _masked_mse,
    _normal_only,
    evaluate,
    fit,
    prepare,
)

SMALL: dict[str, Any] = {"hidden_size": 24, "seq_len": 40, "lr": 3e-3, "progress": False}
PERIOD = 40


def _beats(length: int = 2400, seed: int = 0) -> pd.DataFrame:
    """Pulses every ~40 ticks; in a few places a beat comes early and has another shape
    (wide, inverted), which is labeled. Each tick's value alone looks ordinary."""
    rng = np.random.default_rng(seed)
    value = rng.normal(0, 0.03, length)
    label = np.zeros(length, dtype=int)
    start = 0
    odd = {int(length * f) // PERIOD for f in (0.3, 0.55, 0.85, 0.9, 0.95)}
    while start < length - PERIOD:
        beat = start // PERIOD
        t = np.arange(PERIOD)
        if beat in odd:
            shape = -0.8 * np.exp(-0.5 * ((t - 12) / 5.0) ** 2)
            label[start : start + PERIOD] = 1
        else:
            shape = np.exp(-0.5 * ((t - 20) / 1.5) ** 2) + 0.2 * np.exp(-0.5 * ((t - 32) / 3) ** 2)
        value[start : start + PERIOD] += shape
        start += PERIOD
    return pd.DataFrame({"t": np.arange(length), "ecg": value, "anomaly": label})


@pytest.fixture(scope="module")
def trained() -> tuple[Bundle, pd.DataFrame, TrainOptions]:
    frame = _beats()
    opts = TrainOptions(
        features=("ecg",), label_column="anomaly", epochs=6, score_horizons=12, **SMALL
    )
    bundle, out = fit(frame, opts)
    return bundle, out, opts


def test_labels_choose_the_multi_horizon_score_which_sees_shape(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions],
) -> None:
    bundle, _, opts = trained
    assert opts.score == "horizons" and bundle.config.output_size == 12
    spec = bundle.outputs
    # The later half of the horizons counts; the span is one and a half beats, in
    # two stages; the baseline spans ten of those.
    assert len(spec.score_scale) == 12 and spec.score_from == 7
    assert spec.score_span == int(1.5 * PERIOD) and spec.score_stages == 2
    assert spec.score_baseline_span == 10 * spec.score_span
    # One scale per horizon, each its own residuals' spread. (This small model's
    # errors hardly grow with the horizon: the twelve scales lie within 1% of each
    # other, so "the last above the first" was a coin flip on the CPU's rounding.)
    assert all(0 < scale < math.inf for scale in spec.score_scale)
    m = bundle.metrics
    # The first ticks of an odd beat look like any other (no causal score can see
    # them) and the smoothed score lingers into the next beat, so not 1.0.
    assert m["score_roc_auc"] > 0.8
    # A beat of another shape is nearly invisible to the value's own z-score and
    # to the one-step residual (both baselines are reported beside the score).
    assert m["score_roc_auc"] > m["residual_z_roc_auc"] + 0.15
    assert m["score_roc_auc"] > m["raw_z_roc_auc"] + 0.15
    assert m["score_pr_auc"] > m["residual_z_pr_auc"] + 0.2
    # The flag: each stream's threshold starts at the one fitted on the training
    # part and follows the stream's own scores toward the rate asked for, so it
    # fires on few normal ticks (within twice the rate) and still catches odd beats.
    assert spec.false_alarm_rate == 0.01 and spec.threshold == m["flag_threshold"]
    assert spec.threshold_step == 0.005
    assert m["flag_false_alarm_rate"] <= 0.02
    assert m["flag_recall"] > 0.05 and m["flag_precision"] > 0.5


def test_a_fixed_threshold_catches_more_and_raises_more_false_alarms(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions], tmp_path: Path
) -> None:
    """``--threshold-step 0``: each flagged odd beat no longer raises the bar for
    the next, and the smoothed score's tail after each counts as false alarms."""
    bundle, _, opts = trained
    bundle.save(tmp_path / "m")
    fixed = Bundle.load(tmp_path / "m")
    fixed.outputs = replace(fixed.outputs, threshold=None, false_alarm_rate=None, threshold_step=0)
    m, _ = evaluate(fixed, prepare(_beats(), opts), false_alarm_rate=0.01, threshold_step=0)
    assert m["flag_threshold"] == bundle.metrics["flag_threshold"]
    assert m["flag_recall"] > max(0.3, bundle.metrics["flag_recall"]) and m["flag_precision"] > 0.5
    assert bundle.metrics["flag_false_alarm_rate"] <= m["flag_false_alarm_rate"] < 0.1


def test_engine_replay_equals_what_train_reports(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions], tmp_path: Path
) -> None:
    bundle, out, opts = trained
    bundle.save(tmp_path / "m")
    loaded = Bundle.load(tmp_path / "m")
    assert loaded.outputs == bundle.outputs
    series = prepare(_beats(), opts)[0]
    engine = Engine(loaded)
    scores, flags = [], []
    for t in range(len(series.x)):  # one tick per call, as a stream arrives
        result = engine.step(["series"], series.x[t : t + 1])
        scores.append(result.scores[0])
        flags.append(result.anomalies()[0])
    # The same ticks in one call, as ``evaluate`` feeds them: exactly what train reports.
    whole = Engine(loaded).step(["series"] * len(series.x), series.x)
    np.testing.assert_array_equal(whole.scores[series.split :], out["score"].to_numpy())
    np.testing.assert_array_equal(whole.anomalies()[series.split :], out["anomaly"].to_numpy())
    # One tick per call: the head's batch differs, so the last float bits may.
    np.testing.assert_allclose(scores[series.split :], out["score"], rtol=1e-5)
    clear = np.abs(out["score"].to_numpy() - loaded.outputs.threshold) > 1e-4
    np.testing.assert_array_equal(np.array(flags[series.split :])[clear], out["anomaly"][clear])
    # The training part's normal ticks exceed the threshold at the chosen rate.
    train = np.array(scores[: series.split])
    assert series.labels is not None
    normal = np.isfinite(train) & (series.labels[: series.split] == 0)
    assert np.mean(train[normal] > bundle.outputs.threshold) <= 0.01


def test_cli_reports_the_flag_and_plots_the_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "beats.csv"
    _beats(1200, seed=1).to_csv(data, index=False)
    out = tmp_path / "model"
    args = ["train", "--data", str(data), "--features", "ecg", "--label-column", "anomaly"]
    args += ["--out", str(out), "--epochs", "1", "--hidden-size", "8", "--num-layers", "1"]
    args += ["--score-horizons", "6", "--false-alarm-rate", "0.05", "--train-fraction", "0.6"]
    args += ["--score-stages", "3", "--score-baseline-span", "0"]
    assert cli_main(args) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["outputs"]["score_stages"] == 3
    assert meta["outputs"]["score_baseline_span"] is None
    assert meta["outputs"]["false_alarm_rate"] == 0.05
    assert meta["outputs"]["threshold"] == meta["metrics"]["flag_threshold"]
    assert len(meta["outputs"]["score_scale"]) == 6
    assert meta["targets"][:2] == ["ecg+1", "ecg+2"]
    # Horizon 1's test figures judge every forecast from the first test tick on whose
    # truth is in the data: all of them but the last row's (the rows after the last
    # 6-ahead forecast bring truths and make forecasts of their own).
    split = int((1200 - 6) * 0.6)
    assert meta["metrics"]["test_ticks"] == 1200 - split - 1
    assert meta["metrics"]["horizons"]["6"]["test_ticks"] == 1200 - split - 6
    assert (out / "plots" / "scores.png").stat().st_size > 0
    capsys.readouterr()
    # ``evaluate`` replays the saved bundle with its own score and threshold.
    evaluate = ["evaluate", "--model", str(out), "--data", str(data), "--label-column", "anomaly"]
    evaluate += ["--train-fraction", "0.6"]
    assert cli_main(evaluate) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert float(printed["flag_threshold"]) == pytest.approx(meta["outputs"]["threshold"], rel=1e-5)
    assert float(printed["score_roc_auc"]) == pytest.approx(
        meta["metrics"]["score_roc_auc"], rel=1e-5
    )


def test_bad_score_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="false_alarm_rate"):
        TrainOptions(features=("x",), false_alarm_rate=1.5)
    with pytest.raises(ConfigError, match="score: horizons needs"):
        TrainOptions(features=("x",), target="y", score="horizons")
    with pytest.raises(ConfigError, match="train_fraction"):
        TrainOptions(features=("x",), train_fraction=1.0)
    with pytest.raises(ConfigError, match="score_stages: must be at least 1"):
        TrainOptions(features=("x",), score_stages=0)
    with pytest.raises(ConfigError, match="score_baseline_span: must be 0"):
        TrainOptions(features=("x",), score_baseline_span=-5)
    # Without labels the default stays the one-step residual score.
    assert TrainOptions(features=("x",)).score == "residual"
    assert TrainOptions(features=("x",)).score_span == 100


def test_labeled_targets_of_the_training_part_are_left_out_of_the_loss() -> None:
    labels = np.array([0, 0, 1, 0, 0, 0, 0, 1, 0, 0])
    y = np.arange(20, dtype=np.float32).reshape(10, 2)  # y[t, j]: tick t + 1 + j
    series = Series("s", np.zeros((10, 1), np.float32), y, 6, labels=labels)
    opts = TrainOptions(features=("x",), label_column="a", score_horizons=2)
    masked = _normal_only(y, series, opts)
    # Tick 2 is the target of (t=1, j=0) and (t=0, j=1); tick 7 of (t=6, j=0) and
    # (t=5, j=1), but t=6 is in the test period, which keeps every target.
    assert np.argwhere(np.isnan(masked)).tolist() == [[0, 1], [1, 0], [5, 1]]
    loss = _masked_mse(torch.zeros(10, 2), torch.from_numpy(masked))
    assert float(loss) == pytest.approx(float(np.nanmean(masked**2)))


def test_a_training_part_shorter_than_the_warmup_still_gets_a_flag(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions], tmp_path: Path
) -> None:
    """A long smoothing on a short series: the threshold comes from the training
    part's later half rather than from no tick at all (which used to fail)."""
    bundle, _, opts = trained
    bundle.save(tmp_path / "m")
    copy = Bundle.load(tmp_path / "m")
    series = prepare(_beats(), opts)
    long = replace(
        bundle.outputs, score_span=5000, threshold=None, false_alarm_rate=None, threshold_step=0
    )
    assert long.score_warmup > series[0].split
    copy.outputs = long
    metrics, _ = evaluate(copy, series, false_alarm_rate=0.01)
    assert math.isfinite(metrics["flag_threshold"]) and copy.outputs.threshold is not None


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_gru_or_rnn_forecaster_gets_the_same_scores_and_flag_as_served(cell: str) -> None:
    # The score and flag work on the head's forecasts whatever cell made them: the
    # engine replay of the test period is what train reports, score and flag alike.
    frame = _beats(1200, seed=2)
    opts = TrainOptions(
        features=("ecg",), label_column="anomaly", epochs=2, score_horizons=8, cell=cell, **SMALL
    )
    bundle, out = fit(frame, opts)
    assert bundle.config.cell == cell and bundle.outputs.score_span is not None
    series = prepare(frame, opts)[0]
    whole = Engine(bundle).step(["series"] * len(series.x), series.x)
    np.testing.assert_array_equal(whole.scores[series.split :], out["score"].to_numpy())
    np.testing.assert_array_equal(whole.anomalies()[series.split :], out["anomaly"].to_numpy())
    assert np.isfinite(out["score"].to_numpy()[-100:]).all()
    assert math.isfinite(bundle.outputs.threshold or math.nan)

"""Training: beats persistence, and its metrics are what the serving engine gives."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamlstm import Bundle, ConfigError, Engine, InputError
from streamlstm.consumers.devtools.demo import synthetic, train_options
from streamlstm.training.train import TrainOptions, prepare, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, pd.DataFrame, TrainOptions]:
    frame = synthetic(streams=8, length=800, seed=0)
    opts = train_options()
    return train(frame, opts), frame, opts


def test_stateful_model_beats_persistence(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions],
) -> None:
    bundle, _, _ = trained
    assert bundle.metrics["rmse_over_persistence"] < 0.8


def test_recorded_rmse_is_a_tick_by_tick_replay(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions], tmp_path: Path
) -> None:
    bundle, frame, opts = trained
    path = bundle.save(tmp_path / "m")
    engine = Engine(Bundle.load(path))
    errors = []
    for series in prepare(frame, opts):
        for t in range(len(series.x)):  # one tick per call, the whole file
            pred = engine.step([series.stream], series.x[t : t + 1]).predictions[0, 0]
            if t >= series.split:
                errors.append(pred - series.y[t, 0])
    rmse = float(np.sqrt(np.mean(np.square(errors))))
    assert rmse == pytest.approx(bundle.metrics["rmse"], rel=0.02)
    csv = tmp_path / "data.csv"
    frame.to_csv(csv, index=False)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamlstm.cli",
            "evaluate",
            "--model",
            str(path),
            "--data",
            str(csv),
            "--stream-column",
            "machine",
            "--time-column",
            "t",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    reported = float(
        next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("rmse "))
    )
    assert reported == pytest.approx(bundle.metrics["rmse"], rel=1e-4)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pd.DataFrame({"t": range(100), "x": range(100)}), "column\\(s\\) load not in the file"),
        (
            pd.DataFrame({"t": range(100), "load": ["a", *list(range(99))]}),
            "non-numeric value 'a' at row 2",
        ),
        (pd.DataFrame({"t": range(10), "load": range(10)}), "at least seq_len"),
        (pd.DataFrame({"t": [0] * 100, "load": range(100)}), "duplicate timestamp"),
    ],
)
def test_bad_data_gives_clear_errors(frame: pd.DataFrame, match: str) -> None:
    opts = TrainOptions(features=("load",), time_column="t", seq_len=30, epochs=1, progress=False)
    with pytest.raises(InputError, match=match):
        train(frame, opts)


def test_training_runs_on_its_own_thread_count_and_gives_the_callers_back() -> None:
    # The same data and seed train the same model on any machine: one thread by default.
    with pytest.raises(ConfigError, match="threads"):
        TrainOptions(features=("load",), threads=0)
    frame = synthetic(streams=2, length=200, seed=1)
    opts = replace(train_options(), epochs=1, progress=False, threads=1)
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        original = torch.nn.LSTM.forward

        def spy(self: torch.nn.LSTM, *args: Any, **kwargs: Any) -> Any:
            seen.append(torch.get_num_threads())
            return original(self, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.LSTM, "forward", spy)
            first = train(frame, opts)
        assert set(seen) == {1}
        assert torch.get_num_threads() == 2
        again = train(frame, opts)
        assert first.metrics["rmse"] == again.metrics["rmse"]
    finally:
        torch.set_num_threads(before)


def test_nothing_of_the_test_period_steers_training() -> None:
    # Early stopping and the learning-rate schedule watch held-out training ticks:
    # other test-period values must give the very same weights.
    frame = synthetic(streams=2, length=300, seed=2)
    other = frame.copy()
    test = other.groupby("machine").cumcount() >= int(300 * 0.8)
    other.loc[test, "load"] = other.loc[test, "load"] * 3.0 + 7.0
    opts = replace(train_options(), epochs=3, patience=1, progress=False)
    a, b = train(frame, opts), train(other, opts)
    assert a.training["history"] == b.training["history"]
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_recorded_figures_are_every_test_forecast_against_its_truth(
    trained: tuple[Bundle, pd.DataFrame, TrainOptions],
) -> None:
    """The report's MAE, RMSE and persistence figures (the engine's own quality totals
    over the test part) equal each test forecast paired by hand with its target."""
    bundle, frame, opts = trained
    engine = Engine(bundle)
    errors, naive, inputs = [], [], []
    for series in prepare(frame, opts):
        out = engine.step([series.stream] * len(series.x), series.x).predictions[:, 0]
        t = np.arange(series.split, len(series.x))
        errors.append(out[t].astype(np.float64) - series.y[t, 0])
        naive.append(series.level[t].astype(np.float64) - series.y[t, 0])
        inputs.append(series.x[: series.split])
    err, nai = np.concatenate(errors), np.concatenate(naive)
    metrics = bundle.metrics
    assert metrics["test_ticks"] == err.size
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-6)
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-6)
    assert metrics["persistence_mae"] == pytest.approx(np.mean(np.abs(nai)), rel=1e-9)
    assert metrics["horizons"][str(opts.horizon)]["mae"] == metrics["mae"]
    # What serving measures drift against: the training parts' own statistics.
    x = np.concatenate(inputs).astype(np.float64)
    assert bundle.training["inputs"]["mean"] == pytest.approx(x.mean(axis=0).tolist())
    assert bundle.training["inputs"]["std"] == pytest.approx(x.std(axis=0).tolist())


@pytest.mark.parametrize(("cell", "mode"), [("gru", "stateful"), ("rnn", "window")])
def test_train_cell_gru_or_rnn_from_the_cli_serves_what_it_reports(
    tmp_path: Path, cell: str, mode: str
) -> None:
    from streamlstm.cli import main as cli_main

    frame = synthetic(streams=3, length=240, seed=3)
    csv = tmp_path / "data.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "m"
    code = cli_main(
        [
            "train", "--data", str(csv), "--features", "load", "--stream-column", "machine",
            "--time-column", "t", "--cell", cell, "--mode", mode, "--hidden-size", "12",
            "--seq-len", "20", "--epochs", "2", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    bundle = Bundle.load(out)
    assert bundle.config.cell == cell and bundle.training["cell"] == cell
    kind = {"gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    assert all(type(m) is kind for m in bundle.model.lstm)
    # Invariant 5 for this cell: the recorded figures are the serving engine's.
    opts = replace(train_options(), seq_len=20)
    engine = Engine(bundle)
    assert engine.store.c == [] and engine.store.raw_bytes_per_stream() == 4 * 2 * 12
    errors = []
    for series in prepare(frame, opts):
        pred = engine.step([series.stream] * len(series.x), series.x).predictions[:, 0]
        errors.append(pred[series.split :] - series.y[series.split :, 0])
    rmse = float(np.sqrt(np.mean(np.square(np.concatenate(errors)))))
    assert rmse == pytest.approx(bundle.metrics["rmse"], rel=1e-5)
    with pytest.raises(ConfigError, match="cell: must be one of lstm, gru, rnn"):
        TrainOptions(features=("load",), cell="lstm-ish")

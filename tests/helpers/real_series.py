"""A real series for the serving tests: yearly sunspots (shipped with statsmodels, one
of the README's checked series), a model ``streamlstm train`` fits to it, and streams
that replay it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from tests.helpers.serving import Tick

#: Small and fast (about 10 s on one thread) and still well below persistence's error
#: on the test part (RMSE about 0.56 x persistence's with a GRU, seed 0).
FAST_TRAINING = (
    *("--hidden-size", "32", "--num-layers", "2", "--seq-len", "20"),
    *("--epochs", "5", "--lr", "0.005", "--seed", "0"),
)


def sunspots_frame() -> pd.DataFrame:
    """Yearly sunspot numbers, 1700-2008: columns YEAR and SUNACTIVITY."""
    from statsmodels.datasets import sunspots

    frame: pd.DataFrame = sunspots.load_pandas().data
    return frame


def sunspots() -> npt.NDArray[np.float64]:
    """The series itself, in time order (309 values)."""
    frame = sunspots_frame().sort_values("YEAR")
    return frame["SUNACTIVITY"].to_numpy(np.float64)


def train_on_sunspots(tmp_path: Path, cell: str, *options: str) -> Path:
    """``streamlstm train --cell CELL`` run as the CLI on the series written to a CSV
    (``FAST_TRAINING`` unless ``options`` are given); the bundle directory it wrote."""
    csv = tmp_path / "sunspots.csv"
    sunspots_frame().to_csv(csv, index=False)
    out = tmp_path / f"{cell}-on-sunspots"
    cmd = [sys.executable, "-m", "streamlstm.cli", "train", "--data", str(csv)]
    cmd += ["--features", "SUNACTIVITY", "--time-column", "YEAR", "--cell", cell]
    cmd += ["--out", str(out), *(options or FAST_TRAINING)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def sunspot_replays(rng: np.random.Generator, streams: int, replays: int) -> list[Tick]:
    """Ticks of ``streams`` streams, each replaying the series ``replays`` times, a reset
    at the start of each replay after the first. Stream ``k`` sees the series scaled by
    ``0.5 + 0.1 k`` and shifted by ``2 k`` (each its own answers, some past the training
    range); the streams are interleaved at random, each one's ticks in order."""
    series = sunspots()
    per_stream = [
        [
            (f"sunspots-{k}", [float(v * (0.5 + 0.1 * k) + 2.0 * k)], replay > 0 and i == 0)
            for replay in range(replays)
            for i, v in enumerate(series)
        ]
        for k in range(streams)
    ]
    order = rng.permutation(np.repeat(np.arange(streams), len(series) * replays))
    seen = [0] * streams
    out: list[Tick] = []
    for k in order.tolist():
        out.append(per_stream[k][seen[k]])
        seen[k] += 1
    return out

"""PNG plots of a training run: losses, predictions against truth, residuals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ["write_plots"]

_STREAMS_SHOWN = 3


def write_plots(
    directory: str | Path,
    history: Sequence[dict[str, Any]],
    frame: pd.DataFrame,
    threshold: float | None = None,
) -> list[Path]:
    """Write ``loss.png``, ``predictions.png``, (forecasts) ``residuals.png`` and
    (a model with a score) ``scores.png``; return their paths.

    ``frame`` is the test-period frame from ``evaluate``: one row per test
    tick with ``stream``, ``index``, ``truth`` and ``prediction`` (and
    ``score``, ``label``); ``threshold`` is drawn on the scores.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [_losses(out / "loss.png", history)]
    streams = list(dict.fromkeys(frame["stream"]))[:_STREAMS_SHOWN]
    fig, axes = plt.subplots(len(streams), 1, figsize=(10, 2.6 * len(streams)), squeeze=False)
    numeric = pd.api.types.is_numeric_dtype(frame["truth"])
    for ax, stream in zip(axes[:, 0], streams, strict=True):
        part = frame[frame["stream"] == stream]
        ax.plot(part["index"], part["truth"], label="truth", lw=1)
        ax.plot(part["index"], part["prediction"], label="prediction", lw=1, alpha=0.8)
        ax.set_title(f"stream {stream}: test period" + ("" if numeric else " (class)"))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "predictions.png", dpi=90)
    plt.close(fig)
    written.append(out / "predictions.png")
    if numeric:
        residual = (frame["truth"] - frame["prediction"]).to_numpy()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
        left.plot(residual, lw=0.6)
        left.set_title("residual (truth - prediction), test ticks in order")
        right.hist(residual[np.isfinite(residual)], bins=50)
        right.set_title("residual distribution")
        fig.tight_layout()
        fig.savefig(out / "residuals.png", dpi=90)
        plt.close(fig)
        written.append(out / "residuals.png")
    if "score" in frame and np.isfinite(frame["score"].to_numpy(np.float64)).any():
        written.append(_scores(out / "scores.png", frame, streams, threshold))
    return written


def _scores(path: Path, frame: pd.DataFrame, streams: list[Any], threshold: float | None) -> Path:
    """The anomaly score over each stream's test period, labeled ticks shaded."""
    fig, axes = plt.subplots(len(streams), 1, figsize=(10, 2.6 * len(streams)), squeeze=False)
    for ax, stream in zip(axes[:, 0], streams, strict=True):
        part = frame[frame["stream"] == stream]
        index = part["index"].to_numpy()
        ax.plot(index, part["score"], lw=0.8, label="score")
        if "label" in part:
            top = float(np.nanmax(part["score"].to_numpy(np.float64), initial=1.0))
            ax.fill_between(
                index,
                0,
                top,
                where=part["label"].to_numpy() > 0,
                color="red",
                alpha=0.2,
                step="mid",
                label="labeled anomaly",
            )
        if threshold is not None:
            ax.axhline(threshold, color="black", ls="--", lw=0.8, label="flag threshold")
        ax.set_title(f"stream {stream}: anomaly score over the test period")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _losses(path: Path, history: Sequence[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker=".", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

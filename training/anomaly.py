"""Anomaly scores in training: the multi-horizon score's scale, the flag's
threshold, and the metrics that judge a score against 0/1 labels.

The threshold is fitted on the training part only (the scores the engine gives
its normal ticks there); the metrics are computed on the test part, beside two
baselines a user could build without us: the one-step forecast residual's EW
z-score (the residual score) and a rolling z-score of the raw value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from streamlstm import Bundle
from streamlstm.outputs import ResidualScore
from streamlstm.training.series import Series

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Window (ticks) of the rolling z-score baseline and span of the residual one.
BASELINE_WINDOW = 100
#: Longest default smoothing span of the multi-horizon score (ticks).
MAX_SPAN = 1000
#: The multi-horizon score's default smoothing, in the series' dominant periods.
SPAN_PERIODS = 1.5
#: Its default baseline span, in smoothing spans (about 15 periods).
BASELINE_SPANS = 10


def horizon_scale(bundle: Bundle, series: Sequence[Series], skip: int) -> tuple[float, ...]:
    """Each horizon's RMS residual (target units) over the training part's normal ticks.

    The model's ``H`` outputs at tick t forecast ticks ``t+1 .. t+H``; the
    residual of horizon k at tick t is ``level[t] - forecast made at t-k``.
    The first ``skip + H`` ticks of a stream (state warming up) are left out.
    """
    horizons = bundle.config.output_size
    sums = np.zeros(horizons)
    counts = np.zeros(horizons)
    with torch.no_grad():
        for s in series:
            x = torch.from_numpy(bundle.scale_inputs(s.x[: s.split]))
            y, _ = bundle.model(x[None])
            forecasts = bundle.finish(y[0].numpy(), s.x[: s.split]).astype(np.float64)
            level = s.level[: s.split].astype(np.float64)
            normal = np.ones(s.split, bool) if s.labels is None else s.labels[: s.split] == 0
            for k in range(1, horizons + 1):
                t = np.arange(max(k, skip + horizons), s.split)
                t = t[normal[t]]
                residual = level[t] - forecasts[t - k, k - 1]
                sums[k - 1] += float(np.sum(residual**2))
                counts[k - 1] += t.size
    scale = np.sqrt(sums / np.maximum(counts, 1))
    floor = max(float(np.max(scale)) * 1e-6, 1e-12)
    return tuple(float(v) for v in np.maximum(scale, floor))


def smoothing_span(series: Sequence[Series], horizons: int) -> int:
    """The multi-horizon score's default span: ``SPAN_PERIODS`` of the series'
    dominant periods (the highest autocorrelation peak of the training part's
    target after it first turns negative; a beat of an ECG), kept within
    ``2 H .. MAX_SPAN``; ``4 H`` when there is none. Streams vote by median.

    Measured with the default two stages and baseline (test ROC AUC on three
    models of the MIT-BIH excerpt, two of the KDD series; docs/anomaly-scores.md):
    1.5 periods was the best of 0.5 .. 3 on both kinds of series; one stage of
    two periods, the score's first form, was 0.03-0.08 below on the ECG.
    """
    periods = []
    for s in series:
        level = s.level[: s.split].astype(np.float64)
        level = level - level.mean()
        longest = min(MAX_SPAN, level.size // 3)
        if longest < 3 or not np.any(level):
            continue
        spectrum = np.fft.rfft(level, 2 * level.size)
        acf = np.fft.irfft(spectrum * np.conj(spectrum))[: longest + 1]
        negative = np.flatnonzero(acf[1:] < 0)
        if negative.size:
            start = 1 + int(negative[0])
            periods.append(start + int(np.argmax(acf[start:])))
    if not periods:
        return 4 * horizons
    return int(min(MAX_SPAN, max(2 * horizons, SPAN_PERIODS * np.median(periods))))


def baseline_span(asked: int | None, span: int) -> int | None:
    """The baseline span ``train`` writes: ``asked`` ticks (0: none), by default
    ``BASELINE_SPANS`` smoothing spans: long enough that an anomaly of a few
    periods barely moves it, short enough to follow a drift of the forecasts'
    quality (on two models of the KDD series it cut a fixed threshold's false
    alarms on the test period by about a third and raised ROC AUC 0.03-0.04)."""
    if asked is None:
        return BASELINE_SPANS * span
    return asked or None


def fit_threshold(
    scores: Sequence[F64], series: Sequence[Series], rate: float, skip: int = 0
) -> float:
    """The score exceeded by a fraction ``rate`` of the training part's normal ticks.

    ``scores[i]`` are stream i's engine scores over all its ticks; the first
    ``skip`` of a stream (its state and smoothing warming up from zero) do not count.
    """
    parts = []
    for score, s in zip(scores, series, strict=True):
        train = score[: s.split]
        normal = np.ones(s.split, bool) if s.labels is None else s.labels[: s.split] == 0
        normal[:skip] = False
        parts.append(train[normal & np.isfinite(train)])
    values = np.concatenate(parts) if parts else np.zeros(0)
    if not values.size:
        logger.warning("no scored normal training ticks: no threshold, so no flag")
        return math.inf
    return float(np.quantile(values, 1.0 - rate, method="higher"))


def residual_z(series: Sequence[Series], forecasts: Sequence[F64], horizon: int) -> list[F64]:
    """The residual score's ``|z|`` of each stream's forecasts ``forecasts[i] [T]``
    (each ``horizon`` ticks ahead), tick by tick as the engine computes it."""
    out = []
    for s, f in zip(series, forecasts, strict=True):
        score = ResidualScore(horizon, BASELINE_WINDOW)
        extra = np.zeros((1, score.width))
        slot = np.zeros(1, np.int64)
        level = s.level.astype(np.float32)
        z = np.empty(len(f))
        for t in range(len(f)):
            z[t] = score.update(
                extra, slot, np.array([t + 1]), level[t : t + 1], f[t : t + 1].astype(np.float32)
            )[0]
        out.append(z)
    return out


def rolling_z(level: F32, window: int = BASELINE_WINDOW) -> F64:
    """``|x_t - mean| / std`` over the ``window`` ticks before t (NaN before two ticks)."""
    past = pd.Series(level.astype(np.float64)).shift(1).rolling(window, min_periods=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(level - past.mean().to_numpy()) / past.std().to_numpy()
    return np.asarray(np.where(np.isfinite(z) | np.isnan(z), z, 0.0), dtype=np.float64)


def _ranking(prefix: str, labels: npt.NDArray[np.int64], score: F64) -> dict[str, float]:
    """ROC AUC and PR AUC (average precision) of ``score`` on the ticks where it is defined."""
    ok = np.isfinite(score)
    if len(np.unique(labels[ok])) != 2:
        logger.warning("%s: ROC AUC needs both labels among the scored test ticks", prefix)
        return {f"{prefix}_roc_auc": math.nan, f"{prefix}_pr_auc": math.nan}
    return {
        f"{prefix}_roc_auc": float(roc_auc_score(labels[ok], score[ok])),
        f"{prefix}_pr_auc": float(average_precision_score(labels[ok], score[ok])),
    }


def anomaly_metrics(
    frame: pd.DataFrame, baselines: dict[str, F64], threshold: float | None
) -> dict[str, Any]:
    """Test-period metrics of ``frame`` (``label``, ``score``, optional ``anomaly``).

    ``baselines`` maps a name to its score on the frame's rows. The flag's
    precision, recall and false-alarm rate (flagged normal ticks / normal
    ticks) count the ticks where the score is defined.
    """
    labels = frame["label"].to_numpy(np.int64)
    metrics: dict[str, Any] = _ranking("score", labels, frame["score"].to_numpy(np.float64))
    if threshold is not None:
        flags = frame["anomaly"].to_numpy(np.float64)
        ok = np.isfinite(flags)
        flagged, truth = flags[ok] > 0.5, labels[ok] == 1
        hits = int(np.sum(flagged & truth))
        metrics["flag_threshold"] = threshold
        metrics["flag_precision"] = hits / int(flagged.sum()) if flagged.any() else math.nan
        metrics["flag_recall"] = hits / int(truth.sum()) if truth.any() else math.nan
        normal = int(np.sum(~truth))
        metrics["flag_false_alarm_rate"] = (
            int(np.sum(flagged & ~truth)) / normal if normal else math.nan
        )
    for name, score in baselines.items():
        metrics.update(_ranking(name, labels, score))
    return metrics

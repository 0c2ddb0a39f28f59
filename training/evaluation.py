"""Evaluation through ``Engine.step`` tick by tick (invariant 5), and the metrics it reports."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from streamlstm import Bundle, Engine, OutputSpec
from streamlstm.flag import AdaptiveFlag
from streamlstm.quality import HorizonQuality, QualityConfig, QualityReport
from streamlstm.training.anomaly import anomaly_metrics, fit_threshold, residual_z, rolling_z
from streamlstm.training.series import Series

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def evaluate(
    bundle: Bundle,
    series: list[Series],
    *,
    season: int | None = None,
    false_alarm_rate: float | None = None,
    threshold_step: float = 0.0,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Predictions of every test tick, fed tick by tick through ``Engine.step``.

    Each stream's state is first carried through its training period, then
    each test tick is answered before the next arrives, as in serving.
    Returns the metrics and a frame of (stream, index, truth, prediction, ...).
    ``false_alarm_rate`` (a model with a score) first calibrates the bundle's
    flag threshold on the training part's scores (``bundle.outputs`` changes;
    ``threshold_step`` > 0 lets each stream's threshold adapt from there, see
    ``flag``); the frame's ``anomaly`` column is the flag (1, 0, NaN while
    undefined), each stream's replayed from its first tick as the engine flags it.
    """
    engine = Engine(
        bundle, max_streams=max(1, len(series)), quality=QualityConfig(season=season or 0)
    )
    stepped = _Stepped(engine, series)
    predictions, scores = stepped.predictions, stepped.scores
    lengths = np.array([len(s.x) for s in series])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    whole = [slice(start, start + len(s.x)) for s, start in zip(series, starts, strict=True)]
    spec = bundle.outputs
    if false_alarm_rate is not None and spec.score_span is not None:
        # Not while a stream's state and its smoothed score warm up from zero; on a
        # training part too short for that, its later half.
        warm = min(spec.score_warmup, min(s.split for s in series) // 2)
        threshold = fit_threshold([scores[w] for w in whole], series, false_alarm_rate, warm)
        if math.isfinite(threshold):
            bundle.outputs = spec = replace(
                spec,
                threshold=threshold,
                false_alarm_rate=false_alarm_rate,
                threshold_step=threshold_step,
            )
    test = [
        slice(start + s.split, start + len(s.x)) for s, start in zip(series, starts, strict=True)
    ]
    flags = _flags(spec, [scores[w] for w in whole]) if spec.threshold is not None else []
    frames = []
    for k, (s, part) in enumerate(zip(series, test, strict=True)):
        columns: dict[str, Any] = {"stream": s.stream, "index": np.arange(s.split, len(s.x))}
        if bundle.outputs.is_classifier:
            names = np.array(bundle.outputs.classes)
            columns["truth"] = names[s.y[s.split :, 0].astype(np.int64)]
            columns["prediction"] = names[predictions[part].argmax(axis=1)]
            for k, name in enumerate(names):
                columns[f"p_{name}"] = predictions[part, k]
        else:
            columns["truth"] = s.y[s.split :, 0]
            columns["prediction"] = predictions[part, 0]
            columns["score"] = scores[part]
            if spec.threshold is not None:
                columns["anomaly"] = flags[k][s.split :]
            if s.labels is not None:
                columns["label"] = s.labels[s.split :]
        frames.append(pd.DataFrame(columns))
    frame = pd.concat(frames, ignore_index=True)
    if bundle.outputs.is_classifier:
        return _classification_metrics(bundle, series, predictions, test), frame
    metrics = (
        stepped.forecast_metrics()
        if stepped.horizons
        else _forecast_metrics(bundle, series, frame, season)
    )
    if "label" in frame:
        one_step = [predictions[w, 0].astype(np.float64) for w in whole]
        test_of = [slice(s.split, len(s.x)) for s in series]
        baselines = {
            "residual_z": np.concatenate(
                [
                    z[t]
                    for z, t in zip(
                        residual_z(series, one_step, spec.horizon), test_of, strict=True
                    )
                ]
            ),
            "raw_z": np.concatenate([rolling_z(s.level[: len(s.x)])[s.split :] for s in series]),
        }
        metrics.update(anomaly_metrics(frame, baselines, spec.threshold))
    return metrics, frame


class _Stepped:
    """Every tick of every series through one engine, and the engine's quality figures.

    All streams go in a few calls, interleaved by position: a stream's ticks
    stay in order and the streams advance together, one batched step per
    tick. The engine judges its forecasts of each tracked horizon ``h`` as
    their truths arrive (``Engine.quality``); a call ends where the truths of
    test forecasts begin (position ``split + h``), and the rows after a
    series' last forecast (``Series.tail``) bring the last truths. So the test
    figures are what the engine reports while the test part is served, as a
    live daemon reports them (``forecast_metrics``).
    """

    def __init__(self, engine: Engine, series: list[Series]) -> None:
        quality = engine.quality
        self.horizons = [q.horizon for q in quality.horizons] if quality is not None else []
        rows = [np.concatenate([s.x, s.tail]) if s.tail.size else s.x for s in series]
        outputs = engine.bundle.config.output_size
        total = sum(len(r) for r in rows)
        predictions = np.empty((total, outputs), dtype=np.float32)
        scores = np.empty(total)
        starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])[:-1]]).astype(np.int64)
        self.at: dict[int, QualityReport | None] = {}
        done = [0] * len(series)
        for h in [*sorted(set(self.horizons)), None]:
            stop = [
                len(r) if h is None else min(s.split + h, len(r))
                for s, r in zip(series, rows, strict=True)
            ]
            where = np.concatenate(
                [np.arange(a, b) + st for a, b, st in zip(done, stop, starts, strict=True)]
            ).astype(np.int64)
            position = np.concatenate([np.arange(a, b) for a, b in zip(done, stop, strict=True)])
            which = np.concatenate(
                [np.full(b - a, k) for k, (a, b) in enumerate(zip(done, stop, strict=True))]
            )
            order = np.lexsort((which, position))
            if order.size:
                result = engine.step(
                    [series[k].stream for k in which[order].tolist()],
                    np.concatenate(rows)[where[order]],
                )
                predictions[where[order]] = result.predictions
                scores[where[order]] = result.scores
            done = stop
            if h is not None:
                self.at[h] = engine.quality
        self.final = engine.quality
        keep = np.concatenate(
            [np.arange(len(s.x)) + st for s, st in zip(series, starts, strict=True)]
        ).astype(np.int64)
        self.predictions, self.scores = predictions[keep], scores[keep]

    def forecast_metrics(self) -> dict[str, Any]:
        """The test part's errors per tracked horizon (``horizons``, by horizon), and
        the model's own horizon's at the top level: ``mae``, ``rmse``, and each
        naive baseline's (``persistence_mae``, ``rmse_over_persistence``, ...);
        ``train_mae`` is the training part's (the histogram buckets' scale)."""
        assert self.final is not None
        per: dict[str, dict[str, Any]] = {}
        for k, h in enumerate(self.horizons):
            before = self.at[h]
            assert before is not None
            test = self.final.horizons[k].since(before.horizons[k])
            per[str(h)] = _horizon_figures(test, before.horizons[k])
        return {**per[str(self.horizons[0])], "horizons": per}


def _horizon_figures(test: HorizonQuality, train: HorizonQuality) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "test_ticks": test.model.count,
        "rmse": test.model.rms,
        "mae": test.model.mean,
        "train_mae": train.model.mean,
    }
    for name, base in test.baselines.items():
        figures[f"{name}_rmse"] = base.rms
        figures[f"{name}_mae"] = base.mean
        figures[f"rmse_over_{name}"] = test.model.rms / base.rms if base.rms else math.nan
    return figures


def _forecast_metrics(
    bundle: Bundle, series: list[Series], frame: pd.DataFrame, season: int | None
) -> dict[str, Any]:
    horizon = bundle.outputs.horizon
    err = (frame["prediction"] - frame["truth"]).to_numpy(np.float64)
    rmse, mae = float(np.sqrt(np.mean(err**2))), float(np.mean(np.abs(err)))
    metrics: dict[str, Any] = {"test_ticks": int(err.size), "rmse": rmse, "mae": mae}
    # Persistence forecasts the last value seen; seasonal persistence the
    # value one season before the target time.
    baselines = {"persistence": 0} | ({f"seasonal_{season}": season - horizon} if season else {})
    for name, lag in baselines.items():
        naive = []
        for s in series:
            t = np.arange(s.split, len(s.x))
            ok = t - lag >= 0
            naive.append(s.level[t[ok] - lag] - s.y[t[ok], 0])
        nai = np.concatenate(naive).astype(np.float64)
        b_rmse = float(np.sqrt(np.mean(nai**2))) if nai.size else math.nan
        metrics[f"{name}_rmse"] = b_rmse
        metrics[f"{name}_mae"] = float(np.mean(np.abs(nai))) if nai.size else math.nan
        metrics[f"rmse_over_{name}"] = rmse / b_rmse if b_rmse else math.nan
    return metrics


def _classification_metrics(
    bundle: Bundle, series: list[Series], predictions: F32, test: list[slice]
) -> dict[str, Any]:
    truth = np.concatenate([s.y[s.split :, 0] for s in series]).astype(np.int64)
    guess = np.concatenate([predictions[part].argmax(axis=1) for part in test])
    previous = np.concatenate([s.y[s.split - 1 : -1, 0] for s in series]).astype(np.int64)
    majority = np.bincount(np.concatenate([s.y[: s.split, 0] for s in series]).astype(np.int64))
    binary = len(bundle.outputs.classes) == 2
    average = "binary" if binary else "macro"
    return {
        "test_ticks": int(truth.size),
        "accuracy": float(accuracy_score(truth, guess)),
        "f1": float(f1_score(truth, guess, average=average, zero_division=0)),
        "f1_average": average,
        "majority_accuracy": float(np.mean(truth == int(majority.argmax()))),
        "persistence_accuracy": float(np.mean(truth == previous)),
    }


def _flags(spec: OutputSpec, scores: list[F64]) -> list[F64]:
    """Each stream's flags over its whole ``scores [T_i]`` (1, 0, NaN), as the engine gives them."""
    assert spec.threshold is not None
    if spec.threshold_step:
        assert spec.false_alarm_rate is not None
        flag = AdaptiveFlag(spec.threshold, spec.false_alarm_rate, spec.threshold_step, 0)
        return flag.replay(scores)
    return [np.where(np.isnan(s), np.nan, (s > spec.threshold) * 1.0) for s in scores]

"""Training: chronological split, MinMax scaling, stateful (TBPTT) or window mode.

Evaluation goes through ``Engine.step`` tick by tick (invariant 5): the
metrics recorded in ``bundle.json`` are what serving the model gives.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from tqdm import tqdm

from streamlstm import Affine, Bundle, Engine, ModelConfig, OutputSpec, StreamLSTM
from streamlstm.errors import ConfigError, InputError
from streamlstm.training.data import numeric_columns, require_columns, time_values

__all__ = ["Series", "TrainOptions", "class_names", "evaluate", "fit", "prepare", "train"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Fewest optimizer steps in one epoch (short series repeat passes to reach it).
MIN_UPDATES_PER_EPOCH = 50


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    features: tuple[str, ...]
    target: str | None = None
    time_column: str | None = None
    stream_column: str | None = None
    mode: str = "stateful"
    seq_len: int = 60
    hidden_size: int = 128
    num_layers: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 50
    clip_norm: float = 1.0
    patience: int = 10
    train_fraction: float = 0.8
    horizon: int = 1
    burn_in: int = 10
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    task: str = "forecast"
    label_column: str | None = None
    target_transform: str = "auto"
    season: int | None = None
    score_span: int = 100
    max_gap_factor: float | None = 5.0
    missing: str = "error"

    def __post_init__(self) -> None:
        if self.missing not in ("error", "interpolate", "ffill", "drop"):
            raise ConfigError(
                f"missing: must be error, interpolate, ffill or drop, got {self.missing!r}"
            )
        if self.task not in ("forecast", "classify"):
            raise ConfigError(f"task: must be forecast or classify, got {self.task!r}")
        if self.task == "classify" and not self.label_column:
            raise ConfigError("label_column: --task classify needs --label-column")
        if self.mode not in ("stateful", "window"):
            raise ConfigError(f"mode: must be stateful or window, got {self.mode!r}")
        if self.target_transform not in ("auto", "level", "diff"):
            raise ConfigError(
                f"target_transform: must be auto, level or diff, got {self.target_transform!r}"
            )
        if self.target_transform == "diff" and self.target_column not in self.features:
            raise ConfigError(
                f"target_transform: diff needs the target {self.target_column!r} among "
                "--features: the engine adds the forecast change to the tick's current value"
            )
        if self.season is not None and self.season < self.horizon:
            raise ConfigError(f"season: must be at least the horizon ({self.horizon})")
        for name in ("seq_len", "horizon", "epochs", "batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @property
    def target_column(self) -> str:
        return self.target or self.features[0]

    @property
    def shift(self) -> int:
        """How far ahead the target lies: the horizon, or 0 for a classifier's own tick."""
        return 0 if self.task == "classify" else self.horizon


@dataclass
class Series:
    """One stream: inputs ``x [T, F]`` and what tick t is asked to predict.

    ``y [T, 1]`` is the target level at t + horizon (forecasting) or the class
    index of tick t (classification); ``level [T + horizon]`` is the target
    column itself (for baselines); ``labels [T]`` the optional 0/1 anomaly
    labels of a forecasting series.
    """

    stream: str
    x: F32
    y: F32
    split: int  # first test index
    level: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: npt.NDArray[np.int64] | None = None


def prepare(
    frame: pd.DataFrame, opts: TrainOptions, classes: Sequence[str] | None = None
) -> list[Series]:
    """Per-stream series sorted by time, with the target shifted by the horizon.

    ``classes`` fixes the label order of a classifier (default: sorted labels).
    """
    target = opts.target_column
    cols = list(dict.fromkeys([*opts.features, target]))
    if opts.stream_column:
        require_columns(frame, [opts.stream_column], "stream_column")
    if opts.time_column:
        require_columns(frame, [opts.time_column], "time_column")
    values = numeric_columns(frame, cols, "features", allow_missing=opts.missing != "error")
    labels = _labels(frame, opts, classes)
    groups = (
        frame.groupby(opts.stream_column, sort=True) if opts.stream_column else [("series", frame)]
    )
    out = []
    for stream, part in groups:
        if opts.time_column:
            part = _in_time_order(part, opts, stream)
        v = _fill(values.loc[part.index], opts.missing)
        if opts.missing == "drop":
            part = part.loc[v.index]
        x = v[list(opts.features)].to_numpy(np.float32)
        level = v[target].to_numpy(np.float32)
        n = len(part) - opts.shift
        if n < opts.seq_len + 2:
            raise InputError(
                "data",
                f"stream {stream!r} has {len(part)} rows; at least seq_len + horizon + 2 "
                f"({opts.seq_len + opts.shift + 2}) are needed",
            )
        split = int(n * opts.train_fraction)
        lab = labels.loc[part.index].to_numpy(np.int64) if labels is not None else None
        if opts.task == "classify":
            assert lab is not None
            y = lab[:, None].astype(np.float32)
            out.append(Series(str(stream), x, y, split, level))
        else:
            y = level[opts.shift :][:, None]
            anomalies = None if lab is None else lab[:n]
            out.append(Series(str(stream), x[:n], y, split, level, anomalies))
    return out


def _fill(values: pd.DataFrame, how: str) -> pd.DataFrame:
    """Empty cells of one stream's columns (already in time order) filled or dropped."""
    if how == "drop":
        return values.dropna()
    if how == "interpolate":
        return values.interpolate(limit_direction="both")
    if how == "ffill":
        return values.ffill().bfill()
    return values


def class_names(frame: pd.DataFrame, opts: TrainOptions) -> tuple[str, ...]:
    """A classifier's classes: the label column's distinct values as text, sorted."""
    assert opts.label_column is not None
    require_columns(frame, [opts.label_column], "label_column")
    return tuple(sorted(frame[opts.label_column].dropna().astype(str).unique()))


def _labels(
    frame: pd.DataFrame, opts: TrainOptions, classes: Sequence[str] | None
) -> pd.Series | None:
    """Class indices (classify) or 0/1 anomaly labels (forecast) of every row."""
    if not opts.label_column:
        return None
    require_columns(frame, [opts.label_column], "label_column")
    column = frame[opts.label_column]
    if column.isna().any():
        row = int(column.isna().to_numpy().nonzero()[0][0])
        raise InputError("label_column", f"column {opts.label_column!r} is empty at row {row + 2}")
    text = column.astype(str)
    if opts.task == "forecast":
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.isna().any() or not numeric.isin([0, 1]).all():
            raise InputError(
                "label_column",
                f"anomaly labels in {opts.label_column!r} must be 0 or 1 "
                f"(found {sorted(text.unique())[:5]})",
            )
        return numeric.astype(np.int64)
    names = list(classes) if classes is not None else list(class_names(frame, opts))
    if len(names) < 2:
        raise InputError("label_column", f"{opts.label_column!r} has a single class {names}")
    unknown = sorted(set(text.unique()) - set(names))
    if unknown:
        raise InputError("label_column", f"labels {unknown[:5]} are not among the model's classes")
    return text.map({name: i for i, name in enumerate(names)}).astype(np.int64)


def _in_time_order(part: pd.DataFrame, opts: TrainOptions, stream: object) -> pd.DataFrame:
    """Rows sorted by time; duplicate timestamps and (optionally) gaps are errors."""
    assert opts.time_column is not None
    raw = part[opts.time_column]
    times = time_values(raw, where=f"stream {stream!r}: ")
    if times.duplicated().any():
        dup = raw[times.duplicated()].iloc[0]
        raise InputError("time_column", f"stream {stream!r} has duplicate timestamp {dup!r}")
    order = np.argsort(times.to_numpy(), kind="stable")
    part, times, raw = part.iloc[order], times.iloc[order], raw.iloc[order]
    if opts.max_gap_factor is not None and len(part) > 2:
        steps = np.diff(times.to_numpy()).astype("float64")
        median = float(np.median(steps))
        worst = int(np.argmax(steps))
        if median > 0 and steps[worst] > opts.max_gap_factor * median:
            raise InputError(
                "time_column",
                f"stream {stream!r} has a gap between {raw.iloc[worst]} and "
                f"{raw.iloc[worst + 1]}: {steps[worst] / median:.1f} times its median "
                f"interval. Fill or split the series, or raise --max-gap-factor "
                f"(now {opts.max_gap_factor:g}) or pass --allow-gaps",
            )
    return part


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(frame: pd.DataFrame, opts: TrainOptions) -> Bundle:
    """Train a bundle; its ``metrics`` come from an ``Engine`` replay of the test period."""
    return fit(frame, opts)[0]


def fit(frame: pd.DataFrame, opts: TrainOptions) -> tuple[Bundle, pd.DataFrame]:
    """``train``, also returning the test-period predictions frame of ``evaluate``."""
    _seed(opts.seed)
    classes = class_names(frame, opts) if opts.task == "classify" else None
    series = prepare(frame, opts, classes)
    if opts.target_transform == "auto":
        opts = replace(opts, target_transform=_choose_transform(series, opts))
    x_scaler = MinMaxScaler().fit(np.concatenate([s.x[: s.split] for s in series]))
    input_affine = Affine(scale=x_scaler.scale_, offset=x_scaler.min_)
    target_affine = None
    targets = [_model_target(s, opts) for s in series]
    if classes is None:
        fit_part = [t[: s.split] for t, s in zip(targets, series, strict=True)]
        y_scaler = MinMaxScaler().fit(np.concatenate(fit_part))
        target_affine = Affine(scale=y_scaler.scale_, offset=y_scaler.min_)
    config = ModelConfig(
        input_size=len(opts.features),
        hidden_sizes=(opts.hidden_size,) * opts.num_layers,
        output_size=len(classes) if classes else 1,
        dropout=opts.dropout,
    )
    target_feature = (
        opts.features.index(opts.target_column) if opts.target_column in opts.features else None
    )
    outputs = OutputSpec(
        activation="softmax" if classes else "linear",
        transform=opts.target_transform,
        target_feature=None if classes else target_feature,
        horizon=opts.horizon,
        classes=classes or (),
        score_span=opts.score_span if not classes and target_feature is not None else None,
    )
    device = torch.device(
        "cuda"
        if opts.device == "auto" and torch.cuda.is_available()
        else ("cpu" if opts.device == "auto" else opts.device)
    )
    model = StreamLSTM(config).to(device)
    xs = [torch.from_numpy(input_affine.apply(s.x)) for s in series]
    if classes is None:
        assert target_affine is not None
        ys = [torch.from_numpy(target_affine.apply(t)) for t in targets]
        mse = nn.MSELoss()
        loss_fn: Loss = mse
    else:
        ys = [torch.from_numpy(s.y[:, 0].astype(np.int64)) for s in series]
        cross_entropy = nn.CrossEntropyLoss()

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # type: ignore[no-any-return]

    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    run = _Run(model, xs, ys, series, opts, optimizer, loss_fn, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5, factor=0.5)
    best, best_state, waited, history = math.inf, None, 0, []
    bar = tqdm(range(opts.epochs), desc="epochs", disable=not opts.progress)
    for epoch in bar:
        model.train()
        train_loss = run.epoch(epoch)
        model.eval()
        val_loss = run.validation_loss()
        scheduler.step(val_loss)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.5f}", val=f"{val_loss:.5f}")
        if val_loss < best - 1e-9:
            best, waited = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= opts.patience:
                logger.info("early stop after epoch %d (best val %.6f)", epoch + 1, best)
                break
    model = model.cpu()
    if best_state is not None:
        model.load_state_dict(best_state)
    bundle = Bundle(
        config=config,
        model=model,
        feature_names=opts.features,
        target_names=classes or (opts.target_column,),
        input_scaler=input_affine,
        target_scaler=target_affine,
        warmup_steps=opts.burn_in,
        outputs=outputs,
        training={
            "task": opts.task,
            "mode": opts.mode,
            "seq_len": opts.seq_len,
            "horizon": opts.horizon,
            "target_transform": opts.target_transform,
            "season": opts.season,
            "epochs_run": len(history),
            "history": history,
            "seed": opts.seed,
            "streams": len(series),
        },
    )
    bundle.metrics, predictions = evaluate(bundle, series, season=opts.season)
    return bundle, predictions


def _choose_transform(series: list[Series], opts: TrainOptions) -> str:
    """``diff`` for a trending target that is also an input, else ``level``.

    A level model cannot forecast beyond the range it was trained on, which is
    where a trending series' test period lies; learning the change can. The
    test: a straight line explains more than half of some stream's training
    variance.
    """
    if opts.task != "forecast" or opts.target_column not in opts.features:
        return "level"
    for s in series:
        level = s.level[: s.split].astype(np.float64)
        t = np.arange(level.size)
        slope, intercept = np.polyfit(t, level, 1)
        residual = level - (slope * t + intercept)
        total = float(np.var(level))
        if total > 0 and 1.0 - float(np.var(residual)) / total > 0.5:
            logger.info("stream %r: the target trends; learning its change (diff)", s.stream)
            return "diff"
    return "level"


def _model_target(series: Series, opts: TrainOptions) -> F32:
    """What the model learns for a forecaster: the level ahead, or its change from now."""
    if opts.target_transform == "diff":
        index = opts.features.index(opts.target_column)
        return series.y - series.x[:, index : index + 1]
    return series.y


@dataclass
class _Run:
    """What one training run's epochs share: the model, the data in model units,
    the optimizer and the loss."""

    model: StreamLSTM
    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    series: list[Series]
    opts: TrainOptions
    optimizer: torch.optim.Optimizer
    loss_fn: Loss
    device: torch.device

    def epoch(self, epoch: int) -> float:
        """Mean batch loss of one epoch of at least ``MIN_UPDATES_PER_EPOCH`` updates."""
        rng = np.random.default_rng(self.opts.seed + epoch)
        losses = _RunningLoss(f"epoch {epoch + 1}", self.opts.progress)
        # A short series gives a pass of a handful of updates; an epoch repeats
        # passes (fresh offsets each time) so that early stopping and the LR
        # schedule judge a model after a meaningful amount of training.
        try:
            while True:
                before = len(losses)
                if self.opts.mode == "window":
                    self._window_pass(rng, losses)
                else:
                    self._stateful_pass(rng, losses)
                if len(losses) >= MIN_UPDATES_PER_EPOCH or len(losses) == before:
                    return float(np.mean(losses)) if len(losses) else math.nan
        finally:
            losses.close()

    def _window_pass(self, rng: np.random.Generator, losses: list[float]) -> None:
        opts, xs, ys = self.opts, self.xs, self.ys
        windows = [
            (i, t) for i, s in enumerate(self.series) for t in range(opts.seq_len, s.split + 1)
        ]
        rng.shuffle(windows)
        for b in range(0, len(windows), opts.batch_size):
            chunk = windows[b : b + opts.batch_size]
            x = torch.stack([xs[i][t - opts.seq_len : t] for i, t in chunk]).to(self.device)
            y = torch.stack([ys[i][t - 1] for i, t in chunk]).to(self.device)
            out, _ = self.model(x)
            losses.append(self._update(out[:, -1], y))

    def _stateful_pass(self, rng: np.random.Generator, losses: list[float]) -> None:
        # Lanes are (stream, random start offset); consecutive chunks carry state.
        opts, xs, ys = self.opts, self.xs, self.ys
        lanes_per_stream = max(1, opts.batch_size // len(self.series))
        lanes = [
            (i, int(rng.integers(0, opts.seq_len)))
            for i in range(len(self.series))
            for _ in range(lanes_per_stream)
        ]
        rng.shuffle(lanes)
        length = min(s.split for s in self.series)
        for b in range(0, len(lanes), opts.batch_size):
            group = lanes[b : b + opts.batch_size]
            state = None
            span = length - max(o for _, o in group)
            for t in range(0, span - 1, opts.seq_len):
                end = min(t + opts.seq_len, span)
                x = torch.stack([xs[i][o + t : o + end] for i, o in group]).to(self.device)
                y = torch.stack([ys[i][o + t : o + end] for i, o in group]).to(self.device)
                out, state = self.model(x, state)
                state = tuple((h.detach(), c.detach()) for h, c in state)
                skip = opts.burn_in if t == 0 else 0
                if out.shape[1] > skip:
                    losses.append(self._update(out[:, skip:], y[:, skip:]))

    def _update(self, out: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.loss_fn(out, y)
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip_norm)
        self.optimizer.step()
        return float(loss.item())

    def validation_loss(self) -> float:
        """Mean loss over each stream's test period, run from zero state over the whole stream."""
        losses = []
        with torch.no_grad():
            for x, y, s in zip(self.xs, self.ys, self.series, strict=True):
                out, _ = self.model(x[None].to(self.device))
                losses.append(float(self.loss_fn(out[0, s.split :], y[s.split :].to(self.device))))
        return float(np.mean(losses))


class _RunningLoss(list[float]):
    """Batch losses of one epoch, shown on a transient progress bar as they come."""

    def __init__(self, label: str, show: bool) -> None:
        super().__init__()
        self._bar = tqdm(desc=label, unit="batch", leave=False, disable=not show)

    def append(self, loss: float) -> None:
        super().append(loss)
        self._bar.update(1)
        if len(self) % 10 == 1:
            self._bar.set_postfix(loss=f"{float(np.mean(self[-50:])):.5f}")

    def close(self) -> None:
        self._bar.close()


def evaluate(
    bundle: Bundle, series: list[Series], *, season: int | None = None
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Predictions of every test tick, fed tick by tick through ``Engine.step``.

    Each stream's state is first carried through its training period, then
    each test tick is answered before the next arrives, as in serving.
    Returns the metrics and a frame of (stream, index, truth, prediction, ...).
    """
    # All streams in one call, interleaved by position: a stream's ticks stay
    # in order, and the streams advance together, one batched step per tick.
    engine = Engine(bundle, max_streams=max(1, len(series)))
    lengths = np.array([len(s.x) for s in series])
    which = np.concatenate([np.full(n, k) for k, n in enumerate(lengths)])
    position = np.concatenate([np.arange(n) for n in lengths])
    order = np.lexsort((which, position))
    ids = [series[k].stream for k in which[order].tolist()]
    x = np.concatenate([s.x for s in series])[order]
    result = engine.step(ids, x)
    predictions = np.empty((len(order), bundle.config.output_size), dtype=np.float32)
    predictions[order] = result.predictions
    scores = np.empty(len(order))
    scores[order] = result.scores
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    test = [
        slice(start + s.split, start + len(s.x)) for s, start in zip(series, starts, strict=True)
    ]
    frames = []
    for s, part in zip(series, test, strict=True):
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
            if s.labels is not None:
                columns["label"] = s.labels[s.split :]
        frames.append(pd.DataFrame(columns))
    frame = pd.concat(frames, ignore_index=True)
    if bundle.outputs.is_classifier:
        return _classification_metrics(bundle, series, predictions, test), frame
    return _forecast_metrics(bundle, series, frame, season), frame


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
    if "label" in frame:
        scored = frame[np.isfinite(frame["score"])]
        if scored["label"].nunique() == 2:
            metrics["score_roc_auc"] = float(roc_auc_score(scored["label"], scored["score"]))
        else:
            metrics["score_roc_auc"] = math.nan
            logger.warning("ROC AUC needs both labels among the scored test ticks")
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

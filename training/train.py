"""Training: chronological split, MinMax scaling, stateful (TBPTT) or window mode.

Evaluation goes through ``Engine.step`` tick by tick (invariant 5): the
metrics recorded in ``bundle.json`` are what serving the model gives
(``evaluation``). Options are in ``options``, per-stream series in ``series``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from tqdm import tqdm

from streamlstm import Affine, Bundle, ModelConfig, OutputSpec, StreamLSTM
from streamlstm.training.anomaly import baseline_span, horizon_scale, smoothing_span
from streamlstm.training.evaluation import evaluate
from streamlstm.training.options import TrainOptions
from streamlstm.training.series import Series, class_names, prepare

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


__all__ = ["Series", "TrainOptions", "class_names", "evaluate", "fit", "prepare", "train"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Fewest optimizer steps in one epoch (short series repeat passes to reach it).
MIN_UPDATES_PER_EPOCH = 50


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(frame: pd.DataFrame, opts: TrainOptions) -> Bundle:
    """Train a bundle; its ``metrics`` come from an ``Engine`` replay of the test period."""
    return fit(frame, opts)[0]


def fit(frame: pd.DataFrame, opts: TrainOptions) -> tuple[Bundle, pd.DataFrame]:
    """``train``, also returning the test-period predictions frame of ``evaluate``."""
    # Subnormal floats (tiny gradients late in training) cost CPUs up to ~100x per
    # operation; flushing them to zero while training changes nothing measurable.
    # Threads started from here on inherit the mode; the replay runs without it.
    flush = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)  # the same model from the same data on any machine
    try:
        return _fit(frame, opts)
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)


def _fit(frame: pd.DataFrame, opts: TrainOptions) -> tuple[Bundle, pd.DataFrame]:
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
        cell=opts.cell,
        input_size=len(opts.features),
        hidden_sizes=(opts.hidden_size,) * opts.num_layers,
        output_size=len(classes) if classes else opts.outputs,
        dropout=opts.dropout,
    )
    target_feature = (
        opts.features.index(opts.target_column) if opts.target_column in opts.features else None
    )
    span = (
        None
        if classes or target_feature is None
        else opts.score_span or smoothing_span(series, opts.outputs)
    )
    multi = opts.outputs > 1 and not classes and span is not None
    outputs = OutputSpec(
        activation="softmax" if classes else "linear",
        transform=opts.target_transform,
        target_feature=None if classes else target_feature,
        horizon=opts.horizon,
        classes=classes or (),
        score_span=span,
        # Each horizon's residual scale is measured once the model is trained; the
        # score counts the later half of the horizons (best on held-out ECG).
        score_scale=(1.0,) * opts.outputs if multi else (),
        score_from=opts.outputs // 2 + 1 if multi else 1,
        score_stages=opts.score_stages if multi else 1,
        score_baseline_span=(
            baseline_span(opts.score_baseline_span, span) if multi and span is not None else None
        ),
    )
    device = _device(opts.device)
    model = StreamLSTM(config).to(device)
    xs = [torch.from_numpy(input_affine.apply(s.x)) for s in series]
    if classes is None:
        assert target_affine is not None
        ys = [
            torch.from_numpy(_normal_only(target_affine.apply(t), s, opts))
            for t, s in zip(targets, series, strict=True)
        ]
        loss_fn: Loss = _masked_mse
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
        target_names=classes or _target_names(opts),
        input_scaler=input_affine,
        target_scaler=target_affine,
        warmup_steps=opts.burn_in,
        outputs=outputs,
        training=_training_facts(opts, outputs, history, series),
    )
    if outputs.score_scale:
        scale = horizon_scale(bundle, series, opts.burn_in)
        bundle.outputs = replace(outputs, score_scale=scale)
    torch.set_flush_denormal(False)
    bundle.metrics, predictions = evaluate(
        bundle,
        series,
        season=opts.season,
        false_alarm_rate=opts.false_alarm_rate,
        threshold_step=opts.threshold_step,
    )
    return bundle, predictions


def _device(name: str) -> torch.device:
    """``auto``: CUDA where there is one, else the CPU; any other name as given."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _training_facts(
    opts: TrainOptions, outputs: OutputSpec, history: list[dict[str, float]], series: list[Series]
) -> dict[str, Any]:
    """What the bundle records of how it was trained (``Bundle.training``)."""
    return {
        "task": opts.task,
        "cell": opts.cell,
        "mode": opts.mode,
        "seq_len": opts.seq_len,
        "horizon": opts.horizon,
        "score": opts.score if outputs.score_span is not None else None,
        "target_transform": opts.target_transform,
        "season": opts.season,
        "epochs_run": len(history),
        "history": history,
        "seed": opts.seed,
        "streams": len(series),
        "inputs": input_statistics(series),
    }


def input_statistics(series: list[Series]) -> dict[str, list[float]]:
    """Each feature's mean and standard deviation over the training parts, in original
    units: what the serving engine measures input drift against (``quality``)."""
    x = np.concatenate([s.x[: s.split] for s in series]).astype(np.float64)
    return {"mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}


def _target_names(opts: TrainOptions) -> tuple[str, ...]:
    """One forecast, or the multi-horizon scoring model's ``target+1 .. target+H``."""
    if opts.outputs == 1:
        return (opts.target_column,)
    return tuple(f"{opts.target_column}+{j + 1}" for j in range(opts.outputs))


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


def _normal_only(y: F32, series: Series, opts: TrainOptions) -> F32:
    """Model targets ``y [T, O]`` with those of labeled anomalies in the training part
    made NaN: a forecaster that never learns an anomaly's shape forecasts it badly,
    which is what its score measures. The test period keeps every target."""
    if series.labels is None or opts.task != "forecast":
        return y
    out = y.copy()
    labels = np.concatenate([series.labels, np.zeros(y.shape[1] + opts.horizon, np.int64)])
    t = np.arange(series.split)
    for j in range(y.shape[1]):
        out[t[labels[t + opts.horizon + j] == 1], j] = np.nan
    return out


def _masked_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the targets that are not NaN (zero when there are none)."""
    known = ~torch.isnan(y)
    if bool(known.all()):
        return torch.mean((out - y) ** 2)
    if not bool(known.any()):
        return (out * 0.0).sum()
    return torch.mean((out[known] - y[known]) ** 2)


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
            (i, t) for i, s in enumerate(self.series) for t in range(opts.seq_len, fit_end(s) + 1)
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
        length = min(fit_end(s) for s in self.series)
        for b in range(0, len(lanes), opts.batch_size):
            group = lanes[b : b + opts.batch_size]
            state = None
            span = length - max(o for _, o in group)
            for t in range(0, span - 1, opts.seq_len):
                end = min(t + opts.seq_len, span)
                x = torch.stack([xs[i][o + t : o + end] for i, o in group]).to(self.device)
                y = torch.stack([ys[i][o + t : o + end] for i, o in group]).to(self.device)
                out, state = self.model(x, state)
                state = tuple(tuple(part.detach() for part in layer) for layer in state)
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
        """Mean loss over the last tenth of each stream's training part (held out of the
        updates), run from zero state up to the test period, which nothing here sees."""
        losses = []
        with torch.no_grad():
            for x, y, s in zip(self.xs, self.ys, self.series, strict=True):
                out, _ = self.model(x[None, : s.split].to(self.device))
                held = slice(fit_end(s), s.split)
                losses.append(float(self.loss_fn(out[0, held], y[held].to(self.device))))
        return float(np.mean(losses))


def fit_end(series: Series) -> int:
    """Where a stream's updates stop: the last tenth of its training part (at least a
    tick) is held out for early stopping and the learning-rate schedule."""
    return series.split - max(1, series.split // 10)


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

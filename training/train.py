"""Training: chronological split, MinMax scaling, stateful (TBPTT) or window mode.

Evaluation goes through ``Engine.step`` tick by tick (invariant 5): the
metrics recorded in ``bundle.json`` are what serving the model gives.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from tqdm import tqdm

from streamlstm import Affine, Bundle, Engine, ModelConfig, StreamLSTM
from streamlstm.errors import InputError
from training.data import numeric_columns, require_columns

__all__ = ["Series", "TrainOptions", "evaluate", "prepare", "train"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


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


@dataclass
class Series:
    """One stream: inputs ``x [T, F]``, target ``y [T, 1]`` (the value at t + horizon)."""

    stream: str
    x: F32
    y: F32
    split: int  # first test index
    raw_target: F32 = field(default_factory=lambda: np.zeros(0, np.float32))


def prepare(frame: pd.DataFrame, opts: TrainOptions) -> list[Series]:
    """Per-stream series sorted by time, with the target shifted by the horizon."""
    target = opts.target or opts.features[0]
    cols = list(dict.fromkeys([*opts.features, target]))
    if opts.stream_column:
        require_columns(frame, [opts.stream_column], "stream_column")
    if opts.time_column:
        require_columns(frame, [opts.time_column], "time_column")
    values = numeric_columns(frame, cols, "features")
    groups = (
        frame.groupby(opts.stream_column, sort=True) if opts.stream_column else [("series", frame)]
    )
    out = []
    for stream, part in groups:
        if opts.time_column:
            times = part[opts.time_column]
            if times.duplicated().any():
                dup = times[times.duplicated()].iloc[0]
                raise InputError(
                    "time_column", f"stream {stream!r} has duplicate timestamp {dup!r}"
                )
            part = part.sort_values(opts.time_column, kind="stable")
        v = values.loc[part.index]
        x = v[list(opts.features)].to_numpy(np.float32)
        level = v[target].to_numpy(np.float32)
        n = len(part) - opts.horizon
        if n < opts.seq_len + 2:
            raise InputError(
                "data",
                f"stream {stream!r} has {len(part)} rows; at least seq_len + horizon + 2 "
                f"({opts.seq_len + opts.horizon + 2}) are needed",
            )
        split = int(n * opts.train_fraction)
        out.append(Series(str(stream), x[:n], level[opts.horizon :][:, None], split, level))
    return out


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(frame: pd.DataFrame, opts: TrainOptions) -> Bundle:
    _seed(opts.seed)
    series = prepare(frame, opts)
    x_scaler = MinMaxScaler().fit(np.concatenate([s.x[: s.split] for s in series]))
    y_scaler = MinMaxScaler().fit(np.concatenate([s.y[: s.split] for s in series]))
    input_affine = Affine(scale=x_scaler.scale_, offset=x_scaler.min_)
    target_affine = Affine(scale=y_scaler.scale_, offset=y_scaler.min_)
    config = ModelConfig(
        input_size=len(opts.features),
        hidden_sizes=(opts.hidden_size,) * opts.num_layers,
        dropout=opts.dropout,
    )
    device = torch.device(
        "cuda"
        if opts.device == "auto" and torch.cuda.is_available()
        else ("cpu" if opts.device == "auto" else opts.device)
    )
    model = StreamLSTM(config).to(device)
    xs = [torch.from_numpy(input_affine.apply(s.x)) for s in series]
    ys = [torch.from_numpy(target_affine.apply(s.y)) for s in series]
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5, factor=0.5)
    loss_fn = nn.MSELoss()
    best, best_state, waited, history = math.inf, None, 0, []
    bar = tqdm(range(opts.epochs), desc="epochs", disable=not opts.progress)
    for epoch in bar:
        model.train()
        train_loss = _epoch(model, xs, ys, series, opts, optimizer, loss_fn, device, epoch)
        model.eval()
        val_loss = _validation_loss(model, xs, ys, series, loss_fn, device)
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
        target_names=(opts.target or opts.features[0],),
        input_scaler=input_affine,
        target_scaler=target_affine,
        warmup_steps=opts.burn_in,
        training={
            "mode": opts.mode,
            "seq_len": opts.seq_len,
            "horizon": opts.horizon,
            "epochs_run": len(history),
            "history": history,
            "seed": opts.seed,
            "streams": len(series),
        },
    )
    bundle.metrics, _ = evaluate(bundle, series)
    return bundle


def _epoch(
    model: StreamLSTM,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    series: list[Series],
    opts: TrainOptions,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    epoch: int,
) -> float:
    rng = np.random.default_rng(opts.seed + epoch)
    losses = []
    if opts.mode == "window":
        windows = [(i, t) for i, s in enumerate(series) for t in range(opts.seq_len, s.split + 1)]
        rng.shuffle(windows)
        for b in range(0, len(windows), opts.batch_size):
            chunk = windows[b : b + opts.batch_size]
            x = torch.stack([xs[i][t - opts.seq_len : t] for i, t in chunk]).to(device)
            y = torch.stack([ys[i][t - 1] for i, t in chunk]).to(device)
            out, _ = model(x)
            losses.append(_update(model, optimizer, loss_fn(out[:, -1], y), opts.clip_norm))
        return float(np.mean(losses))
    # Stateful: lanes are (stream, random start offset); consecutive chunks carry state.
    lanes = []
    lanes_per_stream = max(1, opts.batch_size // len(series))
    for i in range(len(series)):
        for _ in range(lanes_per_stream):
            lanes.append((i, int(rng.integers(0, opts.seq_len))))
    length = min(s.split for s in series)
    for b in range(0, len(lanes), opts.batch_size):
        group = lanes[b : b + opts.batch_size]
        state = None
        span = length - max(o for _, o in group)
        for t in range(0, span - 1, opts.seq_len):
            end = min(t + opts.seq_len, span)
            x = torch.stack([xs[i][o + t : o + end] for i, o in group]).to(device)
            y = torch.stack([ys[i][o + t : o + end] for i, o in group]).to(device)
            out, state = model(x, state)
            state = tuple((h.detach(), c.detach()) for h, c in state)
            skip = opts.burn_in if t == 0 else 0
            if out.shape[1] <= skip:
                continue
            losses.append(
                _update(model, optimizer, loss_fn(out[:, skip:], y[:, skip:]), opts.clip_norm)
            )
    return float(np.mean(losses)) if losses else math.nan


def _update(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float
) -> float:
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.item())


def _validation_loss(
    model: StreamLSTM,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    series: list[Series],
    loss_fn: nn.Module,
    device: torch.device,
) -> float:
    losses = []
    with torch.no_grad():
        for x, y, s in zip(xs, ys, series, strict=True):
            out, _ = model(x[None].to(device))
            losses.append(float(loss_fn(out[0, s.split :], y[s.split :].to(device))))
    return float(np.mean(losses))


def evaluate(bundle: Bundle, series: list[Series]) -> tuple[dict[str, Any], pd.DataFrame]:
    """One-step forecasts of every test value, fed tick by tick through ``Engine.step``.

    Each stream's state is first carried through its training period, then
    each test tick is answered before the next arrives, as in serving.
    Returns the metrics and a frame of (stream, index, truth, prediction).
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
    predictions = np.empty(len(order), dtype=np.float32)
    predictions[order] = engine.step(ids, x).predictions[:, 0]
    errors, naive, frames = [], [], []
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for s, start in zip(series, starts.tolist(), strict=True):
        pred = predictions[start + s.split : start + len(s.x)]
        truth = s.y[s.split :, 0]
        errors.append(pred - truth)
        naive.append(s.raw_target[s.split : len(s.x)] - truth)  # persistence: the last value seen
        frames.append(
            pd.DataFrame(
                {
                    "stream": s.stream,
                    "index": np.arange(s.split, len(s.x)),
                    "truth": truth,
                    "prediction": pred,
                }
            )
        )
    err, nai = np.concatenate(errors), np.concatenate(naive)
    rmse, mae = float(np.sqrt(np.mean(err**2))), float(np.mean(np.abs(err)))
    n_rmse, n_mae = float(np.sqrt(np.mean(nai**2))), float(np.mean(np.abs(nai)))
    metrics: dict[str, Any] = {
        "test_ticks": int(err.size),
        "rmse": rmse,
        "mae": mae,
        "persistence_rmse": n_rmse,
        "persistence_mae": n_mae,
        "rmse_over_persistence": rmse / n_rmse if n_rmse else math.nan,
    }
    return metrics, pd.concat(frames, ignore_index=True)

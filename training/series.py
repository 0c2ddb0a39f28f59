"""From a table to per-stream series: time order, gaps, missing values, targets, labels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from streamlstm.errors import InputError
from streamlstm.training.data import numeric_columns, require_columns, time_values
from streamlstm.training.options import TrainOptions

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


@dataclass
class Series:
    """One stream: inputs ``x [T, F]`` and what tick t is asked to predict.

    ``y [T, O]`` is the target level at t + horizon (forecasting; at t + 1 .. t + O
    for a multi-horizon scoring model) or the class
    index of tick t (classification); ``level [T + horizon]`` is the target
    column itself (for baselines); ``labels [T]`` the optional 0/1 anomaly
    labels of a forecasting series; ``tail [shift, F]`` the inputs after the
    last forecast's tick, which bring the last forecasts' truths (evaluation
    steps them, as a live daemon would).
    """

    stream: str
    x: F32
    y: F32
    split: int  # first test index
    level: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    labels: npt.NDArray[np.int64] | None = None
    tail: F32 = field(default_factory=lambda: np.zeros((0, 0), np.float32))


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
            # Output j forecasts the target j + horizon ticks ahead (one output but
            # for the multi-horizon score, whose outputs look 1 .. H ticks ahead).
            y = np.stack(
                [level[opts.horizon + j : n + opts.horizon + j] for j in range(opts.outputs)], 1
            )
            anomalies = None if lab is None else lab[:n]
            out.append(Series(str(stream), x[:n], y, split, level, anomalies, x[n:]))
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

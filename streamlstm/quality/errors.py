"""Realized forecast errors: each forecast judged when the tick it targeted arrives.

A forecaster whose target is one of its inputs (``OutputSpec.target_feature``)
sees its truth on the same stream: the forecast made ``h`` ticks ago for this
tick meets this tick's target value. Per stream, the state store's ``extra``
columns keep what that needs, so it is reset, evicted, snapshotted,
changelogged and restored with the recurrent state:

- column 0, the *start*: the first step whose forecast may be judged. A
  forecast made at step ``s - h`` meets the truth at step ``s`` only when
  ``s - h >= start``. A hole in the history after step ``g`` (a refused
  tick) moves the start to ``g + 1``; a reset or an end zeroes it, and a zero
  start becomes the step of the stream's next tick: so a fresh stream, one
  restored from a state saved without these columns (an older daemon's, or
  with the figures off) and one that starts again all begin at a known point,
  and no forecast is ever paired with the wrong truth;
- a ring of the last ``R`` target values (``R``: the longest horizon or
  season), for the naive baselines: persistence (the value ``h`` ticks before
  the truth) and, where ``train`` used one, seasonal persistence (the value
  one season before);
- per tracked horizon ``h``, a ring of the last ``h`` forecasts of it;
- the stream's recent absolute error of the first tracked horizon and its
  naive forecast's (exponentially weighted over ``RECENT_SPAN_TICKS`` of its
  own ticks, starting at its first judged forecast): what ranks the worst
  streams (``Engine.worst_streams``), which no Prometheus label may name.

Tracked horizons: the model's (``OutputSpec.horizon``), and for a
multi-horizon model (``score_scale``, outputs 1 .. H ticks ahead) also H.
Ring slots are the step count modulo the ring's length: O(1) per tick.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.outputs import OutputSpec
from streamlstm.quality.native import NativeUpdate, quality_lib
from streamlstm.quality.report import HorizonQuality, TallyGroup

__all__ = ["RealizedErrors", "error_buckets"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

#: The span (ticks of one stream) of its recent errors (``Engine.worst_streams``).
RECENT_SPAN_TICKS = 100
_RECENT_ALPHA = 2.0 / (RECENT_SPAN_TICKS + 1.0)

#: Bucket bounds are the training MAE times these: 1/8 .. 16, in half-octaves.
_LADDER = tuple(2.0 ** (k / 2) for k in range(-6, 9))


def error_buckets(scale: float) -> tuple[float, ...]:
    """Histogram bounds (target units) around a typical absolute error ``scale``."""
    if not (math.isfinite(scale) and scale > 0):
        scale = 1.0
    return tuple(float(f"{scale * f:.3g}") for f in _LADDER)


@dataclass(frozen=True)
class _Horizon:
    output: int  # the model output that forecasts it
    horizon: int
    ring: int  # first column of its forecast ring (relative)
    lags: tuple[int, ...]  # each baseline's, in ticks
    names: tuple[str, ...]  # each baseline's
    tallies: TallyGroup  # row 0 the model's errors, then each baseline's


class RealizedErrors:
    """Realized errors of a forecaster's tracked horizons and of the naive baselines.

    ``first_column`` is where its columns start in the store's ``extra``;
    ``season`` (ticks) adds seasonal persistence; ``metrics`` is the bundle's
    training report (bucket scale and training figures). ``native``: update
    through the C kernel (``native.NativeUpdate``, the same figures bit for bit)
    where it is built; False: NumPy alone.
    """

    def __init__(
        self,
        spec: OutputSpec,
        *,
        outputs: int,
        target: str,
        first_column: int,
        season: int | None,
        metrics: Mapping[str, Any],
        native: bool = True,
    ) -> None:
        assert spec.target_feature is not None and not spec.is_classifier
        self.target_feature = spec.target_feature
        self.target = target
        self.base = first_column
        pairs = [(0, spec.horizon)]
        if spec.score_scale and outputs > 1:
            pairs.append((outputs - 1, spec.horizon + outputs - 1))
        self._levels = max([h for _, h in pairs] + [season or 0])
        column = 1 + self._levels
        self._tracked: list[_Horizon] = []
        for output, horizon in pairs:
            figures = _training_figures(metrics, horizon, first=not self._tracked)
            bounds = error_buckets(figures.get("train_mae", figures.get("mae", math.nan)))
            lags = {"persistence": horizon} | ({f"seasonal_{season}": season} if season else {})
            self._tracked.append(
                _Horizon(
                    output,
                    horizon,
                    column,
                    tuple(lags.values()),
                    tuple(lags),
                    TallyGroup(bounds, 1 + len(lags)),
                )
            )
            column += horizon
        self._recent = column  # the recent errors' two columns
        self.width = column + 2
        self._metrics = metrics
        self._native = self._native_update() if native else None

    def _native_update(self) -> NativeUpdate | None:
        lib = quality_lib()
        if lib is None:
            return None
        tracked = [
            (t.output, t.horizon, t.ring, t.lags, *_arrays(t.tallies)) for t in self._tracked
        ]
        return NativeUpdate(
            lib,
            base=self.base,
            width=self.width,
            levels=self._levels,
            recent=self._recent,
            alpha=_RECENT_ALPHA,
            tracked=tracked,
        )

    @property
    def native(self) -> bool:
        """Whether updates go through the C kernel."""
        return self._native is not None

    def update(self, extra: F64, slots: I64, steps: I64, values: F32, forecasts: F32) -> None:
        """One round of distinct streams: their ``slots``, step counts after this tick,
        target values ``[n]`` (the truth) and forecasts ``[n, O]`` in target units."""
        if self._native is not None and self._native(extra, slots, steps, values, forecasts):
            return
        # Whole rows: numpy gathers and scatters them far faster than a block of columns.
        rows_of = extra.take(slots, axis=0)
        cols = rows_of[:, self.base : self.base + self.width]
        s = steps
        # A zero start (fresh, reset, or restored without these columns): this tick.
        start = np.where(cols[:, 0] == 0.0, s, cols[:, 0])
        cols[:, 0] = start
        truth = values.astype(np.float64)
        size = self._levels
        levels = cols[:, 1 : 1 + size]
        rows = np.arange(slots.size)
        for tracked in self._tracked:
            h = tracked.horizon
            ring = cols[:, tracked.ring : tracked.ring + h]
            where = s % h
            paired = s - h >= start
            errors = np.empty((1 + len(tracked.lags), slots.size))
            # h == 1 (the common case): each ring is one column, no gather.
            errors[0] = (ring[:, 0] if h == 1 else ring[rows, where]) - truth
            for k, lag in enumerate(tracked.lags, start=1):
                naive = (
                    levels[:, 0] if self._levels == 1 else levels[rows, (s - lag) % self._levels]
                )
                errors[k] = naive - truth
                if lag != h:  # a longer lag (a season) needs a longer history
                    errors[k, s - lag < start] = np.nan
            errors[:, ~paired] = np.nan
            tracked.tallies.add(np.abs(errors, out=errors))
            if tracked is self._tracked[0]:
                self._follow(cols, errors[:2], s - h == start)
            if h == 1:
                ring[:, 0] = forecasts[:, tracked.output]
            else:
                ring[rows, where] = forecasts[:, tracked.output]
        if size == 1:
            levels[:, 0] = truth
        else:
            levels[rows, s % size] = truth
        put_rows(extra, slots, rows_of)

    def _follow(self, cols: F64, errors: F64, first: Bools) -> None:
        """Each stream's recent errors (model's, naive's) after this tick's ``errors
        [2, n]`` (NaN: none judged); ``first``: its first judged forecast since its
        history (re)started, where the average starts."""
        recent = cols[:, self._recent : self._recent + 2]
        moved = recent + _RECENT_ALPHA * (errors.T - recent)
        judged = ~np.isnan(errors[0])
        recent[:] = np.where(judged[:, None], np.where(first[:, None], errors.T, moved), recent)

    def recent(self, extra: F64, slots: I64, steps: I64) -> F64:
        """``[n, 2]``: the streams' recent absolute errors, the model's and the naive
        forecast's; NaN for a stream without a judged forecast since its history began."""
        out = extra[slots, self.base + self._recent : self.base + self._recent + 2].copy()
        start = extra[slots, self.base]
        unjudged = (start == 0.0) | (steps - self._tracked[0].horizon < start)
        out[unjudged] = np.nan
        return out

    def clear(self, extra: F64, slots: I64) -> None:
        """Forget the streams' history (a reset before their tick)."""
        extra[slots, self.base : self.base + self.width] = 0.0

    def mark_gap(self, extra: F64, slots: I64, step: I64) -> None:
        """No forecast made at or before ``step`` meets a truth after it (a hole in the
        streams' history after that step)."""
        column = extra[:, self.base]
        column[slots] = np.maximum(column[slots], step + 1)

    def report(self) -> tuple[HorizonQuality, ...]:
        out = []
        for tracked in self._tracked:
            figures = _training_figures(self._metrics, tracked.horizon, first=tracked.output == 0)
            out.append(
                HorizonQuality(
                    tracked.horizon,
                    self.target,
                    tracked.tallies.totals(0),
                    {name: tracked.tallies.totals(k) for k, name in enumerate(tracked.names, 1)},
                    float(figures.get("mae", math.nan)),
                    {
                        name: float(figures[f"{name}_mae"])
                        for name in tracked.names
                        if f"{name}_mae" in figures
                    },
                )
            )
        return tuple(out)


def _arrays(tallies: TallyGroup) -> tuple[F64, I64, F64]:
    return tallies.bounds, tallies.counts, tallies.sums


def put_rows(dst: F64, slots: I64, rows: F64) -> None:
    """``dst[slots] = rows`` for a C-contiguous ``dst [S, W]``: one scatter of whole
    rows as opaque items (a plain 2D fancy assignment measured three times slower)."""
    if not (dst.flags.c_contiguous and rows.flags.c_contiguous and dst.shape[1]):
        dst[slots] = rows
        return
    row = np.dtype((np.void, dst.shape[1] * dst.itemsize))
    np.put(dst.view(row).reshape(-1), slots, rows.view(row).reshape(-1))


def _training_figures(metrics: Mapping[str, Any], horizon: int, *, first: bool) -> dict[str, Any]:
    """What ``train`` reported for ``horizon``: its entry in ``metrics["horizons"]``, or
    for the model's own horizon the report's top-level figures (older bundles)."""
    per = metrics.get("horizons")
    if isinstance(per, Mapping) and isinstance(per.get(str(horizon)), Mapping):
        return dict(per[str(horizon)])
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)} if first else {}

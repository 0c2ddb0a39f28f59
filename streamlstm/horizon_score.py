"""The multi-horizon anomaly score: each tick judged by every forecast made for it.

A scoring model forecasts its target's next ``H`` values at every tick
(output ``j`` is the level ``j + 1`` ticks ahead). When tick ``t`` arrives, ``H``
forecasts of its value exist, made ``1 .. H`` ticks earlier; the raw score is
their mean squared error over horizons ``first .. H``, each horizon's residual
divided by its typical size on the training part (``scale[k]``):

    raw_t = (1 / (H - first + 1)) * sum_{k >= first} ((x_t - f_{t-k, k}) / scale[k]) ** 2

A one-step forecaster predicts an abnormal beat's next sample almost as well
as a normal one's; forecasts made many ticks earlier cannot, so the shape of
the recent past shows in the raw score (``train`` counts the later half of the
horizons, which measured best on held-out ECG). The raw score is smoothed by
``stages`` exponentially weighted means in a row, each of span ``span / stages``
ticks: one stage is a plain EW mean; two or more weigh the recent past like a
hump rather than a decaying edge, so the score follows the last ``span`` ticks
as a whole (a heartbeat) instead of its latest spike; the tick's own raw score
is then added with the weight one EW mean of span ``span`` gives it
(``2 / (span + 1)``), since a hump alone answers a lone spike only ticks
later. With ``baseline_span``, the smoothed raw score is then divided by the
stream's own slow EW mean of it (span ``baseline_span`` ticks, corrected for
its start from zero, this tick included): the score says how far a stream
stands above its own recent level, so a slow drift of the forecasts' quality
does not raise every tick's score.
The score is the square root of the result: about 1 on data like the
training part (or the stream's own recent past), larger where the series
stops behaving like it.

Per-stream state, one float64 row in the state store's ``extra`` columns (so
it is reset, evicted, snapshotted and restored with the recurrent state): for each of
the next ``H`` ticks, the weighted sums ``sum_k w_k f`` and ``sum_k w_k f**2``
of the forecasts made for it so far (``w_k = 1 / scale[k] ** 2``), then each
stage's mean, how many raw scores they hold, and (with a baseline) the slow
mean. A tick costs ``O(H + stages)`` whatever the stream's length; a row is
``2 H + stages + 1`` numbers, one more with a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

__all__ = ["HorizonScore"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class HorizonScore:
    """Scores of one round of distinct streams; see the module docstring.

    ``scale`` ``[H]`` (target units) is each horizon's residual size on the
    training part; horizons below ``first`` do not count; ``span`` (ticks)
    smooths the raw score in ``stages`` EW means of span ``span / stages``;
    ``baseline_span`` (ticks, optional) divides it by its own slow mean; the
    score is NaN until a stream has ``min_count`` raw scores (``H + min_count`` ticks).
    """

    multi = True

    def __init__(
        self,
        scale: Sequence[float],
        span: int,
        first: int = 1,
        min_count: int = 1,
        *,
        stages: int = 1,
        baseline_span: int | None = None,
    ) -> None:
        w = np.asarray(scale, dtype=np.float64)
        if w.ndim != 1 or w.size < 1 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ConfigError(f"outputs.score_scale: positive numbers, got {list(scale)!r}")
        self.horizons = int(w.size)
        if not 1 <= first <= self.horizons:
            raise ConfigError(f"outputs.score_from: must lie in 1 .. {self.horizons}, got {first}")
        self.weights = np.where(np.arange(1, self.horizons + 1) >= first, 1.0 / (w * w), 0.0)
        self.counted = self.horizons - first + 1
        if stages < 1:
            raise ConfigError(f"outputs.score_stages: must be at least 1, got {stages}")
        # One stage of span ``span`` is the plain EW mean (the score's first form).
        self.alpha = 2.0 / (span / stages + 1.0)
        self.now = 2.0 / (span + 1.0) if stages > 1 else 0.0
        self.baseline = None if baseline_span is None else 2.0 / (baseline_span + 1.0)
        self.min_count = min_count
        self._count = 2 * self.horizons + stages
        self.width = self._count + 1 + (baseline_span is not None)
        self._order = np.arange(self.horizons)

    def update(self, extra: F64, slots: I64, steps: I64, values: F32, forecasts: F32) -> F64:
        """Round of distinct ``slots`` with step counts ``steps [N]`` (after this
        tick), target values ``values [N]`` and fresh forecasts ``forecasts [N, H]``
        (target units) -> scores ``[N]`` (NaN while not yet defined)."""
        h = self.horizons
        n = slots.size
        rows = extra[slots]  # a copy; sums and squares are views of it
        sums, squares = rows[:, :h], rows[:, h : 2 * h]
        here = steps % h
        every = np.arange(n)
        x = values.astype(np.float64)
        a, b = sums[every, here], squares[every, here]
        # Tick n has all H forecasts once a forecast made H ticks earlier exists.
        defined = steps > h
        total = float(self.weights.sum())
        with np.errstate(invalid="ignore", over="ignore"):
            raw = np.maximum(total * x * x - 2.0 * x * a + b, 0.0) / self.counted
        defined &= np.isfinite(raw)
        count = rows[:, self._count]
        first = defined & (count == 0)
        step = np.where(defined, self.alpha, 0.0)
        value = raw
        for k in range(2 * h, self._count):
            # Each stage smooths the one before; a stage starts at its first input.
            mean = rows[:, k]
            mean = np.where(first, value, mean + step * (np.where(defined, value, mean) - mean))
            rows[:, k] = value = mean
        if self.now:
            value = value + np.where(defined, self.now * raw, 0.0)
        count = count + defined
        rows[:, self._count] = count
        if self.baseline is not None:
            # The slow mean starts from zero; dividing by 1 - (1 - b) ** count
            # corrects that start (the weights of the means it holds sum to one).
            slow = rows[:, self._count + 1]
            slow = np.where(defined, slow + self.baseline * (value - slow), slow)
            rows[:, self._count + 1] = slow
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                level = slow / -np.expm1(count * np.log1p(-self.baseline))
                value = value / np.maximum(level, 1e-300)
        # This tick's slot is spent; it becomes the slot of the tick H ahead.
        sums[every, here] = 0.0
        squares[every, here] = 0.0
        f = forecasts.astype(np.float64)
        columns = (steps[:, None] + 1 + self._order) % h
        np.put_along_axis(sums, columns, np.take_along_axis(sums, columns, 1) + self.weights * f, 1)
        np.put_along_axis(
            squares, columns, np.take_along_axis(squares, columns, 1) + self.weights * f * f, 1
        )
        extra[slots] = rows
        return np.where(count >= self.min_count, np.sqrt(value), math.nan)

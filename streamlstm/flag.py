"""The anomaly flag: a stream's score above a threshold that follows the stream.

``train`` fits the bundle's ``threshold`` on the training part: the score that
a fraction ``rate`` (``false_alarm_rate``) of its normal ticks exceed. A
stream served later can score higher everywhere (its series drifts, or the
model forecasts it less well than the part it was trained on), and a fixed
threshold then flags far more than ``rate`` of its normal ticks. So with
``step`` > 0 each stream carries its own threshold: it starts at the bundle's,
every flagged tick raises it by ``exp(step * (1 - rate))``, every other tick
lowers it by ``exp(-step * rate)``, and it never goes below the bundle's. Over
a long run of ticks that settles where the stream's own scores exceed it at
about ``rate`` (a stochastic-approximation quantile, in log units); a burst of
flags raises it by ``exp(step)`` a tick, so an anomaly lasting ``1 / step``
ticks ends up raising it about ``e`` times. ``step`` 0 is the fixed threshold.

Per-stream state: one float64 in the state store's ``extra`` columns (reset,
evicted, snapshotted and restored with the rest): ``log(threshold / bundle
threshold)``, 0 for a new stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

__all__ = ["AdaptiveFlag"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class AdaptiveFlag:
    """Flags of one round of distinct streams; see the module docstring.

    ``column`` is the state store's ``extra`` column this flag keeps.
    """

    width = 1

    def __init__(self, threshold: float, rate: float, step: float, column: int) -> None:
        if not (math.isfinite(threshold) and 0 < rate < 1 and math.isfinite(step) and step > 0):
            raise ConfigError(
                f"outputs: an adaptive flag needs a finite threshold, a rate in (0, 1) and a "
                f"positive threshold_step; got {threshold!r}, {rate!r}, {step!r}"
            )
        self.threshold = float(threshold)
        self.up = step * (1.0 - rate)
        self.down = step * rate
        self.column = column

    def update(self, extra: F64, slots: I64, scores: F64) -> F64:
        """Scores ``[N]`` of distinct ``slots`` -> flags ``[N]``: 1.0, 0.0, or NaN
        where the score is (no tick changes the threshold while its score is NaN)."""
        excess = extra[slots, self.column]
        defined = ~np.isnan(scores)
        flagged = defined & (scores > self.threshold * np.exp(excess))
        moved = excess + np.where(flagged, self.up, -self.down)
        extra[slots, self.column] = np.where(defined, np.maximum(moved, 0.0), excess)
        return np.where(defined, flagged * 1.0, np.nan)

    def replay(self, streams: Sequence[F64]) -> list[F64]:
        """Flags of each stream's scores ``[T_i]`` in tick order, from new streams'
        state: what the engine flags when the ticks arrive one by one (``train``
        replays the training part through it). The streams advance together, one
        ``update`` a position, so the cost grows with the longest, not the sum."""
        extra = np.zeros((len(streams), self.column + 1))
        lengths = np.array([s.size for s in streams], dtype=np.int64)
        longest = int(lengths.max(initial=0))
        scores = np.full((len(streams), longest), np.nan)
        for i, s in enumerate(streams):
            scores[i, : s.size] = s
        flags = np.full_like(scores, np.nan)
        for t in range(longest):
            live = np.flatnonzero(lengths > t)
            flags[live, t] = self.update(extra, live, scores[live, t])
        return [flags[i, :n] for i, n in enumerate(lengths.tolist())]

"""What the engine knows of its model's quality: running totals, immutable snapshots.

``ErrorTotals`` is a histogram with its count, sum and sum of squares (of
absolute forecast errors in target units, or of anomaly scores);
``QualityReport`` gathers every figure of one engine. Totals only grow, like
Prometheus counters: the figures of a span of ticks are ``later.since(earlier)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["ErrorTotals", "HorizonQuality", "QualityReport", "StreamError", "TallyGroup"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class ErrorTotals:
    """A histogram of values: ``counts[i]`` of those in ``(bounds[i-1], bounds[i]]``,
    the last of those above every bound; their ``count``, ``total`` and
    ``squares`` (sum of squares)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    @property
    def mean(self) -> float:
        """The mean value (the MAE of absolute errors); NaN without values."""
        return self.total / self.count if self.count else math.nan

    @property
    def rms(self) -> float:
        """The root mean square (the RMSE of errors); NaN without values."""
        return math.sqrt(self.squares / self.count) if self.count else math.nan

    def since(self, earlier: ErrorTotals) -> ErrorTotals:
        """The figures of the values added after ``earlier`` (a snapshot of the same totals)."""
        return ErrorTotals(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
            self.count - earlier.count,
            self.total - earlier.total,
            self.squares - earlier.squares,
        )


class TallyGroup:
    """``k`` running ``ErrorTotals`` with the same bounds, fed together:
    ``add(values [k, n])`` takes row ``i`` into tally ``i``; NaN marks a value that is
    not there (a forecast without its truth).

    Each row is sorted once (NaN last) and the bounds are looked up in it: the
    cumulative counts (Prometheus' ``le``) come straight out, faster than
    placing each value among the bounds. A call's values are summed in row
    order (``np.cumsum``, which adds one after another) and the call's sum
    added to the total: exactly what the C update of the realized errors
    (``_quality.c``) does with ``counts`` and ``sums``, so both give the same
    totals bit for bit.
    """

    def __init__(self, bounds: Sequence[float], k: int = 1) -> None:
        self.bounds = np.asarray([*sorted(bounds), math.inf], dtype=np.float64)
        self.k = k
        #: Values per bucket (``bounds[i-1] < v <= bounds[i]``), and their sum and
        #: sum of squares; the C update adds to both in place.
        self.counts = np.zeros((k, self.bounds.size), dtype=np.int64)
        self.sums = np.zeros((k, 2))

    def add(self, values: F64) -> None:
        if not values.shape[1]:
            return
        ordered = np.sort(values, axis=1)
        for i in range(self.k):
            # side="right": a value equal to a bound counts in it (le); NaN is above inf.
            cumulative = np.searchsorted(ordered[i], self.bounds, side="right")
            self.counts[i] += np.diff(cumulative, prepend=0)
        present = np.where(np.isnan(values), 0.0, values)  # + 0.0 leaves a sum as it is
        self.sums[:, 0] += np.cumsum(present, axis=1)[:, -1]
        self.sums[:, 1] += np.cumsum(present * present, axis=1)[:, -1]

    def totals(self, i: int = 0) -> ErrorTotals:
        counts = self.counts[i].tolist()
        total, squares = self.sums[i].tolist()
        return ErrorTotals(
            tuple(self.bounds[:-1].tolist()), tuple(counts), sum(counts), total, squares
        )


@dataclass(frozen=True, eq=False)
class HorizonQuality:
    """The realized errors of forecasts ``horizon`` ticks ahead of ``target``: the
    model's, and each naive baseline's by name (``persistence``, ``seasonal_24``).

    ``training_mae`` and ``training_baselines`` are what ``train`` measured on
    the test part for this horizon (NaN / empty when the bundle does not say).
    """

    horizon: int
    target: str
    model: ErrorTotals
    baselines: Mapping[str, ErrorTotals]
    training_mae: float = math.nan
    training_baselines: Mapping[str, float] = field(default_factory=dict)

    def since(self, earlier: HorizonQuality) -> HorizonQuality:
        return HorizonQuality(
            self.horizon,
            self.target,
            self.model.since(earlier.model),
            {k: v.since(earlier.baselines[k]) for k, v in self.baselines.items()},
            self.training_mae,
            self.training_baselines,
        )

    @property
    def skill(self) -> dict[str, float]:
        """1 - model MAE / baseline MAE, per baseline (NaN without errors)."""
        out = {}
        for name, base in self.baselines.items():
            out[name] = 1.0 - self.model.mean / base.mean if base.mean else math.nan
        return out


@dataclass(frozen=True)
class StreamError:
    """One stream's recent absolute error (``Engine.worst_streams``): the model's and
    its naive forecast's, exponentially weighted over its own last ticks, and the
    ticks since its state last started from zero."""

    stream: str
    recent_abs_error: float
    recent_baseline_abs_error: float
    steps: int


@dataclass(frozen=True, eq=False)
class QualityReport:
    """One engine's model-quality figures (``Engine.quality``).

    ``horizons``: realized forecast errors (empty for a classifier, or a
    model whose target is not one of its inputs, which never sees its truth).
    ``drift_z[f]``: how far the recent inputs' exponentially weighted mean
    (over ``drift_window_ticks`` ticks of all streams) sits from the training
    mean of ``features[f]``, in training standard deviations;
    ``std_ratio[f]`` the recent standard deviation over the training one
    (both NaN before any tick, or when the bundle holds no training
    statistics). ``scores``: the anomaly scores of scored ticks (None: the
    model has no score); ``anomalies`` the ticks flagged; ``false_alarm_rate``
    the rate the flag was calibrated for (None: no flag).
    """

    horizons: tuple[HorizonQuality, ...]
    features: tuple[str, ...]
    drift_z: tuple[float, ...]
    std_ratio: tuple[float, ...]
    drift_window_ticks: int
    scores: ErrorTotals | None = None
    anomalies: int = 0
    false_alarm_rate: float | None = None

    def since(self, earlier: QualityReport) -> QualityReport:
        """Counts and sums of the ticks after ``earlier``; drift as it stands now."""
        scores = self.scores
        if scores is not None and earlier.scores is not None:
            scores = scores.since(earlier.scores)
        return QualityReport(
            tuple(a.since(b) for a, b in zip(self.horizons, earlier.horizons, strict=True)),
            self.features,
            self.drift_z,
            self.std_ratio,
            self.drift_window_ticks,
            scores,
            self.anomalies - earlier.anomalies,
            self.false_alarm_rate,
        )

"""Input drift: how far the recent inputs sit from the training data.

Over all streams' accepted ticks in arrival order, an exponentially weighted
mean of each feature and of its square, with span ``window_ticks``
(``alpha = 2 / (window_ticks + 1)``: the last ``window_ticks`` ticks carry
about 86 % of the weight), bias-corrected like Adam's moments so the first
ticks are not pulled toward zero. ``z = (mean - training mean) / training sd``
and the ratio of the recent sd to the training sd, per feature. A batch of
``n`` ticks is one weighted sum, exactly the same as ``n`` single updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

__all__ = ["InputDrift"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class InputDrift:
    """Drift of ``F`` features from their training ``mean`` and ``std`` (original units)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], window_ticks: int) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ConfigError("training input statistics: mean and std must be equal-length lists")
        self.window_ticks = window_ticks
        self._keep = 1.0 - 2.0 / (window_ticks + 1.0)
        self._moments = np.zeros((2, self.mean.size))  # EW sums of x and x^2
        self._weight = 0.0  # their total weight: 1 - keep^ticks
        self._cache: dict[int, tuple[F64, float, float]] = {}

    def update(self, x: F32) -> None:
        """Take ticks ``x [n, F]`` (original units), in arrival order."""
        n = x.shape[0]
        if not n:
            return
        weights, decay, total = self._weights(n)
        values = x.astype(np.float64)
        self._moments *= decay
        self._moments[0] += weights @ values
        self._moments[1] += weights @ (values * values)
        self._weight = self._weight * decay + total

    def _weights(self, n: int) -> tuple[F64, float, float]:
        """Tick i of n weighs (1 - keep) * keep^(n - 1 - i); older sums decay by keep^n.
        Calls mostly repeat a few sizes: each size's weights are computed once."""
        cached = self._cache.get(n)
        if cached is None:
            keep = self._keep
            weights = (1.0 - keep) * keep ** np.arange(n - 1, -1, -1, dtype=np.float64)
            cached = (weights, keep**n, float(weights.sum()))
            if len(self._cache) < 64:
                self._cache[n] = cached
        return cached

    def figures(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(z, sd ratio) per feature; NaN before any tick and for a constant training feature."""
        if self._weight <= 0.0:
            nan = (math.nan,) * self.mean.size
            return nan, nan
        mean = self._moments[0] / self._weight
        var = np.maximum(self._moments[1] / self._weight - mean * mean, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.where(self.std > 0, self.std, np.nan)
            z = (mean - self.mean) / std
            ratio = np.sqrt(var) / std
        return tuple(z.tolist()), tuple(ratio.tolist())

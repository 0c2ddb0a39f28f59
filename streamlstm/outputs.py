"""What a model's raw outputs mean: how they become predictions, and the anomaly score.

A forecasting model may learn the *change* of its target (``transform="diff"``)
so that a series trending past its training range still works; the engine
then adds the target's current level, read from the tick's own input column
``target_feature``, so predictions are always levels. A classifier ends in a
sigmoid or softmax and predicts class probabilities.

The anomaly score of a forecasting model compares each tick's target value
with the forecast made ``horizon`` ticks earlier: the residual, normalised
per stream by an exponentially weighted mean and variance (a z-score). Its
per-stream state lives in the state store's ``extra`` columns, so it is reset,
evicted, snapshotted and restored together with the recurrent state. A model that
forecasts its next ``H`` values instead carries ``score_scale`` and is scored by
``horizon_score.HorizonScore`` (each tick judged by all forecasts made for it).

``threshold`` turns the score into a flag: a tick is an anomaly when its score
exceeds it (calibrated by ``train`` at ``false_alarm_rate`` on the training part).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

__all__ = ["OutputSpec", "ResidualScore"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_ACTIVATIONS = ("linear", "sigmoid", "softmax")
_TRANSFORMS = ("level", "diff")


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """How ``[N, outputs]`` model outputs become predictions in target units.

    ``activation`` is applied first (``softmax`` across outputs), then the
    bundle's target scaler is inverted, then for ``transform="diff"`` the
    current level ``x[:, target_feature]`` is added. ``classes`` names the
    outputs of a classifier. ``score_span`` (ticks) turns on the anomaly score
    of a single-output forecaster whose target is one of its inputs.
    ``score_scale`` ``[H]`` makes it the multi-horizon score of a model whose
    ``H`` outputs forecast the target 1 .. H ticks ahead (``horizon`` 1): each
    horizon's typical residual (target units) on the training part.
    ``score_from``: the first horizon the score counts (1: all of them).
    ``score_stages``: EW means in a row that smooth the multi-horizon raw score
    (each of span ``score_span / score_stages``); ``score_baseline_span``
    (ticks): divide it by the stream's own slow mean of it (see
    ``horizon_score``). Both default to the score's first form (one stage, none).
    ``threshold``: the score above which a tick is flagged (needs a score);
    ``false_alarm_rate``: the rate it was calibrated for; ``threshold_step``
    (> 0) lets each stream's threshold follow its own scores toward that rate,
    starting from ``threshold`` and never below it (``flag.AdaptiveFlag``; 0:
    the threshold is fixed).
    """

    activation: str = "linear"
    transform: str = "level"
    target_feature: int | None = None
    horizon: int = 1
    classes: tuple[str, ...] = field(default_factory=tuple)
    score_span: int | None = None
    score_scale: tuple[float, ...] = field(default_factory=tuple)
    score_from: int = 1
    score_stages: int = 1
    score_baseline_span: int | None = None
    threshold: float | None = None
    false_alarm_rate: float | None = None
    threshold_step: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        try:
            object.__setattr__(self, "score_scale", tuple(float(v) for v in self.score_scale))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"outputs.score_scale: must be numbers ({exc})") from exc
        self._check_score()
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(
                f"outputs.activation: must be one of {', '.join(_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.transform not in _TRANSFORMS:
            raise ConfigError(
                f"outputs.transform: must be one of {', '.join(_TRANSFORMS)}, "
                f"got {self.transform!r}"
            )
        for name in ("horizon", "score_span"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"outputs.{name}: must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise ConfigError(f"outputs.{name}: must be at least 1, got {value}")
        if self.target_feature is not None and (
            isinstance(self.target_feature, bool)
            or not isinstance(self.target_feature, int)
            or self.target_feature < 0
        ):
            raise ConfigError(
                f"outputs.target_feature: must be a column index, got {self.target_feature!r}"
            )
        if self.transform == "diff" and self.target_feature is None:
            raise ConfigError(
                "outputs.transform: 'diff' needs target_feature, the input column that "
                "holds the target's current level"
            )
        if self.classes and (self.transform != "level" or self.score_span is not None):
            raise ConfigError("outputs: a classifier has no diff transform and no anomaly score")
        if self.score_span is not None and self.target_feature is None:
            raise ConfigError(
                "outputs.score_span: the anomaly score needs target_feature, the input "
                "column that holds the target's value"
            )

    def _check_score(self) -> None:
        if any(not (math.isfinite(v) and v > 0) for v in self.score_scale):
            raise ConfigError(
                f"outputs.score_scale: must be positive numbers, got {list(self.score_scale)}"
            )
        if self.score_scale and (self.score_span is None or self.horizon != 1):
            raise ConfigError(
                "outputs.score_scale: the multi-horizon score needs score_span and horizon 1"
            )
        for name, plain in (("score_stages", 1), ("score_baseline_span", None)):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"outputs.{name}: must be a positive integer, got {value!r}")
            if value != plain and not self.score_scale:
                raise ConfigError(f"outputs.{name}: only the multi-horizon score has it")
        if isinstance(self.score_from, bool) or not isinstance(self.score_from, int):
            raise ConfigError(f"outputs.score_from: must be an integer, got {self.score_from!r}")
        if not 1 <= self.score_from <= max(1, len(self.score_scale)):
            raise ConfigError(
                f"outputs.score_from: must lie in 1 .. {max(1, len(self.score_scale))}, "
                f"got {self.score_from}"
            )
        for name in ("threshold", "false_alarm_rate"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"outputs.{name}: must be a number, got {value!r}")
            if not math.isfinite(value) or (name == "false_alarm_rate" and not 0 < value < 1):
                raise ConfigError(f"outputs.{name}: out of range: {value!r}")
        if self.threshold is not None and self.score_span is None:
            raise ConfigError("outputs.threshold: a flag needs an anomaly score (score_span)")
        step = self.threshold_step
        if isinstance(step, bool) or not isinstance(step, int | float):
            raise ConfigError(f"outputs.threshold_step: must be a number, got {step!r}")
        if not (math.isfinite(step) and step >= 0):
            raise ConfigError(f"outputs.threshold_step: must be 0 or more, got {step!r}")
        if step and (self.threshold is None or self.false_alarm_rate is None):
            raise ConfigError(
                "outputs.threshold_step: an adaptive flag needs threshold and false_alarm_rate"
            )

    @property
    def score_horizons(self) -> int:
        """How many forecasts judge each tick: ``len(score_scale)``, or 1 for the residual score."""
        return len(self.score_scale) or 1

    @property
    def score_warmup(self) -> int:
        """Ticks before a stream's score stands on its own (not counted when
        fitting the threshold): the horizons and the smoothing, twice the
        smoothing when stages or a baseline settle after it."""
        if self.score_span is None:
            return 0
        settle = 2 if self.score_stages > 1 or self.score_baseline_span else 1
        return self.score_horizons + settle * self.score_span

    @property
    def is_classifier(self) -> bool:
        return bool(self.classes)

    def check(self, input_size: int, output_size: int) -> None:
        """Raise ``ConfigError`` if this spec does not fit a model of these sizes."""
        if self.target_feature is not None and self.target_feature >= input_size:
            raise ConfigError(
                f"outputs.target_feature: column {self.target_feature} of {input_size} inputs"
            )
        if self.classes and len(self.classes) != output_size:
            raise ConfigError(
                f"outputs.classes: {len(self.classes)} classes for {output_size} outputs"
            )
        if self.score_scale and output_size != len(self.score_scale):
            raise ConfigError(
                f"outputs.score_scale: {len(self.score_scale)} horizons for {output_size} outputs"
            )
        if (self.transform == "diff" or self.score_span is not None) and output_size != (
            self.score_horizons
        ):
            raise ConfigError("outputs: diff and the anomaly score need a single output")

    def finish(self, y: F32, x: F32, unscale: Callable[[F32], F32]) -> F32:
        """Model outputs ``y [N, O]`` and raw inputs ``x [N, F]`` -> predictions ``[N, O]``."""
        out = np.asarray(y, dtype=np.float32)
        if self.activation == "sigmoid":
            out = (1.0 / (1.0 + np.exp(-out.astype(np.float64)))).astype(np.float32)
        elif self.activation == "softmax":
            z = out.astype(np.float64)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        out = unscale(out)
        if self.transform == "diff":
            assert self.target_feature is not None
            out = out + x[:, self.target_feature : self.target_feature + 1]
        return np.asarray(out, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["score_scale"] = list(self.score_scale)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> OutputSpec:
        if not data:
            return cls()
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"outputs: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(
                **{
                    **data,
                    "classes": tuple(data.get("classes") or ()),
                    "score_scale": tuple(data.get("score_scale") or ()),
                }
            )
        except TypeError as exc:
            raise ConfigError(f"outputs: {exc}") from exc


class ResidualScore:
    """The per-stream anomaly score over state columns ``[ring of horizon forecasts,
    mean, variance, count]`` (float64, one row per stream slot).

    ``update`` takes one round of distinct streams: their step counts (after
    this tick), target values and fresh forecasts; it returns ``|z|`` of each
    tick's residual against the forecast made ``horizon`` ticks earlier (NaN
    while fewer than ``min_count`` residuals have been seen), then records the
    residual and the new forecast.
    """

    min_count = 2
    multi = False

    def __init__(self, horizon: int, span: int) -> None:
        self.horizon = horizon
        self.alpha = 2.0 / (span + 1.0)
        self.width = horizon + 3

    def update(self, extra: F64, slots: I64, steps: I64, values: F32, forecasts: F32) -> F64:
        h = self.horizon
        ring = steps % h
        rows = extra[slots]
        previous = rows[np.arange(slots.size), ring]
        mean, var, count = rows[:, h], rows[:, h + 1], rows[:, h + 2]
        has_residual = steps > h
        residual = values.astype(np.float64) - previous
        with np.errstate(invalid="ignore", divide="ignore"):
            # The epsilon keeps a jump after perfectly steady residuals finite but large.
            z = np.abs(residual - mean) / np.sqrt(var + 1e-12)
        z[~np.isfinite(z)] = 0.0
        scores = np.where(has_residual & (count >= self.min_count), z, math.nan)
        delta = np.where(has_residual, residual - mean, 0.0)
        a = np.where(has_residual, self.alpha, 0.0)
        # First residual: the mean starts at it rather than creeping up from zero.
        first = has_residual & (count == 0)
        rows[:, h] = np.where(first, residual, mean + a * delta)
        rows[:, h + 1] = np.where(first, 0.0, (1.0 - a) * (var + a * delta * delta))
        rows[:, h + 2] = count + has_residual
        rows[np.arange(slots.size), ring] = forecasts.astype(np.float64)
        extra[slots] = rows
        return scores

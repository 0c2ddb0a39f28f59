"""``Quality``: everything an engine measures of its model, fed from ``Engine.step``.

It owns the realized forecast errors (``errors.RealizedErrors``, per-stream
columns in the store's ``extra`` after the anomaly score's), the input drift
(``drift.InputDrift``) and the anomaly-score tally; ``report`` snapshots them
(``QualityReport``). ``QualityConfig`` says what to measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamlstm.batching import each_round
from streamlstm.bundle import Bundle
from streamlstm.errors import ConfigError
from streamlstm.quality.drift import InputDrift
from streamlstm.quality.errors import RealizedErrors
from streamlstm.quality.report import QualityReport, TallyGroup

__all__ = ["Quality", "QualityConfig"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

#: Anomaly-score histogram bounds (|z|-like scores), plus the model's threshold.
SCORE_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0)


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """What ``Engine`` measures of its model (``Engine.quality``).

    ``enabled``: measure at all (False: nothing is kept, no per-stream
    columns). ``season`` (ticks): the seasonal-persistence baseline; None
    takes the season ``train`` used (``bundle.training["season"]``), 0 none.
    ``drift_window_ticks``: the span, in ticks of all streams, of the input
    drift's exponentially weighted mean and variance.
    """

    enabled: bool = True
    season: int | None = None
    drift_window_ticks: int = 10_000

    def __post_init__(self) -> None:
        for name, low in (("season", 0), ("drift_window_ticks", 1)):
            value = getattr(self, name)
            if value is None and name == "season":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"quality.{name}: must be an integer of at least {low}, got {value!r}"
                )


class Quality:
    """A bundle's quality figures; its per-stream columns start at ``first_column``.
    ``native``: the realized errors may update through C (``RealizedErrors``)."""

    def __init__(
        self, bundle: Bundle, config: QualityConfig, first_column: int, *, native: bool = True
    ) -> None:
        spec = bundle.outputs
        season = config.season
        if season is None:
            season = _positive_int(bundle.training.get("season"))
        self.errors: RealizedErrors | None = None
        if spec.target_feature is not None and not spec.is_classifier:
            self.errors = RealizedErrors(
                spec,
                outputs=bundle.config.output_size,
                target=bundle.feature_names[spec.target_feature],
                first_column=first_column,
                season=season if season and season >= spec.horizon else None,
                metrics=bundle.metrics,
                native=native,
            )
        self.width = self.errors.width if self.errors is not None else 0
        self.features = bundle.feature_names
        self.drift = _drift(bundle, config.drift_window_ticks)
        self.window_ticks = config.drift_window_ticks
        self.scores: TallyGroup | None = None
        self.threshold = spec.threshold
        self.false_alarm_rate = spec.false_alarm_rate if spec.threshold is not None else None
        if spec.score_span is not None:
            bounds = set(SCORE_BUCKETS) | (
                {spec.threshold} if spec.threshold is not None else set()
            )
            self.scores = TallyGroup(sorted(bounds))
        self.anomalies = 0

    @classmethod
    def of(
        cls, bundle: Bundle, config: QualityConfig, first_column: int, *, native: bool = True
    ) -> Quality | None:
        return cls(bundle, config, first_column, native=native) if config.enabled else None

    def rounds(
        self,
        extra: F64,
        rounds: list[I64 | None],
        slots: I64,
        steps: I64,
        raw: F32,
        forecasts: F32,
        resets: Bools,
        ends: Bools,
    ) -> None:
        """Judge a call's accepted ticks round by round (``Scoring.rounds``' arguments)."""
        if self.drift is not None:
            self.drift.update(raw)
        errors = self.errors
        if errors is None:
            return
        values = raw[:, errors.target_feature]
        any_reset, any_end = bool(resets.any()), bool(ends.any())
        for sel, member_slots in each_round(rounds, slots):
            if any_reset:
                errors.clear(extra, member_slots[resets[sel]])
            errors.update(extra, member_slots, steps[sel], values[sel], forecasts[sel])
            if any_end:
                errors.clear(extra, member_slots[ends[sel]])

    def scored(self, scores: F64, flagged: F64 | None) -> None:
        """Tally a call's anomaly scores (NaN: not scored) and flags (None: the fixed
        threshold decides)."""
        if self.scores is None:
            return
        defined = scores[~np.isnan(scores)]
        self.scores.add(defined[None, :])
        if flagged is not None:
            self.anomalies += int(np.count_nonzero(flagged == 1.0))
        elif self.threshold is not None:
            self.anomalies += int(np.count_nonzero(defined > self.threshold))

    def mark_gaps(self, extra: F64, slots: I64, steps: I64) -> None:
        """Holes in these streams' histories after step ``steps``."""
        if self.errors is not None and slots.size:
            self.errors.mark_gap(extra, slots, steps)

    def report(self) -> QualityReport:
        z, ratio = self.drift.figures() if self.drift is not None else ((), ())
        return QualityReport(
            self.errors.report() if self.errors is not None else (),
            self.features if self.drift is not None else (),
            z,
            ratio,
            self.window_ticks,
            self.scores.totals() if self.scores is not None else None,
            self.anomalies,
            self.false_alarm_rate,
        )


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _drift(bundle: Bundle, window_ticks: int) -> InputDrift | None:
    """Drift against the training statistics ``train`` stores (None: the bundle has none)."""
    stats = bundle.training.get("inputs")
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        return None
    mean, std = stats["mean"], stats["std"]
    if len(mean) != bundle.config.input_size or len(std) != bundle.config.input_size:
        raise ConfigError(
            f"training.inputs: {len(mean)} means and {len(std)} sds for "
            f"{bundle.config.input_size} features"
        )
    if not all(math.isfinite(float(v)) for v in (*mean, *std)):
        raise ConfigError("training.inputs: mean and std must be finite numbers")
    return InputDrift(mean, std, window_ticks)

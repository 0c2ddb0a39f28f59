"""A model's anomaly score and flag over the state store's ``extra`` columns.

The score (``outputs.ResidualScore`` or ``horizon_score.HorizonScore``) keeps
its columns first, then the adaptive flag (``flag.AdaptiveFlag``) its one
(``width`` in all; the live quality figures' columns follow, see ``quality``);
``Scoring.of`` builds what a bundle's ``OutputSpec`` asks for (None: no score).
"""

from __future__ import annotations

import numpy as np

from streamlstm.batching import each_round
from streamlstm.flag import AdaptiveFlag
from streamlstm.horizon_score import HorizonScore
from streamlstm.outputs import OutputSpec, ResidualScore
from streamlstm.results import F32, F64, I64, Bools

__all__ = ["Scoring"]


class Scoring:
    """Scores (and flags) of ticks, round by round; see the module docstring."""

    def __init__(self, spec: OutputSpec) -> None:
        assert spec.score_span is not None and spec.target_feature is not None
        self.target = spec.target_feature
        self.score: ResidualScore | HorizonScore
        if spec.score_scale:
            self.score = HorizonScore(
                spec.score_scale,
                spec.score_span,
                spec.score_from,
                stages=spec.score_stages,
                baseline_span=spec.score_baseline_span,
            )
        else:
            self.score = ResidualScore(spec.horizon, spec.score_span)
        self.flag = None
        if spec.threshold_step:
            assert spec.threshold is not None and spec.false_alarm_rate is not None
            self.flag = AdaptiveFlag(
                spec.threshold, spec.false_alarm_rate, spec.threshold_step, self.score.width
            )
        self.width = self.score.width + (self.flag.width if self.flag else 0)

    @classmethod
    def of(cls, spec: OutputSpec) -> Scoring | None:
        return None if spec.score_span is None else cls(spec)

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
    ) -> tuple[F64, F64 | None]:
        """Scores of accepted ticks (``raw [N, F]`` inputs, ``forecasts [N, O]``),
        round by round (a stream's ticks in order; ``None``: all rows), and their
        flags where the threshold adapts per stream (else None). A reset clears
        a stream's columns before its tick, an end after it."""
        values = raw[:, self.target]
        out = np.empty(slots.size)
        flagged = None if self.flag is None else np.empty(slots.size)
        for sel, member_slots in each_round(rounds, slots):
            extra[member_slots[resets[sel]], : self.width] = 0.0
            out[sel] = self.score.update(
                extra,
                member_slots,
                steps[sel],
                values[sel],
                forecasts[sel] if self.score.multi else forecasts[sel, 0],
            )
            if self.flag is not None and flagged is not None:
                flagged[sel] = self.flag.update(extra, member_slots, out[sel])
            extra[member_slots[ends[sel]], : self.width] = 0.0
        return out, flagged

"""A bundle that scores ticks by its multi-horizon forecasts (and may flag them)."""

from __future__ import annotations

from streamlstm import Bundle, ModelConfig, OutputSpec

HORIZONS = 4
SCALE = (0.5, 1.0, 1.5, 2.0)


def horizon_scored_bundle(
    span: int = 6,
    threshold: float | None = None,
    first: int = 1,
    stages: int = 1,
    baseline: int | None = None,
    rate: float | None = None,
    step: float = 0.0,
) -> Bundle:
    return Bundle.random(
        ModelConfig(input_size=2, hidden_sizes=(8,), head_sizes=(4,), output_size=HORIZONS),
        seed=5,
        outputs=OutputSpec(
            target_feature=1,
            score_span=span,
            score_scale=SCALE,
            score_from=first,
            score_stages=stages,
            score_baseline_span=baseline,
            threshold=threshold,
            false_alarm_rate=rate,
            threshold_step=step,
        ),
    )

"""The quality collector: the engine's figures as Prometheus series, parsed back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamlstm import Affine, Bundle, Engine, ModelConfig, OutputSpec
from streamlstm.consumers.observability.quality import QualityCollector

SERVING = ("model", "serving")


def _samples(
    engine: Engine, shadow: Engine | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    reports = {"serving": engine.quality} | ({"shadow": shadow.quality} if shadow else {})
    registry.register(QualityCollector(lambda: reports))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_figure_is_exported_with_bounded_labels() -> None:
    bundle = Bundle.random(
        ModelConfig(input_size=2, hidden_sizes=(8,), head_sizes=(4,), output_size=1),
        seed=2,
        input_scaler=Affine.from_min_max([-3.0, 0.0], [3.0, 10.0]),
        outputs=OutputSpec(
            target_feature=1, horizon=2, score_span=5, threshold=2.0, false_alarm_rate=0.05
        ),
        feature_names=["load", "temp"],
        training={"season": 4, "inputs": {"mean": [0.0, 5.0], "std": [1.0, 2.0]}},
        metrics={"horizons": {"2": {"mae": 0.5, "persistence_mae": 0.7, "seasonal_4_mae": 0.9}}},
    )
    engine = Engine(bundle)
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 1, 300), rng.normal(5, 2, 300)].astype(np.float32)
    engine.step([f"s{i % 3}" for i in range(300)], x)
    report = engine.quality
    assert report is not None and report.scores is not None
    got = _samples(engine)
    h = (("horizon", "2"), ("model", "serving"), ("target", "temp"))
    q = report.horizons[0]
    assert got[("streamlstm_forecast_abs_error_count", h)] == q.model.count == 3 * 98
    assert got[("streamlstm_forecast_abs_error_sum", h)] == pytest.approx(q.model.total)
    assert (
        got[
            (
                "streamlstm_forecast_abs_error_bucket",
                (("horizon", "2"), ("le", "+Inf"), ("model", "serving"), ("target", "temp")),
            )
        ]
        == q.model.count
    )
    assert got[("streamlstm_forecast_squared_error_sum_total", h)] == pytest.approx(q.model.squares)
    for name in ("persistence", "seasonal_4"):
        b = tuple(sorted((*h, ("baseline", name))))
        assert got[("streamlstm_forecast_baseline_abs_error_count", b)] == q.baselines[name].count
    assert got[("streamlstm_model_training_mae", h)] == 0.5
    persistence = tuple(sorted((*h, ("baseline", "persistence"))))
    assert got[("streamlstm_model_training_baseline_mae", persistence)] == 0.7
    assert got[("streamlstm_input_drift_z", (("feature", "temp"), SERVING))] == pytest.approx(
        report.drift_z[1]
    )
    assert ("streamlstm_input_std_ratio", (("feature", "load"), SERVING)) in got
    assert got[("streamlstm_anomaly_score_count", (SERVING,))] == report.scores.count > 0
    assert got[("streamlstm_anomalies_total", (SERVING,))] == report.anomalies
    assert got[("streamlstm_anomaly_false_alarm_rate", (SERVING,))] == 0.05
    labels = {k for _, pairs in got for k, _ in pairs}
    assert labels <= {"model", "horizon", "target", "baseline", "feature", "le"}  # never a stream


def test_a_shadow_model_is_exported_beside_the_served_one_on_the_same_ticks() -> None:
    config = ModelConfig(input_size=1, hidden_sizes=(6,), output_size=1)
    spec = OutputSpec(target_feature=0, horizon=1)
    served, shadow = (
        Engine(Bundle.random(config, seed=seed, outputs=spec, feature_names=["v"]))
        for seed in (4, 5)
    )
    x = np.sin(np.arange(200, dtype=np.float32) / 7)[:, None]
    ids = [f"s{i % 4}" for i in range(200)]
    served.step(ids, x)
    shadow.step(ids, x)
    got = _samples(served, shadow)
    for engine, role in ((served, "serving"), (shadow, "shadow")):
        report = engine.quality
        assert report is not None
        q = report.horizons[0]
        labels = (("horizon", "1"), ("model", role), ("target", "v"))
        assert got[("streamlstm_forecast_abs_error_count", labels)] == q.model.count == 4 * 49
        assert got[("streamlstm_forecast_abs_error_sum", labels)] == pytest.approx(q.model.total)
    sums = [got[("streamlstm_forecast_abs_error_sum", (("horizon", "1"), ("model", role),
                                                       ("target", "v")))]
            for role in ("serving", "shadow")]  # fmt: skip
    assert sums[0] != sums[1]  # two models' errors, not one's twice


def test_a_model_that_cannot_be_judged_exports_nothing() -> None:
    plain = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(4,), output_size=1))
    engine = Engine(plain)
    engine.step(["a"], np.zeros((1, 2), np.float32))
    assert _samples(engine) == {}


def test_the_summary_names_the_worst_streams() -> None:
    from prometheus_client import CollectorRegistry as Registry

    from streamlstm.consumers.observability.metrics import ServeMetrics
    from streamlstm.consumers.observability.reporting import Reporter
    from streamlstm.quality import StreamError

    reporter = Reporter(ServeMetrics(Registry()), instance_id="i", clock=lambda: 1.0)
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(4,), output_size=1))
    stats = Engine(bundle).stats
    worst = (StreamError("pump-7", 2.5, 0.5, 40),)
    summary = reporter.summary(replace(stats, worst_streams=worst), 1.0, {})
    assert summary["worst_streams"] == [
        {"stream": "pump-7", "recent_abs_error": 2.5, "recent_baseline_abs_error": 0.5, "steps": 40}
    ]

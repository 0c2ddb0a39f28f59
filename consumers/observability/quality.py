"""The model's live quality as Prometheus series, read from the engine's figures at scrape.

The engine child measures (``streamlstm.quality``); every step reply brings
its running totals (``EngineStats.quality``), and this collector turns the
latest into histograms, counters and gauges when Prometheus scrapes. Labels
are the model (``serving``, and ``shadow`` while a shadow model runs: its
figures are over the same ticks), the horizon, the target column, the
baseline's name and the feature: never a stream id. Nothing is exported for
what the model does not have (no errors for a classifier or a model that
never sees its target, no drift without training statistics, no score
without a score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamlstm.quality import ErrorTotals, QualityReport

__all__ = ["QualityCollector", "Reports"]


def _buckets(totals: ErrorTotals) -> list[tuple[str, float]]:
    """Cumulative ``le`` buckets, ``+Inf`` last."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(totals.bounds, totals.counts, strict=False):
        running += count
        out.append((repr(float(bound)), running))
    out.append(("+Inf", totals.count))
    return out


#: Each model's report, by its role ("serving", "shadow"); None: nothing measured yet.
Reports = Mapping[str, QualityReport | None]


class QualityCollector(Collector):
    """``streamlstm_forecast_*``, ``streamlstm_input_*``, ``streamlstm_anomal*`` and
    ``streamlstm_model_training_*`` from ``reports()``, each series labelled with its
    model's role."""

    def __init__(self, reports: Callable[[], Reports]) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        reports = [(role, r) for role, r in self._reports().items() if r is not None]
        if any(r.horizons for _, r in reports):
            yield from self._errors([(role, r) for role, r in reports if r.horizons])
        if any(r.features for _, r in reports):
            yield from self._drift([(role, r) for role, r in reports if r.features])
        scored = [(role, r) for role, r in reports if r.scores is not None]
        if scored:
            yield from self._scores(scored)

    @staticmethod
    def _errors(reports: list[tuple[str, QualityReport]]) -> Iterator[Metric]:
        labels = ["model", "horizon", "target"]
        model = HistogramMetricFamily(
            "streamlstm_forecast_abs_error",
            "Realized absolute error of forecasts, in target units, when their truth arrived",
            labels=labels,
        )
        baseline = HistogramMetricFamily(
            "streamlstm_forecast_baseline_abs_error",
            "Realized absolute error of the naive forecast train compares against",
            labels=[*labels, "baseline"],
        )
        squares = CounterMetricFamily(
            "streamlstm_forecast_squared_error_sum",
            "Sum of squared realized forecast errors (RMSE: over the abs-error count)",
            labels=labels,
        )
        baseline_squares = CounterMetricFamily(
            "streamlstm_forecast_baseline_squared_error_sum",
            "Sum of squared realized errors of the naive forecast",
            labels=[*labels, "baseline"],
        )
        trained = GaugeMetricFamily(
            "streamlstm_model_training_mae",
            "The model's test MAE as train reported it",
            labels=labels,
        )
        trained_baseline = GaugeMetricFamily(
            "streamlstm_model_training_baseline_mae",
            "The naive forecast's test MAE as train reported it",
            labels=[*labels, "baseline"],
        )
        for role, report in reports:
            for q in report.horizons:
                values = [role, str(q.horizon), q.target]
                model.add_metric(values, _buckets(q.model), q.model.total)
                squares.add_metric(values, q.model.squares)
                if not math.isnan(q.training_mae):
                    trained.add_metric(values, q.training_mae)
                for name, totals in q.baselines.items():
                    baseline.add_metric([*values, name], _buckets(totals), totals.total)
                    baseline_squares.add_metric([*values, name], totals.squares)
                    if name in q.training_baselines:
                        mae = q.training_baselines[name]
                        trained_baseline.add_metric([*values, name], mae)
        yield from (model, baseline, squares, baseline_squares, trained, trained_baseline)

    @staticmethod
    def _drift(reports: list[tuple[str, QualityReport]]) -> Iterator[Metric]:
        window = reports[0][1].drift_window_ticks
        z = GaugeMetricFamily(
            "streamlstm_input_drift_z",
            f"Recent inputs' mean (EW over {window} ticks of all streams) "
            "minus the training mean, in training standard deviations",
            labels=["model", "feature"],
        )
        ratio = GaugeMetricFamily(
            "streamlstm_input_std_ratio",
            "Recent inputs' standard deviation over the training one",
            labels=["model", "feature"],
        )
        for role, report in reports:
            for name, value, spread in zip(
                report.features, report.drift_z, report.std_ratio, strict=True
            ):
                if not math.isnan(value):
                    z.add_metric([role, name], value)
                if not math.isnan(spread):
                    ratio.add_metric([role, name], spread)
        yield from (z, ratio)

    @staticmethod
    def _scores(reports: list[tuple[str, QualityReport]]) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "streamlstm_anomaly_score", "Anomaly scores of the ticks that had one", labels=["model"]
        )
        flagged = CounterMetricFamily(
            "streamlstm_anomalies", "Ticks flagged as anomalies", labels=["model"]
        )
        rate = GaugeMetricFamily(
            "streamlstm_anomaly_false_alarm_rate",
            "The false-alarm rate per scored tick the flag was calibrated for",
            labels=["model"],
        )
        for role, report in reports:
            scores = report.scores
            assert scores is not None
            family.add_metric([role], _buckets(scores), scores.total)
            flagged.add_metric([role], report.anomalies)
            if report.false_alarm_rate is not None:
                rate.add_metric([role], report.false_alarm_rate)
        yield from (family, flagged, rate)

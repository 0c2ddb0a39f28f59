"""The model's live quality as Prometheus series, read from the engine's figures at scrape.

The engine child measures (``streamlstm.quality``); every step reply brings
its running totals (``EngineStats.quality``), and this collector turns the
latest into histograms, counters and gauges when Prometheus scrapes. Labels
are the horizon, the target column, the baseline's name and the feature:
never a stream id. Nothing is exported for what the model does not have (no
errors for a classifier or a model that never sees its target, no drift
without training statistics, no score without a score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamlstm.quality import ErrorTotals, QualityReport

__all__ = ["QualityCollector"]


def _buckets(totals: ErrorTotals) -> list[tuple[str, float]]:
    """Cumulative ``le`` buckets, ``+Inf`` last."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(totals.bounds, totals.counts, strict=False):
        running += count
        out.append((repr(float(bound)), running))
    out.append(("+Inf", totals.count))
    return out


class QualityCollector(Collector):
    """``streamlstm_forecast_*``, ``streamlstm_input_*``, ``streamlstm_anomal*`` and
    ``streamlstm_model_training_*`` from ``report()`` (None: nothing measured yet)."""

    def __init__(self, report: Callable[[], QualityReport | None]) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        report = self._report()
        if report is None:
            return
        if report.horizons:
            yield from self._errors(report)
        if report.features:
            yield from self._drift(report)
        if report.scores is not None:
            yield from self._scores(report)

    @staticmethod
    def _errors(report: QualityReport) -> Iterator[Metric]:
        labels = ["horizon", "target"]
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
        for q in report.horizons:
            values = [str(q.horizon), q.target]
            model.add_metric(values, _buckets(q.model), q.model.total)
            squares.add_metric(values, q.model.squares)
            if not math.isnan(q.training_mae):
                trained.add_metric(values, q.training_mae)
            for name, totals in q.baselines.items():
                baseline.add_metric([*values, name], _buckets(totals), totals.total)
                baseline_squares.add_metric([*values, name], totals.squares)
                if name in q.training_baselines:
                    trained_baseline.add_metric([*values, name], q.training_baselines[name])
        yield from (model, baseline, squares, baseline_squares, trained, trained_baseline)

    @staticmethod
    def _drift(report: QualityReport) -> Iterator[Metric]:
        z = GaugeMetricFamily(
            "streamlstm_input_drift_z",
            f"Recent inputs' mean (EW over {report.drift_window_ticks} ticks of all streams) "
            "minus the training mean, in training standard deviations",
            labels=["feature"],
        )
        ratio = GaugeMetricFamily(
            "streamlstm_input_std_ratio",
            "Recent inputs' standard deviation over the training one",
            labels=["feature"],
        )
        for name, value, spread in zip(
            report.features, report.drift_z, report.std_ratio, strict=True
        ):
            if not math.isnan(value):
                z.add_metric([name], value)
            if not math.isnan(spread):
                ratio.add_metric([name], spread)
        yield from (z, ratio)

    @staticmethod
    def _scores(report: QualityReport) -> Iterator[Metric]:
        scores = report.scores
        assert scores is not None
        family = HistogramMetricFamily(
            "streamlstm_anomaly_score", "Anomaly scores of the ticks that had one"
        )
        family.add_metric([], _buckets(scores), scores.total)
        yield family
        yield CounterMetricFamily(
            "streamlstm_anomalies", "Ticks flagged as anomalies", value=report.anomalies
        )
        if report.false_alarm_rate is not None:
            yield GaugeMetricFamily(
                "streamlstm_anomaly_false_alarm_rate",
                "The false-alarm rate per scored tick the flag was calibrated for",
                value=report.false_alarm_rate,
            )

"""Builds the streamlstm Grafana dashboard with grafana-foundation-sdk.

    python deploy/grafana/dashboard.py            # (re)write the dashboard JSON
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON is stale

The JSON is written to the Helm chart's ``files/dashboards/`` (the chart ships
it as a ConfigMap for Grafana's sidecar; compose mounts the same folder), so
there is one copy. ``deploy/grafana/dashboards`` is a link to that folder.
Run it with the tools environment that ``deploy/check.sh`` installs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import prometheus as prom_m

OUT = Path(__file__).resolve().parents[1] / "helm/streamlstm/files/dashboards/streamlstm.json"
UID = "streamlstm"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The label selector every query carries.
SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", ref: str = "A") -> prom_b.Dataquery:
    return prom_b.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref)


def timeseries(
    title: str,
    unit: str,
    description: str,
    *queries: prom_b.Dataquery,
    minimum: float | None = 0,
) -> ts_b.Panel:
    panel = ts_b.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
    if minimum is not None:  # None: the axis follows the data (values below 0)
        panel = panel.min(minimum)
    panel = (
        panel.height(8)
        .span(12)
        .fill_opacity(10)
        .legend(
            common_b.VizLegendOptions()
            .display_mode(common_m.LegendDisplayMode.TABLE)
            .placement(common_m.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    for i, q in enumerate(queries):
        panel = panel.with_target(q.ref_id(chr(ord("A") + i)))
    return panel


def stat(title: str, unit: str, description: str, expr: str) -> stat_b.Panel:
    return (
        stat_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(4)
        .graph_mode(common_m.BigValueGraphMode.AREA)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(query(expr))
    )


def quantiles(metric: str, by: str = "", legend: str = "") -> list[prom_b.Dataquery]:
    """p50, p90 and p99 of a histogram, per `by` (labels); `legend` prefixes their names."""
    group = f"{by}, le" if by else "le"
    prefix = f"{legend} " if legend else "{{" + by + "}} " if by else ""
    return [
        query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def threshold_lines(*steps: tuple[float | None, str]) -> dash_b.ThresholdsConfig:
    """Thresholds drawn as lines on a time series: (value, colour), the first value None."""
    return (
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps([dash_m.Threshold(value=value, color=color) for value, color in steps])
    )


def mean(metric: str, by: str) -> str:
    """rate(sum) / rate(count) of a histogram, per `by`: its mean over the rate interval."""
    rate = f"{{{SEL}}}[{RATE}]"
    return (
        f"(sum by ({by}) (rate({metric}_sum{rate})) / sum by ({by}) (rate({metric}_count{rate})))"
    )


#: The model-quality series are per (job, model, horizon, target): one served model per
#: job (model="serving"), and a shadow model beside it (model="shadow") while one runs,
#: on the same ticks: side by side on every quality panel.
FORECAST = "job, model, horizon, target"
BASELINE = "job, model, horizon, target, baseline"
FORECAST_LEGEND = "{{model}} {{target}} h={{horizon}}"
#: Thresholds of the model-quality alerts (deploy/prometheus/rules), drawn on the panels.
DEGRADED_K = 1.5
ANOMALY_M = 5


def build() -> dash_m.Dashboard:
    rate = f"{{{SEL}}}[{RATE}]"
    model_mae = mean("streamlstm_forecast_abs_error", FORECAST)
    baseline_mae = mean("streamlstm_forecast_baseline_abs_error", BASELINE)
    training_mae = f"max by ({FORECAST}) (streamlstm_model_training_mae{{{SEL}}})"
    training_baseline_mae = f"max by ({BASELINE}) (streamlstm_model_training_baseline_mae{{{SEL}}})"
    false_alarm_rate = f"max by (job, model) (streamlstm_anomaly_false_alarm_rate{{{SEL}}})"
    builder = (
        dash_b.Dashboard("streamlstm")
        .uid(UID)
        .description("Streaming LSTM inference over Kafka: `streamlstm serve` instances.")
        .tags(["streamlstm", "kafka"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dash_b.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(streamlstm_model_info, job)")
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            dash_b.QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query('label_values(streamlstm_model_info{job=~"$job"}, instance)')
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_row(dash_b.Row("Overview"))
        .with_panel(stat("Instances up", "none", "Scrape targets answering.", f"sum(up{{{SEL}}})"))
        .with_panel(
            stat(
                "Ticks in",
                "reqps",
                "Messages read from the input topic per second.",
                f"sum(rate(streamlstm_ticks_consumed_total{rate}))",
            )
        )
        .with_panel(
            stat(
                "Predictions out",
                "reqps",
                "Predictions acknowledged on the output topic per second.",
                f"sum(rate(streamlstm_predictions_produced_total{rate}))",
            )
        )
        .with_panel(
            stat(
                "Dead letters",
                "reqps",
                "Messages sent to the dead-letter topic per second.",
                f"sum(rate(streamlstm_dead_letters_total{rate})) or vector(0)",
            )
        )
        .with_panel(
            stat(
                "Active streams",
                "short",
                "Streams with state in memory, all instances.",
                f"sum(streamlstm_active_streams{{{SEL}}})",
            )
        )
        .with_panel(
            stat(
                "Consumer lag",
                "short",
                "Records behind the partition ends, all partitions.",
                f"sum(max by (topic, partition) (streamlstm_consumer_lag{{{SEL}}}))",
            )
        )
        .with_row(dash_b.Row("Throughput"))
        .with_panel(
            timeseries(
                "Ticks in / predictions out",
                "reqps",
                "Input messages read, predictions acknowledged, dead letters sent.",
                query(
                    f"sum by (instance) (rate(streamlstm_ticks_consumed_total{rate}))",
                    "{{instance}} in",
                ),
                query(
                    f"sum by (instance) (rate(streamlstm_predictions_produced_total{rate}))",
                    "{{instance}} out",
                ),
                query(
                    f"sum by (instance) (rate(streamlstm_dead_letters_total{rate}))",
                    "{{instance}} dead letters",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Dead letters by reason",
                "reqps",
                "Messages sent to the dead-letter topic, by the field that was wrong.",
                query(f"sum by (reason) (rate(streamlstm_dead_letters_total{rate}))", "{{reason}}"),
            )
        )
        .with_row(dash_b.Row("Latency"))
        .with_panel(
            timeseries(
                "Latency from receive",
                "s",
                "Tick received from Kafka to prediction acknowledged.",
                *quantiles("streamlstm_latency_from_receive_seconds"),
            )
        )
        .with_panel(
            timeseries(
                "Latency from event time",
                "s",
                "Tick event time (`ts`) to prediction acknowledged; ticks without `ts` "
                "are not counted.",
                *quantiles("streamlstm_latency_from_event_seconds"),
            )
        )
        .with_row(dash_b.Row("Model quality"))
        .with_panel(
            timeseries(
                "Forecast MAE vs training MAE",
                "short",
                "Mean absolute error of the served forecasts (a forecast made `horizon` ticks "
                "ago against the truth now), in the target's units, per horizon; the test MAE "
                "`streamlstm train` reported for the model; and the level "
                f"StreamlstmForecastDegraded alerts at ({DEGRADED_K}x the training MAE, over 1h "
                "for 30m).",
                query(model_mae, f"{FORECAST_LEGEND} live"),
                query(training_mae, f"{FORECAST_LEGEND} training"),
                query(f"{DEGRADED_K} * {training_mae}", f"{FORECAST_LEGEND} alert level"),
            )
        )
        .with_panel(
            timeseries(
                "Skill vs baselines",
                "percentunit",
                "1 - MAE / baseline MAE, live and at training, against each naive baseline "
                "train compares with (persistence, seasonal): 100% is perfect, 0 no better than "
                "the baseline, below 0 worse.",
                query(
                    # `group_right ()`: a bare `group_right (` would read the right
                    # side's parenthesis as the label list.
                    f"1 - ({model_mae} / on ({FORECAST}) group_right () {baseline_mae})",
                    f"{FORECAST_LEGEND} vs {{{{baseline}}}} live",
                ),
                query(
                    f"1 - ({training_mae} / on ({FORECAST}) group_right {training_baseline_mae})",
                    f"{FORECAST_LEGEND} vs {{{{baseline}}}} training",
                ),
                minimum=None,
            )
        )
        .with_panel(
            timeseries(
                "Forecast RMSE",
                "short",
                "Root mean squared error of the served forecasts and of the baselines, in the "
                "target's units; well above the MAE: a few large errors.",
                query(
                    f"sqrt(sum by ({FORECAST}) (rate(streamlstm_forecast_squared_error_sum_total"
                    f"{rate})) / sum by ({FORECAST}) (rate(streamlstm_forecast_abs_error_count"
                    f"{rate})))",
                    f"{FORECAST_LEGEND} live",
                ),
                query(
                    f"sqrt(sum by ({BASELINE}) (rate("
                    f"streamlstm_forecast_baseline_squared_error_sum_total{rate}))"
                    f" / sum by ({BASELINE}) (rate("
                    f"streamlstm_forecast_baseline_abs_error_count{rate})))",
                    f"{FORECAST_LEGEND} {{{{baseline}}}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Absolute error quantiles",
                "short",
                "Quantiles of the served forecasts' absolute error, from the histogram (within "
                "its buckets).",
                *quantiles("streamlstm_forecast_abs_error", FORECAST, FORECAST_LEGEND),
            )
        )
        .with_panel(
            timeseries(
                "Input drift (z) per feature",
                "none",
                "(Recent mean of each input feature over the served streams - training mean) "
                "/ training sd, per instance; StreamlstmInputDrift alerts past +-2 for 15m.",
                query(f"streamlstm_input_drift_z{{{SEL}}}", "{{model}} {{feature}} {{instance}}"),
                minimum=None,
            )
            .thresholds(threshold_lines((None, "red"), (-2, "green"), (2, "red")))
            .thresholds_style(
                common_b.GraphThresholdsStyleConfig().mode(common_m.GraphTresholdsStyleMode.DASHED)
            )
        )
        .with_panel(
            timeseries(
                "Input spread per feature",
                "none",
                "Recent standard deviation of each input feature over the served streams / its "
                "training sd, per instance: 1 is as in training.",
                query(f"streamlstm_input_std_ratio{{{SEL}}}", "{{model}} {{feature}} {{instance}}"),
            )
        )
        .with_panel(
            timeseries(
                "Anomaly rate vs configured false-alarm rate",
                "percentunit",
                "Scored ticks flagged as anomalous; the flag's configured false-alarm rate; and "
                f"the level StreamlstmAnomalyRateHigh alerts at ({ANOMALY_M}x, over 15m for 15m).",
                query(
                    f"sum by (job, model) (rate(streamlstm_anomalies_total{rate}))"
                    f" / sum by (job, model) (rate(streamlstm_anomaly_score_count{rate}))",
                    "{{job}} {{model}} flagged",
                ),
                query(false_alarm_rate, "{{job}} {{model}} configured"),
                query(f"{ANOMALY_M} * {false_alarm_rate}", "{{job}} {{model}} alert level"),
            )
        )
        .with_panel(
            timeseries(
                "Anomaly score quantiles",
                "none",
                "Quantiles of the anomaly scores of scored ticks, from the histogram.",
                *quantiles("streamlstm_anomaly_score", "model"),
            )
        )
        .with_row(dash_b.Row("Kafka"))
        .with_panel(
            timeseries(
                "Consumer lag per partition",
                "short",
                "Records behind each partition's end (max over instances during a rebalance).",
                query(
                    f"max by (topic, partition) (streamlstm_consumer_lag{{{SEL}}})",
                    "{{topic}}/{{partition}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Commits and rebalances",
                "ops",
                "Offset commits after acknowledged output; partitions revoked by rebalances.",
                query(
                    f"sum by (instance) (rate(streamlstm_commits_total{rate}))",
                    "{{instance}} commits",
                ),
                query(
                    f"sum by (instance) (rate(streamlstm_partitions_revoked_total{rate}))",
                    "{{instance}} revoked",
                ),
            )
        )
        .with_row(dash_b.Row("State"))
        .with_panel(
            timeseries(
                "Active streams",
                "short",
                "Streams with state in memory, against --max-streams.",
                query(f"sum by (instance) (streamlstm_active_streams{{{SEL}}})", "{{instance}}"),
                query(f"sum by (instance) (streamlstm_max_streams{{{SEL}}})", "{{instance}} max"),
            )
        )
        .with_panel(
            timeseries(
                "Evictions by reason, resets and ends",
                "ops",
                "Streams evicted from memory (lru: capacity, ttl: idle); ticks with reset/end.",
                query(
                    f"sum by (reason) (rate(streamlstm_evictions_total{rate}))",
                    "evicted {{reason}}",
                ),
                query(f"sum(rate(streamlstm_resets_total{rate}))", "resets"),
                query(f"sum(rate(streamlstm_ends_total{rate}))", "ends"),
            )
        )
        .with_row(dash_b.Row("Durable state: checkpoints"))
        .with_panel(
            timeseries(
                "Checkpoints",
                "ops",
                "Checkpoints completed (changed states to the changelog, then the offsets), "
                "every --commit-interval-ms with --state durable; none in memory mode.",
                query(
                    f"sum by (instance) (rate(streamlstm_checkpoints_total{rate}))",
                    "{{instance}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Checkpoint time",
                "s",
                "From asking the engine for the changed states to committing the offsets.",
                *quantiles("streamlstm_checkpoint_seconds"),
            )
        )
        .with_panel(
            timeseries(
                "Checkpoint records by kind",
                "ops",
                "Changelog records written: states of changed streams, tombstones of "
                "streams that ended or were evicted.",
                query(
                    f"sum by (kind) (rate(streamlstm_checkpoint_records_total{rate}))",
                    "{{kind}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Checkpoint bytes",
                "Bps",
                "Bytes of state written to the changelog.",
                query(
                    f"sum by (instance) (rate(streamlstm_checkpoint_bytes_total{rate}))",
                    "{{instance}}",
                ),
            )
        )
        .with_row(dash_b.Row("Durable state: restores"))
        .with_panel(
            timeseries(
                "Restored streams (since start)",
                "short",
                "Streams loaded from the changelog on partition assignment, and states left "
                "out, by reason, since each instance started (restores mostly run at start-up, "
                "before a rate could see them).",
                query(
                    f"sum by (instance) (streamlstm_restored_streams_total{{{SEL}}})",
                    "{{instance}}",
                ),
                query(
                    f"sum by (reason) (streamlstm_restore_left_out_streams_total{{{SEL}}})",
                    "left out: {{reason}}",
                ),
                query(
                    f"sum(streamlstm_restore_kept_model_changed_streams_total{{{SEL}}})",
                    "kept from another, compatible model",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Restore time (since start)",
                "s",
                "Mean time to restore one changelog partition, and the partition restores "
                "that took over 30 s, since each instance started.",
                query(
                    f"sum by (instance) (streamlstm_restore_seconds_sum{{{SEL}}})"
                    f" / sum by (instance) (streamlstm_restore_seconds_count{{{SEL}}})",
                    "{{instance}} mean",
                ),
                query(
                    f"sum by (instance) (streamlstm_restore_seconds_count{{{SEL}}})"
                    f' - sum by (instance) (streamlstm_restore_seconds_bucket{{{SEL}, le="30.0"}})',
                    "{{instance}} restores over 30 s",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Restore bytes (since start)",
                "bytes",
                "Bytes of state read from the changelog by restores since each instance started.",
                query(
                    f"sum by (instance) (streamlstm_restore_bytes_total{{{SEL}}})", "{{instance}}"
                ),
            )
        )
        .with_panel(
            timeseries(
                "Skipped ticks",
                "ops",
                "Ticks read again after a restore or a rebalance whose offset the stream's "
                "restored state already reflects: not applied, not answered again.",
                query(
                    f"sum by (instance) (rate(streamlstm_ticks_skipped_total{rate}))",
                    "{{instance}}",
                ),
            )
        )
        .with_row(dash_b.Row("Cold tier and local checkpoints (--state-dir)"))
        .with_panel(
            timeseries(
                "Streams on disk",
                "short",
                "Streams the cold tier holds on local disk (memory had no room for them), "
                "per instance. Empty without --state-dir.",
                query(f"sum by (instance) (streamlstm_cold_streams{{{SEL}}})", "{{instance}}"),
            )
        )
        .with_panel(
            timeseries(
                "Cold tier reads, writes and hit rate",
                "ops",
                "Batched reads of returning streams and states moved to disk, per second; "
                "the hit rate (found over looked up, 0 to 1) of the streams not in "
                "memory: low means most are new streams, not returning ones.",
                query(f"sum(rate(streamlstm_cold_reads_total{rate}))", "reads"),
                query(f"sum(rate(streamlstm_cold_writes_total{rate}))", "writes"),
                query(
                    f"sum(rate(streamlstm_cold_hits_total{rate}))"
                    f" / sum(rate(streamlstm_cold_lookups_total{rate}))",
                    "hit rate",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Restore time by source (since start)",
                "s",
                "Mean time to restore one partition from its local checkpoint and the "
                "changelog after it (local), against from the whole changelog (changelog).",
                query(
                    "sum by (source) (streamlstm_restore_partition_seconds_sum"
                    f"{{{SEL}}}) / sum by (source) (streamlstm_restore_partition_seconds_count"
                    f"{{{SEL}}})",
                    "{{source}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Local checkpoint writes",
                "ops",
                "Records written to the local checkpoints once each checkpoint is durable, "
                "per second, and local checkpoints not used at a restore, by reason (since "
                "start).",
                query(
                    f"sum by (instance) (rate(streamlstm_local_checkpoint_records_total{rate}))",
                    "{{instance}} records",
                ),
                query(
                    f"sum by (reason) (streamlstm_local_checkpoint_discarded_total{{{SEL}}})",
                    "not used: {{reason}}",
                ),
            )
        )
        .with_row(dash_b.Row("Exactly-once: transactions"))
        .with_panel(
            timeseries(
                "Transactions",
                "ops",
                "--guarantee exactly-once: per input partition and checkpoint, transactions "
                "committed (those that held records or offsets) and aborted (with records: "
                "a revoked partition whose transaction could not commit, or the shutdown "
                "after a failure). 0 in at-least-once and memory mode.",
                query(
                    "sum by (instance) (rate(streamlstm_transactions_total"
                    f'{{{SEL}, outcome="committed"}}[{RATE}]))',
                    "{{instance}} committed",
                ),
                query(
                    "sum by (instance) (rate(streamlstm_transactions_total"
                    f'{{{SEL}, outcome="aborted"}}[{RATE}]))',
                    "{{instance}} aborted",
                ),
            ).span(24)
        )
        .with_row(dash_b.Row("Engine"))
        .with_panel(
            timeseries(
                "Engine step time",
                "s",
                "Time of one engine step (one batch) in the engine process.",
                *quantiles("streamlstm_step_seconds"),
            )
        )
        .with_panel(
            timeseries(
                "Batch size",
                "short",
                "Ticks per engine step: mean and 99th percentile; and the records each poll "
                "asks for (--max-records, or what --latency-target-ms sizes it to).",
                query(
                    f"sum by (instance) (rate(streamlstm_batch_size_sum{rate}))"
                    f" / sum by (instance) (rate(streamlstm_batch_size_count{rate}))",
                    "{{instance}} mean",
                ),
                query(
                    "histogram_quantile(0.99, sum by (instance, le) "
                    f"(rate(streamlstm_batch_size_bucket{rate})))",
                    "{{instance}} p99",
                ),
                query(
                    f"max by (instance) (streamlstm_poll_batch_target_records{{{SEL}}})",
                    "{{instance}} poll asks",
                ),
            )
        )
        .with_row(dash_b.Row("Process"))
        .with_panel(
            timeseries(
                "CPU",
                "percentunit",
                "CPU of the serving process and of its engine child process.",
                query(f"rate(process_cpu_seconds_total{rate})", "{{instance}} daemon"),
                query(
                    f"rate(streamlstm_engine_process_cpu_seconds_total{rate})",
                    "{{instance}} engine",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Memory",
                "bytes",
                "Resident memory of the serving process and of its engine child process.",
                query(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}} daemon"),
                query(
                    f"streamlstm_engine_process_resident_memory_bytes{{{SEL}}}",
                    "{{instance}} engine",
                ),
            )
        )
        .with_panel(
            table_b.Panel()
            .title("Model")
            .description("The model each instance serves, and its recurrent step.")
            .datasource(DATASOURCE)
            .height(6)
            .span(24)
            .with_target(
                query(f"streamlstm_model_info{{{SEL}}}")
                .instant()
                .format(prom_m.PromQueryFormat.TABLE)
            )
        )
    )
    return builder.build()


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

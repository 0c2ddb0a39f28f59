"""``streamlstm bench kafka`` end to end on the test broker, small: every figure is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamlstm.consumers.devtools.bench_report import report

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


def test_bench_kafka_json_has_every_figure(bootstrap: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamlstm.cli",
            "bench",
            "kafka",
            "--bootstrap-servers",
            bootstrap,
            "--streams",
            "50",
            "--ticks",
            "600",
            "--max-records",
            "64",
            "--latency-seconds",
            "1",
            "--latency-rate",
            "300",
            "--drains",
            "2",
            "--restore-streams",
            "500",
            "--latency-target-ms",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["streams"] == 50 and result["ticks"] == 600
    assert result["cpu_cores"] == os.cpu_count()
    assert result["passthrough_ticks_per_s"] > 0 and result["engine_ticks_per_s"] > 0
    ratio = result["engine_ticks_per_s"] / result["passthrough_ticks_per_s"]
    assert abs(result["engine_over_passthrough"] - ratio) < 0.01
    # Two drains per kind, and the best of each is the figure.
    for name in ("passthrough", "engine", "engine_target", "durable", "exactly_once"):
        assert len(result["drains"][name]) == 2
        assert result[f"{name}_ticks_per_s"] == max(result["drains"][name])
    durable = result["durable_ticks_per_s"] / result["engine_ticks_per_s"]
    assert abs(result["durable_over_engine"] - durable) < 0.01
    exactly_once = result["exactly_once_ticks_per_s"] / result["engine_ticks_per_s"]
    assert abs(result["exactly_once_over_engine"] - exactly_once) < 0.01
    assert result["restored_streams"] == 500
    assert result["restore_streams_per_s"] == round(500 / result["restore_seconds"])
    assert result["latency_rate_is_half_max"] is False
    for name in ("engine_latency", "passthrough_latency", "transport_latency"):
        lat = result[name]
        assert lat["rate_ticks_per_s"] == 300
        # About 300 ticks in the measured second; the warm-up's are left out.
        assert 150 <= lat["ticks"] <= 450, lat
        assert 0 < lat["p50_ms"] <= lat["p99_ms"]
        # Half the measured maximum too, beside the rate asked for.
        half = result[f"half_max_{name}"]["rate_ticks_per_s"]
        assert abs(half - result["engine_ticks_per_s"] / 2) <= 0.5
    for name in ("engine_latency", "passthrough_latency"):
        lat = result[name]
        # What the daemon adds (receipt to acknowledgement) is part of the whole.
        assert 0 < lat["daemon_p50_ms"] <= lat["daemon_p99_ms"] <= lat["p99_ms"] + 1
        cpu = lat["cpu_us_per_tick"]
        assert set(cpu) == {"daemon_parent", "engine_child", "broker", "load_generator"} - (
            set() if name == "engine_latency" else {"engine_child"}
        )
        # /proc counts in clock ticks (10 ms): a short run may read 0 for one process.
        assert all(us >= 0 for us in cpu.values()) and sum(cpu.values()) > 0, cpu
        # The cores the run kept busy: every process's CPU a tick at the paced rate.
        assert lat["cores_busy"] == round(sum(cpu.values()) * 300 / 1e6, 2)
    # CPU per tick of each process in the drains (no generator: the topic is filled).
    assert set(result["drain_cpu_us_per_tick"]["engine"]) == {
        "daemon_parent",
        "engine_child",
        "broker",
    }
    assert all(us >= 0 for us in result["drain_cpu_us_per_tick"]["engine"].values())
    assert "[bench kafka]" in proc.stderr  # progress goes to stderr
    # --latency-target-ms: the engine sized for it, beside the fixed polls, at the same rates.
    assert result["latency_target_ms"] == 20
    sized = result["engine_target_ticks_per_s"] / result["engine_ticks_per_s"]
    assert abs(result["engine_target_over_engine"] - sized) < 0.01
    for label in ("", "half_max_"):
        fixed, lat = result[f"{label}engine_latency"], result[f"{label}engine_target_latency"]
        assert lat["rate_ticks_per_s"] == fixed["rate_ticks_per_s"]
        assert 0 < lat["daemon_p50_ms"] <= lat["daemon_p99_ms"] <= lat["p99_ms"] + 1
        assert 1 <= lat["mean_step_ticks"] <= 64 and 1 <= fixed["mean_step_ticks"] <= 64
    text = report({**result, "broker": "test"}, 2)
    busy = result["engine_latency"]["cores_busy"]
    assert f"; {busy:.2f} of {result['cpu_cores']} cores busy" in text
    assert "--latency-target-ms 20 against fixed polls of 64 (targeted / fixed):" in text
    assert f"maximum: {result['engine_target_ticks_per_s']:,} / " in text

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlstm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_bench_engine_json_has_every_figure() -> None:
    proc = _run(
        "bench",
        "engine",
        "--streams",
        "300",
        "--seconds",
        "0.05",
        "--repeats",
        "1",
        "--rss-streams",
        "3000",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    row = result["results"][0]
    assert row["streams"] == 300
    for key in (
        "engine_ticks_per_s",
        "ceiling_ticks_per_s",
        "engine_over_ceiling",
        "engine_over_tutorial",
        "state_bytes_per_stream",
        "iid_engine_over_ceiling",
    ):
        assert row[key] > 0, key
    assert result["tutorial_ticks_per_s"] > 0
    assert result["rss"]["streams"] == 3000
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_unknown_command_fails_with_usage() -> None:
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert "unknown command" in proc.stderr and "serve" in proc.stderr

"""``streamlstm bench cold`` runs end to end on a small workload."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlstm.cli import main
from streamlstm.cold_bench import (
    format_cold_bench,
    format_engine_cold,
    run_cold_bench,
    run_engine_cold,
)


def test_the_stores_bench_reports_each_installed_backend(tmp_path: Path) -> None:
    result = run_cold_bench(
        keys=3000, write_batch=500, read_batch=100, polls=3, repeats=1, directory=str(tmp_path)
    )
    assert "rocksdict" in result["backends"]
    figures = result["backends"]["rocksdict"]
    assert figures["writes_per_s"] > 0 and figures["disk_bytes_per_key"] > 2000
    assert "rocksdict" in format_cold_bench(result)
    assert not list(tmp_path.iterdir())  # its stores are removed


def test_the_engine_bench_reads_about_its_share_from_disk(tmp_path: Path) -> None:
    figures = run_engine_cold(hot=400, pool=2000, batch=100, seconds=0.6, directory=str(tmp_path))
    assert 0.05 <= figures["ticks_read_from_disk"] <= 0.2
    assert figures["with_cold_ticks_per_s"] > 0 and figures["streams_on_disk"] > 1000


def test_the_engine_bench_at_a_scale_checks_streams_back_from_disk_on_the_oracle(
    tmp_path: Path,
) -> None:
    """``streams`` in ``max_streams``' room: the hot set the largest it holds, the rest
    the pool; 5 sample streams with ticks before their eviction and after their return
    on ``predict_sequence`` (``after`` raises where one was not read back from disk)."""
    figures = run_engine_cold(
        streams=3000, max_streams=500, batch=100, seconds=0.6, directory=str(tmp_path), sample=5
    )
    assert (figures["room"], figures["streams"], figures["sample"]) == (500, 3000, 5)
    assert figures["hot"] + figures["pool"] + 5 == 3000 and figures["hot"] <= 500
    assert figures["sample_max_error"] < 1e-5
    assert figures["streams_on_disk"] >= 2500 and figures["disk_bytes"] > 0
    assert figures["state_bytes"] > 2000 and figures["fill_streams_per_s"] > 0
    assert "oracle: 5 streams" in format_engine_cold(figures)
    assert not list(tmp_path.iterdir())


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "cold", "--keys", "1000", "--polls", "2", "--repeats", "1"]
    assert main([*argv, "--read-batch", "50", "--dir", str(tmp_path), "--json"]) == 0
    assert '"rocksdict"' in capsys.readouterr().out

"""``streamlstm bench cold`` runs end to end on a small workload."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlstm.cli import main
from streamlstm.cold_bench import format_cold_bench, run_cold_bench, run_engine_cold


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


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "cold", "--keys", "1000", "--polls", "2", "--repeats", "1"]
    assert main([*argv, "--read-batch", "50", "--dir", str(tmp_path), "--json"]) == 0
    assert '"rocksdict"' in capsys.readouterr().out

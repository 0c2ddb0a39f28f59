import json
import subprocess
import sys

import pytest

from streamlstm import ModelConfig
from streamlstm.bench import flops_per_tick


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
        "sgemm_gflops",
        "roofline_ticks_per_s",
        "engine_over_roofline",
    ):
        assert row[key] > 0, key
    # The roofline is the measured peak over the model's FLOPs per tick.
    assert result["flops_per_tick"] == flops_per_tick(ModelConfig(input_size=1))
    peak = row["sgemm_gflops"] * 1e9 / result["flops_per_tick"]
    assert abs(row["roofline_ticks_per_s"] / peak - 1) < 0.01
    assert result["tutorial_ticks_per_s"] > 0
    assert result["rss"]["streams"] == 3000
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_unknown_command_fails_with_usage() -> None:
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert "unknown command" in proc.stderr and "serve" in proc.stderr


@pytest.mark.parametrize(("cell", "gates"), [("lstm", 4), ("gru", 3), ("rnn", 1)])
def test_flops_per_tick_counts_gate_products_and_the_head(cell: str, gates: int) -> None:
    config = ModelConfig(
        input_size=3, hidden_sizes=(8, 4), head_sizes=(5,), output_size=2, cell=cell
    )
    # [G*8, 3+8] and [G*4, 8+4] gate products, then 4->5 and 5->2; 2 FLOPs a multiply-add.
    assert flops_per_tick(config) == 2 * (gates * (8 * 11 + 4 * 12) + 4 * 5 + 5 * 2)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_bench_engine_takes_a_cell_and_its_torch_ceiling(cell: str) -> None:
    proc = _run(
        "bench", "engine", "--cell", cell, "--streams", "200", "--seconds", "0.02",
        "--repeats", "1", "--rss-streams", "0", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cell"] == cell and result["model"]["cell"] == cell
    assert result["raw_state_bytes_per_stream"] == 4 * (128 + 128)  # h alone
    row = result["results"][0]
    assert row["ceiling_ticks_per_s"] > 0 and row["engine_over_ceiling"] > 0
    assert row["state_bytes_per_stream"] < 2 * 4 * (128 + 128)  # under an LSTM's raw h and c

"""import onnx: torch models exported with torch.onnx.export, served like onnxruntime runs them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from streamlstm import Bundle, ConfigError
from streamlstm.cli import main as cli_main
from streamlstm.training.onnx_import import import_onnx
from tests.helpers.importing import LONG, assert_serves_like

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Forecaster(nn.Module):
    """A recurrent layer stack and a head of Linear, Tanh, Linear: an answer every tick
    (or at the last tick only, through a Gemm)."""

    def __init__(self, cell: str, outputs: int = 2, last_only: bool = False, **kw: Any) -> None:
        super().__init__()
        self.rnn = CELLS[cell](3, 16, 2, batch_first=True, **kw)
        width = 32 if kw.get("bidirectional") else 16
        self.fc = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, outputs))
        self.last_only = last_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1] if self.last_only else out)  # type: ignore[no-any-return]


def _export(model: nn.Module, path: Path, features: int = 3, inputs: int = 1) -> Path:
    """The TorchScript exporter (dynamo=False): it writes ONNX LSTM/GRU/RNN nodes."""
    args = tuple(torch.zeros(1, 5, features) if i == 0 else torch.zeros(2, 1, 16)
                 for i in range(inputs))  # fmt: skip
    names = ["x", "h0"][:inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, batch size notes
        torch.onnx.export(
            model.eval(), args, str(path), dynamo=False, input_names=names,
            dynamic_axes={"x": {1: "time"}},
        )  # fmt: skip
    return path


def _signal(streams: int, ticks: int, features: int = 3) -> np.ndarray:
    walk = np.cumsum(np.random.default_rng(5).normal(0, 0.3, (streams, ticks, features)), 1)
    return np.sin(walk).astype(np.float32)


def _runtime(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's answers for each stream of ``x`` (one run per stream, batch 1)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_exported_models_serve_like_onnxruntime_over_a_long_sequence(
    tmp_path: Path, cell: str
) -> None:
    torch.manual_seed(4)
    path = _export(Forecaster(cell), tmp_path / f"{cell}.onnx")
    x = _signal(2, LONG)
    expected = _runtime(path, x)  # [2, 1000, 2]
    assert cli_main(["import", "onnx", str(path), "--out", str(tmp_path / "b")]) == 0
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.cell == cell and bundle.config.hidden_sizes == (16, 16)
    assert bundle.config.head_sizes == (8,) and bundle.config.head_activation == "tanh"
    assert bundle.training["imported"]["source"] == "onnx"
    assert_serves_like(bundle, x, expected, atol=1e-5)


def test_a_last_tick_gemm_head_and_scaling(tmp_path: Path) -> None:
    torch.manual_seed(6)
    path = _export(Forecaster("gru", outputs=1, last_only=True), tmp_path / "last.onnx")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Gather", "Gemm"} <= kinds  # out[:, -1] and nn.Linear on a matrix
    raw = _signal(1, 300) * 50 + 100
    lo, hi = np.full(3, 50.0), np.full(3, 150.0)
    expected = _runtime(path, ((raw - lo) / (hi - lo)).astype(np.float32))[0]  # the last tick
    # Inputs scaled onto [0, 1] per column, outputs left as they are (target 0..1).
    bundle = import_onnx(path, scaler=_min_max(lo, hi), name="last")
    np.testing.assert_allclose(bundle.predict_sequence(raw[0])[-1], expected, atol=1e-5)


def _min_max(lo: np.ndarray, hi: np.ndarray) -> Any:
    from streamlstm.training.importers import ScalerSource

    return ScalerSource(feature_min=tuple(lo), feature_max=tuple(hi), target_min=0, target_max=1)


def _edit(path: Path, op: str, change: Callable[[onnx.ModelProto, onnx.NodeProto], None]) -> Path:
    """``path`` with ``change`` made to its first ``op`` node, saved beside it."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == op)
    change(model, node)
    out = path.with_name(f"{path.stem}-{len(list(path.parent.iterdir()))}.onnx")
    onnx.save(model, str(out))
    return out


def _set(**attrs: Any) -> Callable[[onnx.ModelProto, onnx.NodeProto], None]:
    def change(_model: onnx.ModelProto, node: onnx.NodeProto) -> None:
        kept = [a for a in node.attribute if a.name not in attrs]
        del node.attribute[:]
        node.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attrs.items())])

    return change


def _peepholes(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 48), np.float32), "P"))
    while len(node.input) < 7:
        node.input.append("")
    node.input.append("P")


def test_what_torch_cannot_do_is_refused_naming_the_node(tmp_path: Path) -> None:
    lstm = _export(Forecaster("lstm"), tmp_path / "lstm.onnx")
    gru = _export(Forecaster("gru"), tmp_path / "gru.onnx")
    cases = [
        (_export(Forecaster("lstm", bidirectional=True), tmp_path / "bi.onnx"),
         r"\(LSTM\) runs direction='bidirectional': only a forward layer can stream"),
        (_edit(lstm, "LSTM", _set(direction="reverse")), "runs direction='reverse'"),
        (_export(Forecaster("rnn", nonlinearity="relu"), tmp_path / "relu.onnx"),
         r"\(RNN\) uses activations \['Relu'\]; only the defaults \(Tanh\)"),
        (_edit(lstm, "LSTM", _set(clip=3.0)), "clips its cell input at 3.0"),
        (_edit(lstm, "LSTM", _set(layout=1)), "has layout=1"),
        (_edit(lstm, "LSTM", _set(input_forget=1)), "input_forget=1"),
        (_edit(lstm, "LSTM", _peepholes), "has peephole weights P"),
        (_edit(gru, "GRU", _set(linear_before_reset=0)), r"\(GRU\) has linear_before_reset=0"),
        (_export(WithState(), tmp_path / "h0.onnx", inputs=2),
         "starts from an initial_h that is not zero"),
        (_export(Mixed(), tmp_path / "mixed.onnx"), r"mixes recurrent operators \(LSTM -> GRU\)"),
        (_export(Normed(), tmp_path / "norm.onnx"),
         r"\(LayerNormalization\) is not supported: streamlstm imports"),
        (_export(TwoOutputs(), tmp_path / "two.onnx"), "the graph has 2 outputs"),
        (_export(Leaky(), tmp_path / "leaky.onnx"), r"\(LeakyRelu\) is not supported in the head"),
    ]  # fmt: skip
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            import_onnx(path)


class WithState(nn.Module):
    """Starts from a state given as a graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.GRU(3, 16, 2, batch_first=True), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x, h0)[0])  # type: ignore[no-any-return]


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.LSTM(3, 8, batch_first=True), nn.GRU(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)[0])[0])  # type: ignore[no-any-return]


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.norm = nn.LSTM(3, 8, batch_first=True), nn.LayerNorm(8)
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.rnn(x)[0]))  # type: ignore[no-any-return]


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, (h, _) = self.rnn(x)
        return self.fc(out), h


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(8, 4), nn.LeakyReLU(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0])  # type: ignore[no-any-return]

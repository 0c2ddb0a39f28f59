"""The C kernels' and the NumPy recurrent step against nn.LSTM, nn.GRU and nn.RNN, and how the
engine picks a path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlstm import Bundle, ConfigError, Engine, ModelConfig
from streamlstm.config import CELLS
from streamlstm.kernels import NativeStep, native_available
from streamlstm.numpy_step import NumpyStep


def test_the_kernels_are_built_here() -> None:
    # pip builds them with the package; a silent build failure would leave every
    # other native test running on NumPy, so it fails here, loudly.
    assert native_available(), (
        "streamlstm._kernels is not built (or STREAMLSTM_NATIVE=0): "
        "reinstall with a C compiler, OpenMP and scipy-openblas32 (make clean test)"
    )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("step_kind", [NativeStep, NumpyStep])
@pytest.mark.parametrize(
    ("inputs", "hidden", "head"),
    [(1, (128, 128), (64,)), (3, (128, 64), ()), (2, (12, 12, 6), (16, 8)), (5, (7,), (20,))],
)
def test_the_step_equals_torch_and_its_head_and_updates_only_its_slots(
    cell: str,
    step_kind: type[NativeStep] | type[NumpyStep],
    inputs: int,
    hidden: tuple[int, ...],
    head: tuple[int, ...],
) -> None:
    config = ModelConfig(
        input_size=inputs, hidden_sizes=hidden, head_sizes=head, output_size=2, cell=cell
    )
    bundle = Bundle.random(config, seed=3)
    model = bundle.model
    rng = np.random.default_rng(0)
    capacity, n = 40, 17
    # h in [-1, 1] as a GRU's or RNN's always is; an LSTM's c unbounded.
    hs = [rng.uniform(-1, 1, (capacity, size)).astype(np.float32) for size in hidden]
    cs = [
        rng.standard_normal((capacity, size), dtype=np.float32) * 3
        for size in (hidden if config.keeps_c else ())
    ]
    # Large inputs drive gates into saturation, where a careless sigmoid overflows.
    x = rng.standard_normal((n, inputs), dtype=np.float32) * 40
    slots = rng.permutation(capacity)[:n].astype(np.int64)
    before_h = [t.copy() for t in hs]
    before_c = [t.copy() for t in cs]

    def grouped(state: list[np.ndarray]) -> list[torch.Tensor]:
        """The store's rows at ``slots`` as ``recurrent_step`` takes them, per layer group."""
        if not state:
            return []  # a GRU's or RNN's c
        return [
            torch.stack([torch.from_numpy(state[g.first + j][slots]) for j in range(g.count)])
            for g in model.groups
        ]

    with torch.inference_mode():
        want_top, want_h, want_c = model.recurrent_step(
            torch.from_numpy(x), grouped(hs), grouped(cs)
        )
        want_y = model.head(want_top).numpy()
    got = step_kind(bundle.weights)(hs, cs, slots, x).copy()
    np.testing.assert_allclose(got, want_y, atol=2e-6, rtol=0)
    others = np.setdiff1d(np.arange(capacity), slots)
    assert len(want_c) == (len(model.groups) if config.keeps_c else 0)
    for g, group_h in zip(model.groups, want_h, strict=True):
        for j in range(g.count):
            layer = g.first + j
            np.testing.assert_allclose(hs[layer][slots], group_h[j].numpy(), atol=1e-6, rtol=0)
            np.testing.assert_array_equal(hs[layer][others], before_h[layer][others])
    for g, group_c in zip(model.groups, want_c, strict=False):
        for j in range(g.count):
            layer = g.first + j
            np.testing.assert_allclose(cs[layer][slots], group_c[j].numpy(), atol=1e-5, rtol=1e-6)
            np.testing.assert_array_equal(cs[layer][others], before_c[layer][others])


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_gru_or_rnn_step_takes_no_c(cell: str) -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(8,), cell=cell), seed=0)
    h = [np.zeros((4, 8), np.float32)]
    with pytest.raises(ConfigError, match=f"1 h and 1 c arrays for 1 {cell.upper()} layers"):
        NativeStep(bundle.weights)(h, h, np.arange(2, dtype=np.int64), np.zeros((2, 1), np.float32))
    out = NativeStep(bundle.weights)(
        h, [], np.arange(2, dtype=np.int64), np.ones((2, 1), np.float32)
    )
    assert out.shape == (2, 1) and (h[0][:2] != 0).any() and (h[0][2:] == 0).all()


def test_native_step_refuses_state_that_is_not_contiguous_float32() -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(8,)), seed=0)
    step = NativeStep(bundle.weights)
    h = [np.zeros((4, 8), np.float64)]
    c = [np.zeros((4, 8), np.float32)]
    with pytest.raises(ConfigError, match="C-contiguous float32"):
        step(h, c, np.arange(2, dtype=np.int64), np.zeros((2, 1), np.float32))  # type: ignore[arg-type]


def test_engine_path_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(8,)), seed=0)
    assert not Engine(bundle, native=False).native
    monkeypatch.setenv("STREAMLSTM_NATIVE", "0")
    assert not native_available()
    assert not Engine(bundle).native
    with pytest.raises(ConfigError, match="native: the C kernels are not built"):
        Engine(bundle, native=True)

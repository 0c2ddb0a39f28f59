"""The C kernels' and the NumPy recurrent step against nn.LSTM, and how the engine picks a path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlstm import Bundle, ConfigError, Engine, ModelConfig
from streamlstm.kernels import NativeStep, native_available
from streamlstm.numpy_step import NumpyStep


def test_the_kernels_are_built_here() -> None:
    # pip builds them with the package; a silent build failure would leave every
    # other native test running on NumPy, so it fails here, loudly.
    assert native_available(), (
        "streamlstm._kernels is not built (or STREAMLSTM_NATIVE=0): "
        "reinstall with a C compiler, OpenMP and scipy-openblas32 (make clean test)"
    )


@pytest.mark.parametrize("step_kind", [NativeStep, NumpyStep])
@pytest.mark.parametrize(
    ("inputs", "hidden", "head"),
    [(1, (128, 128), (64,)), (3, (128, 64), ()), (2, (12, 12, 6), (16, 8)), (5, (7,), (20,))],
)
def test_the_step_equals_nn_lstm_and_its_head_and_updates_only_its_slots(
    step_kind: type[NativeStep] | type[NumpyStep],
    inputs: int,
    hidden: tuple[int, ...],
    head: tuple[int, ...],
) -> None:
    bundle = Bundle.random(
        ModelConfig(input_size=inputs, hidden_sizes=hidden, head_sizes=head, output_size=2),
        seed=3,
    )
    model = bundle.model
    rng = np.random.default_rng(0)
    capacity, n = 40, 17
    hs = [rng.standard_normal((capacity, size), dtype=np.float32) for size in hidden]
    cs = [rng.standard_normal((capacity, size), dtype=np.float32) * 3 for size in hidden]
    # Large inputs drive gates into saturation, where a careless sigmoid overflows.
    x = rng.standard_normal((n, inputs), dtype=np.float32) * 40
    slots = rng.permutation(capacity)[:n].astype(np.int64)
    before_h = [t.copy() for t in hs]
    before_c = [t.copy() for t in cs]
    with torch.inference_mode():
        want_top, want_h, want_c = model.recurrent_step(
            torch.from_numpy(x),
            [
                torch.stack([torch.from_numpy(hs[g.first + j][slots]) for j in range(g.count)])
                for g in model.groups
            ],
            [
                torch.stack([torch.from_numpy(cs[g.first + j][slots]) for j in range(g.count)])
                for g in model.groups
            ],
        )
        want_y = model.head(want_top).numpy()
    got = step_kind(bundle.weights)(hs, cs, slots, x).copy()
    np.testing.assert_allclose(got, want_y, atol=2e-6, rtol=0)
    others = np.setdiff1d(np.arange(capacity), slots)
    for g, group_h, group_c in zip(model.groups, want_h, want_c, strict=True):
        for j in range(g.count):
            layer = g.first + j
            np.testing.assert_allclose(hs[layer][slots], group_h[j].numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(cs[layer][slots], group_c[j].numpy(), atol=1e-5, rtol=1e-6)
            np.testing.assert_array_equal(hs[layer][others], before_h[layer][others])
            np.testing.assert_array_equal(cs[layer][others], before_c[layer][others])


def test_native_step_grows_its_buffers_and_takes_a_single_row() -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(16, 16)), seed=1)
    native = Engine(bundle, native=True)
    plain = Engine(bundle, native=False)
    rng = np.random.default_rng(1)
    for size in (1, 3, 700, 2, 1500, 1):
        ids = [f"s{i}" for i in rng.permutation(2000)[:size]]
        x = rng.normal(size=(size, 1)).astype(np.float32)
        np.testing.assert_allclose(
            native.step(ids, x).predictions, plain.step(ids, x).predictions, atol=1e-6, rtol=0
        )


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

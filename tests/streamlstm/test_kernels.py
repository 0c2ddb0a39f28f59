"""The C kernels' recurrent step against nn.LSTM, and how the engine picks a path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlstm import Bundle, ConfigError, Engine, ModelConfig
from streamlstm.kernels import NativeStep, native_available


def test_the_kernels_are_built_here() -> None:
    # pip builds them with the package; a silent build failure would leave every
    # other native test running on nn.LSTM, so it fails here, loudly.
    assert native_available(), (
        "streamlstm._kernels is not built (or STREAMLSTM_NATIVE=0): "
        "reinstall with a C compiler and OpenMP (make clean test)"
    )


@pytest.mark.parametrize(
    ("inputs", "hidden"),
    [(1, (128, 128)), (3, (128, 64)), (2, (12, 12, 6)), (5, (7,))],
)
def test_native_step_equals_nn_lstm_and_updates_only_its_slots(
    inputs: int, hidden: tuple[int, ...]
) -> None:
    model = Bundle.random(
        ModelConfig(input_size=inputs, hidden_sizes=hidden, head_sizes=(), output_size=1), seed=3
    ).model.eval()
    gen = torch.Generator().manual_seed(0)
    capacity, n = 40, 17
    hs = [torch.randn(capacity, size, generator=gen) for size in hidden]
    cs = [torch.randn(capacity, size, generator=gen) * 3 for size in hidden]
    # Large inputs drive gates into saturation, where a careless sigmoid overflows.
    x = torch.randn(n, inputs, generator=gen) * 40
    slots = np.random.default_rng(0).permutation(capacity)[:n].astype(np.int64)
    before_h = [t.clone() for t in hs]
    before_c = [t.clone() for t in cs]
    with torch.inference_mode():
        want_top, want_h, want_c = model.recurrent_step(
            x,
            [torch.stack([hs[g.first + j][slots] for j in range(g.count)]) for g in model.groups],
            [torch.stack([cs[g.first + j][slots] for j in range(g.count)]) for g in model.groups],
        )
        top = NativeStep(model)(hs, cs, slots, x).clone()
    torch.testing.assert_close(top, want_top, atol=1e-6, rtol=0)
    others = np.setdiff1d(np.arange(capacity), slots)
    for g, group_h, group_c in zip(model.groups, want_h, want_c, strict=True):
        for j in range(g.count):
            layer = g.first + j
            torch.testing.assert_close(hs[layer][slots], group_h[j], atol=1e-6, rtol=0)
            torch.testing.assert_close(cs[layer][slots], group_c[j], atol=1e-5, rtol=1e-6)
            assert torch.equal(hs[layer][others], before_h[layer][others])
            assert torch.equal(cs[layer][others], before_c[layer][others])


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


def test_engine_path_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, hidden_sizes=(8,)), seed=0)
    assert not Engine(bundle, native=False).native
    monkeypatch.setenv("STREAMLSTM_NATIVE", "0")
    assert not native_available()
    assert not Engine(bundle).native
    with pytest.raises(ConfigError, match="native: the C kernels are not built"):
        Engine(bundle, native=True)

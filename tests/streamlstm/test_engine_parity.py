"""Invariant 1: any interleaving, batch cuts and resets give the offline oracle's answers."""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlstm import Affine, Bundle, Engine, ModelConfig
from tests.streamlstm.oracle import expected_outputs

SHAPES = [
    ((8,), (), 1, 1),
    ((16, 16), (8,), 2, 1),
    ((12, 12, 6), (4, 4), 3, 2),
]


@cache
def bundle_for(shape: int, scaled: bool) -> Bundle:
    hidden, head, inputs, outputs = SHAPES[shape]
    cfg = ModelConfig(input_size=inputs, hidden_sizes=hidden, head_sizes=head, output_size=outputs)
    kwargs = {}
    if scaled:
        kwargs["input_scaler"] = Affine.from_min_max([-40.0] * inputs, [60.0] * inputs)
        kwargs["target_scaler"] = Affine.from_min_max([0.0] * outputs, [7.0] * outputs)
    return Bundle.random(cfg, seed=shape, warmup_steps=2, **kwargs)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    shape = draw(st.integers(0, len(SHAPES) - 1))
    streams = draw(st.integers(1, 7))
    n = draw(st.integers(1, 90))
    ids = [f"s{draw(st.integers(0, streams - 1))}" for _ in range(n)]
    resets = draw(
        st.lists(
            st.booleans().map(lambda b: b and draw(st.integers(0, 5)) == 0), min_size=n, max_size=n
        )
    )
    ends = [draw(st.integers(0, 9)) == 0 for _ in range(n)]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=8))))
    return {
        "shape": shape,
        "scaled": draw(st.booleans()),
        "ids": ids,
        "resets": resets,
        "ends": ends,
        "cuts": [c for c in cuts if 0 < c < n],
        "seed": draw(st.integers(0, 2**31)),
        "max_streams": draw(st.sampled_from([streams, streams + 3, 1000])),
        "native": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_engine_equals_oracle_for_any_interleaving(case: dict[str, object]) -> None:
    bundle = bundle_for(case["shape"], case["scaled"])
    ids: list[str] = case["ids"]  # type: ignore[assignment]
    resets: list[bool] = case["resets"]  # type: ignore[assignment]
    ends: list[bool] = case["ends"]  # type: ignore[assignment]
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    x = (rng.normal(size=(len(ids), bundle.config.input_size)) * 30).astype(np.float32)
    engine = Engine(
        bundle,
        max_streams=case["max_streams"],  # type: ignore[arg-type]
        initial_capacity=2,
        native=case["native"],  # type: ignore[arg-type]
    )
    bounds = [0, *case["cuts"], len(ids)]  # type: ignore[misc]
    preds, steps, ready = [], [], []
    for lo, hi in itertools.pairwise(bounds):
        out = engine.step(ids[lo:hi], x[lo:hi], resets=resets[lo:hi], ends=ends[lo:hi])
        assert out.accepted.all() and not out.evictions
        preds.append(out.predictions)
        steps.append(out.steps)
        ready.append(out.ready)
    want, want_steps = expected_outputs(bundle, ids, x, resets, ends)
    np.testing.assert_allclose(np.concatenate(preds), want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.concatenate(steps), want_steps)
    np.testing.assert_array_equal(np.concatenate(ready), want_steps > bundle.warmup_steps)
    assert len(engine.store) <= engine.store.max_streams


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "nn-lstm"])
def test_many_streams_large_batches_default_model(native: bool) -> None:
    bundle = Bundle.random(ModelConfig(input_size=1), seed=7)
    rng = np.random.default_rng(7)
    n = 6000
    ids = [f"stream-{i}" for i in rng.integers(0, 300, n)]
    x = rng.normal(size=(n, 1)).astype(np.float32)
    resets = rng.random(n) < 0.01
    engine = Engine(bundle, max_streams=300, native=native)
    got = []
    pos = 0
    while pos < n:
        size = int(rng.integers(1, 1500))
        got.append(
            engine.step(
                ids[pos : pos + size], x[pos : pos + size], resets=resets[pos : pos + size]
            ).predictions
        )
        pos += size
    want, _ = expected_outputs(bundle, ids, x, list(resets))
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5, rtol=0)

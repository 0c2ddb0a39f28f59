"""Invariant 1: any interleaving, batch cuts and resets give the offline oracle's answers,
for every cell (torch's own ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``), on both recurrent steps;
and so through LRU evictions, restores of evicted states and moves between engines."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import cache

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from streamlstm import Affine, Bundle, Engine, ModelConfig, StreamState
from streamlstm.config import CELLS
from streamlstm.stream_state import decode_many
from tests.streamlstm.oracle import expected_outputs

SHAPES = [
    ((8,), (), 1, 1),
    ((16, 16), (8,), 2, 1),
    ((12, 12, 6), (4, 4), 3, 2),
]


@cache
def bundle_for(shape: int, scaled: bool, cell: str = "lstm") -> Bundle:
    hidden, head, inputs, outputs = SHAPES[shape]
    cfg = ModelConfig(
        input_size=inputs, hidden_sizes=hidden, head_sizes=head, output_size=outputs, cell=cell
    )
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


@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_engine_equals_oracle_for_any_interleaving(cell: str, case: dict[str, object]) -> None:
    bundle = bundle_for(case["shape"], case["scaled"], cell)
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


@st.composite
def journeys(draw: st.DrawFn) -> dict[str, object]:
    """Ticks of a few streams in batches, a store too small for them all (LRU evictions),
    and between batches: nothing, the evicted states put back, or every held stream
    moved through its bytes into a fresh engine (on either step)."""
    streams = draw(st.integers(2, 8))
    n = draw(st.integers(1, 80))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=10))))
    cuts = [c for c in cuts if 0 < c < n]
    return {
        "shape": draw(st.integers(0, len(SHAPES) - 1)),
        "ids": [f"s{draw(st.integers(0, streams - 1))}" for _ in range(n)],
        "resets": [draw(st.integers(0, 7)) == 0 for _ in range(n)],
        "ends": [draw(st.integers(0, 11)) == 0 for _ in range(n)],
        "cuts": cuts,
        "between": draw(
            st.lists(
                st.sampled_from(["none", "restore", "move"]),
                min_size=len(cuts) + 1,
                max_size=len(cuts) + 1,
            )
        ),
        "max_streams": draw(st.integers(1, streams)),
        "natives": draw(st.lists(st.booleans(), min_size=len(cuts) + 2, max_size=len(cuts) + 2)),
        "seed": draw(st.integers(0, 2**31)),
    }


def _fitting(ids: list[str], lo: int, hi: int, room: int) -> Iterator[tuple[int, int]]:
    """``lo .. hi`` cut where a part would hold more than ``room`` distinct streams (a
    call may not need more new slots than the store has)."""
    start, seen = lo, set[str]()
    for i in range(lo, hi):
        if ids[i] not in seen and len(seen) == room:
            yield start, i
            start, seen = i, set()
        seen.add(ids[i])
    yield start, hi


def _through_bytes(states: dict[str, StreamState]) -> dict[str, StreamState]:
    return {s: StreamState.from_bytes(state.to_bytes()) for s, state in states.items()}


class _Journey:
    """An engine run through a journey, keeping what the oracle must know: a stream
    evicted (and not put back) since its last tick starts its next one from zero."""

    def __init__(self, bundle: Bundle, case: dict[str, object]) -> None:
        self.bundle, self.case = bundle, case
        self.room: int = case["max_streams"]  # type: ignore[assignment]
        self.natives: list[bool] = case["natives"]  # type: ignore[assignment]
        self.engine = self._engine(self.natives[0])
        self.evicted: dict[str, StreamState] = {}
        self.resets: list[bool] = list(case["resets"])  # type: ignore[call-overload]

    def _engine(self, native: bool) -> Engine:
        return Engine(self.bundle, max_streams=self.room, initial_capacity=1, native=native)

    def step(self, ids: list[str], x: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        ends: list[bool] = self.case["ends"]  # type: ignore[assignment]
        for i in range(lo, hi):
            if ids[i] in self.evicted:  # its state is gone: it starts again
                del self.evicted[ids[i]]
                self.resets[i] = True
        out = self.engine.step(ids[lo:hi], x[lo:hi], resets=self.resets[lo:hi], ends=ends[lo:hi])
        assert out.accepted.all()
        if out.evictions:
            event("evicted")
        self.evicted.update((e.stream_id, e.state) for e in out.evictions)
        return out.predictions, out.steps

    def between(self, action: str, native: bool) -> None:
        if action == "restore" and self.evicted:
            back = dict(itertools.islice(self.evicted.items(), self.room))
            event("evicted states put back")
            for stream in back:
                del self.evicted[stream]
            for e in self.engine.store.restore(_through_bytes(back)):
                self.evicted[e.stream_id] = e.state
        elif action == "move":
            event("moved" if self.engine.store.stream_ids() else "moved nothing")
            store = self.engine.store
            blobs = {s: st.to_bytes() for s, st in store.snapshot(store.stream_ids()).items()}
            self.engine = self._engine(native)
            assert not self.engine.store.restore_arrays(decode_many(blobs))


@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=100, deadline=None)
@given(journeys())
def test_engine_equals_oracle_through_evictions_restores_and_moves(
    cell: str, case: dict[str, object]
) -> None:
    bundle = bundle_for(case["shape"], False, cell)
    ids: list[str] = case["ids"]  # type: ignore[assignment]
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    x = (rng.normal(size=(len(ids), bundle.config.input_size)) * 3).astype(np.float32)
    journey = _Journey(bundle, case)
    preds = np.full((len(ids), bundle.config.output_size), np.nan, dtype=np.float32)
    steps = np.zeros(len(ids), dtype=np.int64)
    bounds = [0, *case["cuts"], len(ids)]  # type: ignore[misc]
    actions: list[str] = case["between"]  # type: ignore[assignment]
    for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        for a, b in _fitting(ids, lo, hi, journey.room):
            preds[a:b], steps[a:b] = journey.step(ids, x, a, b)
        journey.between(actions[k], journey.natives[k + 1])
    want, want_steps = expected_outputs(bundle, ids, x, journey.resets, case["ends"])  # type: ignore[arg-type]
    np.testing.assert_allclose(preds, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(steps, want_steps)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "numpy"])
def test_many_streams_large_batches_default_model(cell: str, native: bool) -> None:
    bundle = Bundle.random(ModelConfig(input_size=1, cell=cell), seed=7)
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

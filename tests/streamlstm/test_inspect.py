"""Looking at one stream (``Engine.inspect``) and listing the held ones (``StateStore.page``)."""

from __future__ import annotations

import json

import numpy as np

from streamlstm import Bundle, Engine, ModelConfig, OutputSpec, StateStore
from streamlstm.stream_state import StreamState


def _engine(**outputs: object) -> Engine:
    cfg = ModelConfig(input_size=2, hidden_sizes=(8, 4), output_size=1)
    spec = OutputSpec(**outputs) if outputs else None  # type: ignore[arg-type]
    return Engine(Bundle.random(cfg, seed=2, outputs=spec) if spec else Bundle.random(cfg, seed=2))


def test_a_held_stream_shows_its_position_its_last_answer_and_its_state() -> None:
    engine = _engine()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2))
    ids = ["a", "b", "a", "a", "b"]
    out = engine.step(ids, x, offsets=[10, 11, 12, 13, 14], partitions=[2] * 5,
                      timestamps=np.arange(5, dtype=np.float64) * 1000.0 + 1.7e12)  # fmt: skip
    view = engine.inspect("a", include_state=True)
    assert view is not None and view.stream == "a"
    assert (view.partition, view.offset, view.steps) == (2, 13, 3)
    assert view.prediction == (float(out.predictions[3, 0]),)
    assert view.last_seen_s == 1.7e9 + 3.0
    assert view.model == engine.bundle.model_id and view.ready
    assert view.score is None  # the model has no score
    # The state is the store's own snapshot of it.
    assert view.state is not None
    want = engine.store.snapshot(["a"])["a"]
    for got, expected in zip((*view.state.h, *view.state.c), (*want.h, *want.c), strict=True):
        np.testing.assert_array_equal(got, expected)
    again = engine.inspect("a")
    assert again is not None and again.state is None  # only when asked
    assert engine.inspect("nobody") is None
    body = view.to_json()
    assert body["last_seen_ms"] == 1.7e12 + 3000.0 and len(body["state"]["h"]) == 2


def test_the_last_answer_is_forgotten_by_a_reset_and_not_restored() -> None:
    engine = _engine()
    engine.step(["a"], np.ones((1, 2)), offsets=[0], partitions=[0])
    engine.control("a", "reset", offset=1, partition=0)
    view = engine.inspect("a")
    assert view is not None and view.prediction is None and view.steps == 0
    engine.step(["a"], np.ones((1, 2)), offsets=[2], partitions=[0])
    state = engine.store.snapshot(["a"])["a"]
    other = _engine()
    other.store.restore({"a": state})
    restored = other.inspect("a")
    assert restored is not None and restored.prediction is None and restored.steps == 1
    engine.store.restore({"a": state})  # over the stream held here
    again = engine.inspect("a")
    assert again is not None and again.prediction is None


def test_a_diverged_state_shows_as_null_not_as_nan() -> None:
    engine = _engine()
    engine.step(["a"], np.ones((1, 2)))
    engine.store.h[0][engine.store.slot_of("a")] = np.nan
    view = engine.inspect("a", include_state=True)
    assert view is not None
    body = view.to_json()
    assert body["state"]["h"][0][0] is None
    json.dumps(body, allow_nan=False)  # valid JSON


def test_a_scored_stream_shows_its_last_score() -> None:
    engine = _engine(target_feature=0, score_span=4)
    rng = np.random.default_rng(1)
    out = None
    for _ in range(30):
        out = engine.step(["s"], rng.normal(size=(1, 2)))
    assert out is not None and np.isfinite(out.scores[0])
    view = engine.inspect("s")
    assert view is not None and view.score == float(out.scores[0])


def test_pages_list_every_stream_held_throughout_exactly_once() -> None:
    store = StateStore((2,), max_streams=5000, initial_capacity=8)
    ids = [f"{'pump' if i % 3 else 'fan'}-{i}" for i in range(3000)]
    store.acquire(ids, np.zeros(len(ids)))
    store.release(ids[::7])  # holes among the slots
    held = set(ids) - set(ids[::7])
    seen: list[str] = []
    cursor, pages = 0, 0
    while cursor >= 0:
        page, cursor = store.page(prefix="pump", limit=100, cursor=cursor, max_scan=500)
        assert len(page) <= 100
        seen += page
        pages += 1
        if pages == 3:  # streams come and go between pages
            store.acquire(["pump-new"], np.zeros(1))
            store.release([seen[0]])
    assert len(seen) == len(set(seen))
    assert {s for s in held if s.startswith("pump")} - {seen[0]} <= set(seen)
    assert all(s.startswith("pump") for s in seen)
    assert pages > 3


def test_partition_counts_count_the_held_streams_by_partition() -> None:
    engine = _engine()
    engine.step(["a", "b", "c"], np.ones((3, 2)), offsets=[1, 2, 3], partitions=[0, 1, 1])
    engine.step(["d"], np.ones((1, 2)))  # no offsets: partition unknown
    assert engine.store.partition_counts() == {-1: 1, 0: 1, 1: 2}
    assert isinstance(engine.store.snapshot(["a"])["a"], StreamState)

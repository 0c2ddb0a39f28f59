"""``Engine.control``: reset and delete of one stream's state, in order, under the skip rule."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm import Bundle, Engine, InputError, ModelConfig


def _engine(changelog: bool = True) -> Engine:
    bundle = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(8,), output_size=1), seed=3)
    engine = Engine(bundle)
    engine.store.changes.tombstones = changelog
    return engine


X = np.random.default_rng(0).normal(0, 1, (12, 2)).astype(np.float32)


def test_a_reset_makes_the_next_tick_start_from_zero_and_is_applied_once() -> None:
    engine = _engine()
    bundle = engine.bundle
    engine.step(["s"] * 5, X[:5], offsets=range(5), partitions=[0] * 5)
    assert engine.control("s", "reset", offset=5, partition=0)
    state = engine.store.snapshot(["s"])["s"]
    assert (state.step, state.offset) == (0, 5) and not any(h.any() for h in state.h)
    after = engine.step(["s"] * 4, X[6:10], offsets=range(6, 10), partitions=[0] * 4)
    np.testing.assert_allclose(after.predictions, bundle.predict_sequence(X[6:10]), atol=1e-5)
    # Read again (a replay after a restore that reflects it): skipped, nothing changes.
    assert not engine.control("s", "reset", offset=5, partition=0)
    assert engine.store.snapshot(["s"])["s"].step == 4
    # The reset is in the next checkpoint: its state with the control's offset.
    changed, _, removed = engine.store.take_changes()
    assert changed == ["s"] and removed == {}


def test_a_delete_frees_the_stream_and_leaves_a_tombstone() -> None:
    engine = _engine()
    engine.step(["s", "t"], X[:2], offsets=[0, 1], partitions=[2, 2])
    engine.store.take_changes()
    assert engine.control("s", "delete", offset=2, partition=2)
    assert "s" not in engine.store and "t" in engine.store
    assert engine.store.take_changes() == ([], [], {"s": 2})
    # A later tick starts it from zero.
    out = engine.step(["s"], X[3:4], offsets=[3], partitions=[2])
    np.testing.assert_allclose(out.predictions, engine.bundle.predict_sequence(X[3:4]), atol=1e-5)
    # A control of a stream not held changes nothing (a replay of a delete, say).
    assert engine.control("nobody", "delete", offset=9, partition=2)
    assert engine.control("nobody", "reset", offset=9, partition=2)
    assert "nobody" not in engine.store


def test_a_control_of_another_partition_or_a_later_offset_is_applied() -> None:
    engine = _engine()
    engine.step(["s"] * 3, X[:3], offsets=[10, 11, 12], partitions=[1] * 3)
    assert not engine.control("s", "reset", offset=12, partition=1)
    assert engine.control("s", "reset", offset=4, partition=0)  # moved: another partition's


def test_an_unknown_control_is_refused_by_name() -> None:
    with pytest.raises(InputError, match="control"):
        _engine().control("s", "pause")

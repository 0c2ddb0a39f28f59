"""Invariant 3 in the engine: a tick its stream's state already reflects is skipped, no other."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm import Engine, StreamState
from tests.conftest import BundleFactory
from tests.streamlstm.oracle import expected_outputs


def test_a_replay_after_a_restore_skips_exactly_the_ticks_the_state_reflects(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    rng = np.random.default_rng(0)
    ids = [f"s{i % 3}" for i in range(30)]
    x = rng.normal(size=(30, 2))
    offsets = np.arange(100, 130)
    live = Engine(bundle)
    first = live.step(ids[:18], x[:18], offsets=offsets[:18], partitions=[2] * 18)
    checkpoint = {s: st.to_bytes() for s, st in live.store.snapshot({"s0", "s1", "s2"}).items()}
    rest = live.step(ids[18:], x[18:], offsets=offsets[18:], partitions=[2] * 12)
    # A new instance restores the checkpoint, then reads again from an older commit (tick 9).
    restored = Engine(bundle)
    restored.store.restore({s: StreamState.from_bytes(b) for s, b in checkpoint.items()})
    again = restored.step(ids[9:], x[9:], offsets=offsets[9:], partitions=[2] * 21)
    assert again.skipped.tolist() == [True] * 9 + [False] * 12
    assert again.accepted.tolist() == [False] * 9 + [True] * 12
    assert not again.rejections
    np.testing.assert_allclose(again.predictions[9:], rest.predictions, atol=1e-6)
    np.testing.assert_array_equal(again.steps[9:], rest.steps)
    assert restored.stats.skipped == 9 and restored.stats.ticks == 12
    want, _ = expected_outputs(bundle, ids, x.astype(np.float32))
    np.testing.assert_allclose(first.predictions, want[:18], atol=1e-5)
    np.testing.assert_allclose(again.predictions[9:], want[18:], atol=1e-5)


def test_only_the_same_partition_and_only_with_offsets(make_bundle: BundleFactory) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    engine = Engine(bundle)
    x = np.ones((1, 2))
    engine.step(["a"], x, offsets=[50], partitions=[1])
    # The same offset from another partition is another tick: applied.
    other = engine.step(["a"], x, offsets=[50], partitions=[0])
    assert other.accepted.tolist() == [True] and not other.skipped.size
    # Now the state reflects partition 0's offset 50: a repeat is skipped, the next is not.
    again = engine.step(["a", "a"], np.ones((2, 2)), offsets=[50, 51], partitions=[0, 0])
    assert again.skipped.tolist() == [True, False]
    assert again.steps.tolist() == [0, 3]
    # Without offsets nothing is ever skipped.
    plain = engine.step(["a"], x)
    assert plain.accepted.tolist() == [True] and not plain.skipped.size


@pytest.mark.parametrize("seed", range(5))
def test_any_checkpoint_and_any_replay_point_give_the_oracle(
    make_bundle: BundleFactory, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    bundle = make_bundle(input_size=2, output_size=1, seed=seed)
    n = 60
    ids = [f"s{int(i)}" for i in rng.integers(0, 5, n)]
    x = rng.normal(size=(n, 2)).astype(np.float32)
    offsets = np.arange(n)
    want, _ = expected_outputs(bundle, ids, x)
    cut = int(rng.integers(1, n))  # the checkpoint reflects ticks [0, cut)
    replay = int(rng.integers(0, cut + 1))  # the last commit: read again from here
    live = Engine(bundle)
    for lo in range(0, cut, 7):
        hi = min(cut, lo + 7)
        live.step(ids[lo:hi], x[lo:hi], offsets=offsets[lo:hi])
    states = live.store.snapshot(set(ids[:cut]))
    restored = Engine(bundle)
    restored.store.restore({s: StreamState.from_bytes(st.to_bytes()) for s, st in states.items()})
    out = restored.step(ids[replay:], x[replay:], offsets=offsets[replay:])
    applied = ~out.skipped if out.skipped.size else np.ones(n - replay, dtype=bool)
    assert applied.tolist() == [i >= cut for i in range(replay, n)]
    np.testing.assert_allclose(out.predictions[applied], want[cut:], atol=1e-5)

"""The engine with a cold tier: streams evicted for room continue exactly when they return.

Real RocksDB directories under tmp_path; the oracle is ``predict_sequence``
(torch's own module) over each stream's whole history, never the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from streamlstm import Engine, StreamState
from streamlstm.cold_tier import ColdConfig, ColdTier
from streamlstm.kernels import native_available
from tests.conftest import BundleFactory
from tests.streamlstm.oracle import expected_outputs

NATIVE = [False, True] if native_available() else [False]


def _x(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, 2)) * 3).astype(np.float32)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_streams_moved_to_disk_and_back_continue_on_the_oracle(
    make_bundle: BundleFactory, tmp_path: Path, cell: str, native: bool
) -> None:
    """40 streams through room for 10, in polls of 1 to 9 ticks over two partitions: every
    stream goes to disk and comes back many times, and every answer, over its whole
    history, is the oracle's. Nothing is dropped, so nothing is an eviction."""
    bundle = make_bundle(scaled=True, cell=cell)
    rng = np.random.default_rng(7)
    n = 600
    ids = [f"s{i}" for i in rng.integers(0, 40, n)]
    parts = [int(s[1:]) % 2 for s in ids]
    x = _x(n, seed=1)
    engine = Engine(bundle, max_streams=10, native=native, cold=ColdConfig(directory=tmp_path))
    got = np.full((n, bundle.config.output_size), np.nan, np.float32)
    steps = np.zeros(n, np.int64)
    lo = 0
    while lo < n:
        hi = min(n, lo + int(rng.integers(1, 10)))
        out = engine.step(ids[lo:hi], x[lo:hi], offsets=range(lo, hi), partitions=parts[lo:hi])
        assert not out.evictions and out.accepted.all()
        got[lo:hi], steps[lo:hi] = out.predictions, out.steps
        lo = hi
    want, want_steps = expected_outputs(bundle, ids, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(steps, want_steps)
    cold = engine.stats.cold
    assert cold is not None
    assert cold.writes > 100 and cold.hits > 100 and cold.refused == 0
    assert cold.streams + len(engine.store) == 40
    assert set(cold.partitions) == {0, 1}
    assert engine.stats.evictions == {}
    engine.close()


def test_returning_streams_are_read_in_one_batched_read_per_partition(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    engine = Engine(make_bundle(), max_streams=10, cold=ColdConfig(directory=tmp_path))
    first = [f"a{i}" for i in range(10)]
    engine.step(first, _x(10))
    engine.step([f"b{i}" for i in range(10)], _x(10, 1), ends=[True] * 10)  # a* to disk
    assert engine.store.cold is not None
    store = engine.store.cold.store(-1)
    before = store.counts.multi_gets
    # Five returning streams, three ticks each, with room in memory (the b* ended).
    back = first[:5] * 3
    out = engine.step(back, _x(15, 2))
    assert store.counts.multi_gets == before + 1
    assert out.steps.tolist() == [2] * 5 + [3] * 5 + [4] * 5
    assert store.count == 5
    # New streams cost the one read too (a miss); held ones none.
    engine.step(["new1", "new2", *first[:5]], _x(7, 3))
    assert store.counts.multi_gets == before + 2
    engine.step(first[:5], _x(5, 4))
    assert store.counts.multi_gets == before + 2
    engine.close()


def test_a_returning_stream_pushes_out_an_older_one_not_one_of_its_batch(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """Loading a cold stream makes room by moving the least recently used to disk, never
    one of the streams the step holds."""
    bundle = make_bundle()
    engine = Engine(bundle, max_streams=3, cold=ColdConfig(directory=tmp_path))
    x = _x(8)
    engine.step(["a", "b", "c"], x[:3])
    engine.step(["d"], x[3:4])  # a (least recently used) to disk
    out = engine.step(["b", "c", "a"], x[4:7])  # a back: d moves out, not b or c
    assert sorted(engine.store.stream_ids()) == ["a", "b", "c"]
    want, _ = expected_outputs(bundle, ["a", "b", "c", "d", "b", "c", "a"], x[:7])
    np.testing.assert_allclose(out.predictions, want[4:7], atol=1e-5, rtol=0)


def test_the_skip_rule_holds_for_a_stream_read_back(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    engine = Engine(make_bundle(), max_streams=1, cold=ColdConfig(directory=tmp_path))
    engine.step(["a"], _x(1), offsets=[10], partitions=[0])
    engine.step(["b"], _x(1), offsets=[11], partitions=[0])  # a to disk, offset 10 with it
    out = engine.step(["a", "a"], _x(2), offsets=[10, 12], partitions=[0, 0])
    assert out.skipped.tolist() == [True, False] and out.steps.tolist() == [0, 2]


def test_idle_expiry_forgets_streams_on_disk(make_bundle: BundleFactory, tmp_path: Path) -> None:
    bundle = make_bundle()
    engine = Engine(bundle, max_streams=2, idle_ttl_s=10, cold=ColdConfig(directory=tmp_path))
    engine.store.changes.tombstones = True  # as a checkpointing daemon's
    x = _x(6)
    engine.step(["a", "b"], x[:2], timestamps=[0, 0], offsets=[0, 1], partitions=[0, 0])
    # a and b to disk:
    engine.step(["c", "d"], x[2:4], timestamps=[5_000, 5_000], offsets=[2, 3], partitions=[0, 0])
    assert engine.stats.cold is not None and engine.stats.cold.streams == 2
    out = engine.step(["c", "d"], x[4:6], timestamps=[15_000, 15_000])  # a, b idle 15 s
    assert sorted((e.stream_id, e.reason) for e in out.evictions) == [("a", "ttl"), ("b", "ttl")]
    assert out.evictions[0].state.step == 1
    assert engine.stats.cold.streams == 0 and engine.stats.cold.expired == 2
    assert engine.stats.evictions == {"ttl": 2}
    _, _, removed = engine.store.take_changes()
    assert removed == {"a": 0, "b": 0}  # their changelog records go
    assert engine.store.changes.take_moved() == {}
    # A stream that comes back after its TTL, before a sweep, starts from zero.
    engine.step(["e", "f"], x[:2], timestamps=[16_000, 16_000])  # c, d to disk
    late = engine.step(["c"], x[2:3], timestamps=[40_000])
    assert late.steps.tolist() == [1]
    np.testing.assert_allclose(late.predictions, bundle.predict_sequence(x[2:3]), atol=1e-5)


def test_the_disk_bound_drops_the_oldest_as_an_eviction(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle()
    cold = ColdConfig(directory=tmp_path, max_disk_streams=2)
    engine = Engine(bundle, max_streams=1, cold=cold)
    x = _x(5)
    engine.step(["a"], x[:1])
    engine.step(["b"], x[1:2])
    engine.step(["c"], x[2:3])  # a, b on disk
    out = engine.step(["d"], x[3:4])  # c to disk: a, the oldest there, is dropped
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("a", "lru")]
    assert out.evictions[0].state.step == 1
    assert engine.stats.evictions == {"lru": 1}
    again = engine.step(["a"], x[4:5])  # gone: starts from zero
    assert again.steps.tolist() == [1]
    np.testing.assert_allclose(again.predictions, bundle.predict_sequence(x[4:5]), atol=1e-5)


def test_a_state_of_another_model_or_corrupt_is_refused(
    make_bundle: BundleFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = make_bundle(seed=1), make_bundle(seed=2)
    assert old.model_id != new.model_id
    first = Engine(old, max_streams=1, cold=ColdConfig(directory=tmp_path))
    first.step(["a"], _x(1))
    first.step(["b"], _x(1, 1))  # a to disk, written by the old model
    first.close()
    engine = Engine(new, max_streams=4, cold=ColdConfig(directory=tmp_path, keep=True))
    assert engine.store.cold is not None
    engine.store.cold.store(-1).put_many(["z"], [b"SLST\x05garbage"], [0.0])
    x = _x(2, 2)
    with caplog.at_level(logging.WARNING, logger="streamlstm.store"):
        out = engine.step(["a", "z"], x)
    assert out.steps.tolist() == [1, 1]  # both start from zero under the new model
    np.testing.assert_allclose(out.predictions[:1], new.predict_sequence(x[:1]), atol=1e-5)
    assert engine.stats.cold is not None and engine.stats.cold.refused == 2
    assert f"made by model {old.model_id!r}" in caplog.text
    assert "'z'" in caplog.text and "corrupt" in caplog.text
    assert engine.stats.cold.streams == 0


def test_changelog_semantics_of_a_move(make_bundle: BundleFactory, tmp_path: Path) -> None:
    """A stream moved to disk leaves no tombstone; a state the changelog lacks (changed
    since the last checkpoint) waits for the next one, and returns marked changed."""
    engine = Engine(make_bundle(), max_streams=1, cold=ColdConfig(directory=tmp_path))
    store = engine.store
    store.changes.tombstones = True
    engine.step(["a"], _x(1), offsets=[0], partitions=[4])
    engine.step(["b"], _x(1), offsets=[1], partitions=[4])  # a to disk before a checkpoint
    live, _, removed = store.take_changes()
    moved = store.changes.take_moved()
    assert live == ["b"] and removed == {}
    assert list(moved) == ["a"] and moved["a"][0] == 4
    state = StreamState.from_bytes(moved["a"][1])
    assert (state.step, state.offset, state.partition) == (1, 0, 4)
    assert state.model == engine.bundle.model_id
    # After that checkpoint, a move of a stream unchanged since writes nothing.
    engine.step(["a"], _x(1), offsets=[2], partitions=[4])  # a back; b to disk, unchanged
    assert store.take_changes()[0] == ["a"] and store.changes.take_moved() == {}
    engine.step(["a"], _x(1), offsets=[3], partitions=[4])  # a changed
    engine.step(["b"], _x(1), offsets=[4], partitions=[4])  # b back; a to disk, changed
    assert list(store.changes.moved) == ["a"]
    # Back before the checkpoint that would have written its move: marked changed again.
    engine.step(["a"], _x(1), offsets=[5], partitions=[4])  # a back; b to disk, changed
    live, _, removed = store.take_changes()
    assert live == ["a"] and removed == {} and list(store.changes.take_moved()) == ["b"]


def test_a_control_reaches_a_stream_on_disk(make_bundle: BundleFactory, tmp_path: Path) -> None:
    engine = Engine(make_bundle(), max_streams=1, cold=ColdConfig(directory=tmp_path))
    engine.store.changes.tombstones = True
    engine.step(["a"], _x(1), offsets=[0], partitions=[0])
    engine.step(["b"], _x(1), offsets=[1], partitions=[0])  # a to disk
    assert engine.control("a", "delete", offset=2, partition=0)
    assert "a" not in engine.store
    assert engine.stats.cold is not None and engine.stats.cold.streams == 1  # b now
    _, _, removed = engine.store.take_changes()
    assert removed == {"a": 0}
    assert engine.step(["a"], _x(1), offsets=[3], partitions=[0]).steps.tolist() == [1]


def test_a_call_refused_for_room_leaves_its_streams_on_disk(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle()
    engine = Engine(bundle, max_streams=2, cold=ColdConfig(directory=tmp_path))
    x = _x(6)
    engine.step(["a", "b"], x[:2])
    engine.step(["c", "d"], x[2:4])  # a, b to disk
    with pytest.raises(Exception, match="max_streams"):
        engine.step(["c", "d", "a", "b"], _x(4, 1))  # four streams, room for two
    assert engine.stats.cold is not None and engine.stats.cold.streams == 2
    out = engine.step(["a"], x[4:5])
    want, _ = expected_outputs(bundle, ["a", "a"], x[[0, 4]])
    assert out.steps.tolist() == [2]
    np.testing.assert_allclose(out.predictions, want[1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_rewarm_swap_rewarms_the_streams_on_disk_when_they_return(
    make_bundle: BundleFactory, tmp_path: Path, cell: str
) -> None:
    """After a live swap with ``rewarm``, a stream that was on disk answers, when it
    returns, as the new model run from zero state over its last K ticks before the swap,
    then its ticks since (torch's own module): as the swap re-warmed those in memory."""
    old = make_bundle(scaled=True, seed=1)
    new = make_bundle(scaled=True, seed=2, cell=cell, hidden_sizes=(8, 4))
    ticks, rng = 5, np.random.default_rng(12)
    engine = Engine(old, max_streams=6, history_ticks=ticks, cold=ColdConfig(directory=tmp_path))
    ids1 = [f"s{i}" for i in rng.integers(0, 12, 60)]
    ids2 = [f"s{i}" for i in rng.integers(0, 12, 60)]
    x1, x2 = _x(60, seed=3), _x(60, seed=4)
    for lo in range(0, 60, 3):
        engine.step(ids1[lo : lo + 3], x1[lo : lo + 3])
    on_disk = engine.stats.cold
    assert on_disk is not None and on_disk.streams == len(set(ids1)) - len(engine.store)
    engine.swap_model(new, mode="rewarm")
    got = np.concatenate(
        [engine.step(ids2[lo : lo + 3], x2[lo : lo + 3]).predictions for lo in range(0, 60, 3)]
    )
    for stream in sorted(set(ids2)):
        before = x1[[i for i, s in enumerate(ids1) if s == stream]][-ticks:]
        mine = [i for i, s in enumerate(ids2) if s == stream]
        want = new.predict_sequence(np.concatenate([before, x2[mine]]))[len(before) :]
        np.testing.assert_allclose(got[mine], want, atol=1e-5, err_msg=stream)
    cold = engine.stats.cold
    assert cold is not None and cold.hits > on_disk.hits and cold.refused == 0
    engine.close()


def test_the_disk_bound_holds_for_all_partitions_together_oldest_out_first(
    tmp_path: Path,
) -> None:
    """``max_disk_streams`` bounds the instance's states on disk, whatever their
    partitions: the one seen longest ago goes, from whichever partition holds it."""
    tier = ColdTier(ColdConfig(directory=tmp_path, max_disk_streams=3))
    assert tier.put(["a", "b", "c"], [0, 1, 0], [b"A", b"B", b"C"], [1.0, 2.0, 3.0]) == []
    assert tier.put(["d"], [1], [b"D"], [4.0]) == [("a", 0, b"A")]
    assert tier.put(["e", "f"], [0, 0], [b"E", b"F"], [5.0, 6.0]) == [
        ("b", 1, b"B"),
        ("c", 0, b"C"),
    ]
    stats = tier.stats()
    assert (stats.streams, stats.pushed_out, stats.partitions) == (3, 3, {0: 2, 1: 1})
    tier.close()

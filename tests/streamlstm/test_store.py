"""State store: bounded memory, LRU and TTL eviction, snapshot and restore."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm import Engine, StateError, StateStore, StreamState
from tests.conftest import BundleFactory
from tests.streamlstm.oracle import expected_outputs


def _x(n: int, width: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def test_capacity_doubles_up_to_max_streams() -> None:
    store = StateStore((4, 4), max_streams=10, initial_capacity=2)
    seen = []
    for i in range(10):
        store.acquire([f"s{i}"], np.zeros(1))
        seen.append(store.capacity)
    assert seen == [2, 2, 4, 4, 8, 8, 8, 8, 10, 10]
    assert len(store) == 10


def test_lru_evicts_the_least_recently_used_and_reports_it(make_bundle: BundleFactory) -> None:
    bundle = make_bundle()
    engine = Engine(bundle, max_streams=3)
    engine.step(["a", "b", "c"], _x(3))
    engine.step(["a"], _x(1, seed=1))  # b is now the least recently used
    out = engine.step(["d"], _x(1, seed=2))
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("b", "lru")]
    assert out.evictions[0].state.step == 1
    assert "b" not in engine.store and len(engine.store) == 3
    assert engine.stats.evictions == {"lru": 1}
    # An evicted stream that returns starts again from zero state.
    again = engine.step(["b"], _x(1, seed=3))
    np.testing.assert_allclose(again.predictions, bundle.predict_sequence(_x(1, seed=3)), atol=1e-6)
    assert again.steps.tolist() == [1]


def test_streams_in_the_current_batch_are_never_evicted(make_bundle: BundleFactory) -> None:
    engine = Engine(make_bundle(), max_streams=4)
    engine.step(["a", "b", "c", "d"], _x(4))
    out = engine.step(["a", "b", "e", "f"], _x(4, seed=1))
    assert sorted(e.stream_id for e in out.evictions) == ["c", "d"]


def test_a_batch_with_more_new_streams_than_the_bound_is_refused(
    make_bundle: BundleFactory,
) -> None:
    engine = Engine(make_bundle(), max_streams=2)
    with pytest.raises(Exception, match="max_streams"):
        engine.step(["a", "b", "c"], _x(3))


def test_ttl_on_event_time(make_bundle: BundleFactory) -> None:
    bundle = make_bundle()
    engine = Engine(bundle, max_streams=100, idle_ttl_s=10)
    x = _x(4)
    engine.step(["a", "b"], x[:2], timestamps=[0, 0])
    out = engine.step(["a"], x[2:3], timestamps=[9_000])  # 9 s: still alive
    assert out.steps.tolist() == [2] and not out.evictions
    out = engine.step(["a"], x[3:4], timestamps=[15_000])  # b idle 15 s: swept
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("b", "ttl")]
    assert out.steps.tolist() == [3]
    assert "b" not in engine.store
    # a was idle 45 s before its tick: it expires and restarts from zero.
    later = engine.step(["a"], x[:1], timestamps=[60_000])
    assert [(e.stream_id, e.reason) for e in later.evictions] == [("a", "ttl")]
    assert later.steps.tolist() == [1]
    np.testing.assert_allclose(later.predictions, bundle.predict_sequence(x[:1]), atol=1e-6)


def test_ttl_on_the_clock_without_timestamps(make_bundle: BundleFactory) -> None:
    now = [1000.0]
    engine = Engine(make_bundle(), max_streams=100, idle_ttl_s=5, clock=lambda: now[0])
    engine.step(["a", "b"], _x(2))
    now[0] += 3
    engine.step(["a"], _x(1))
    now[0] += 4  # b idle 7 s, a idle 4 s
    out = engine.step(["c"], _x(1))
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("b", "ttl")]
    assert set(engine.store.stream_ids()) == {"a", "c"}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_snapshot_restore_continues_exactly(make_bundle: BundleFactory, cell: str) -> None:
    bundle = make_bundle(scaled=True, cell=cell)
    rng = np.random.default_rng(5)
    ids = [f"s{i}" for i in rng.integers(0, 6, 80)]
    x = (rng.normal(size=(80, 2)) * 10).astype(np.float32)
    whole = Engine(bundle).step(ids, x).predictions

    first = Engine(bundle)
    part1 = first.step(ids[:50], x[:50], offsets=list(range(50))).predictions
    blobs = {s: st.to_bytes() for s, st in first.store.snapshot(set(ids[:50])).items()}
    second = Engine(bundle)
    second.store.restore({s: StreamState.from_bytes(b) for s, b in blobs.items()})
    assert {s: second.store.offsets[second.store.slot_of(s)] for s in blobs} == {
        s: max(i for i in range(50) if ids[i] == s) for s in blobs
    }
    part2 = second.step(ids[50:], x[50:]).predictions
    np.testing.assert_array_equal(np.concatenate([part1, part2]), whole)
    want, _ = expected_outputs(bundle, ids, x)
    np.testing.assert_allclose(whole, want, atol=1e-5, rtol=0)
    # Into an engine of another cell (same layer sizes): refused, and nothing taken.
    other = Engine(make_bundle(scaled=True, cell="rnn" if cell == "gru" else "gru"))
    with pytest.raises(StateError, match=f"states are of a {cell.upper()} model"):
        other.store.restore({s: StreamState.from_bytes(b) for s, b in blobs.items()})
    assert len(other.store) == 0


def test_state_bytes_round_trip_and_corruption() -> None:
    state = StreamState(
        h=(np.arange(4, dtype=np.float32), np.ones(2, np.float32)),
        c=(np.full(4, 2.0, np.float32), np.zeros(2, np.float32)),
        step=17,
        offset=1234,
        last_seen=99.5,
    )
    back = StreamState.from_bytes(state.to_bytes())
    assert (back.step, back.offset, back.last_seen) == (17, 1234, 99.5)
    for a, b in zip(back.h + back.c, state.h + state.c, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StateError, match=r"truncated|expected"):
        StreamState.from_bytes(state.to_bytes()[:-3])
    with pytest.raises(StateError, match="magic"):
        StreamState.from_bytes(b"XXXX" + state.to_bytes()[4:])
    store = StateStore((4, 4), max_streams=5)
    with pytest.raises(StateError, match="layer sizes"):
        store.restore({"a": back})


def test_state_bytes_carry_partition_model_and_extra_and_older_versions_still_read() -> None:
    state = StreamState(
        h=(np.arange(3, dtype=np.float32),),
        c=(np.full(3, -1.5, np.float32),),
        step=5,
        offset=77,
        last_seen=1.0,
        extra=(0.25, 4.0, -2.0),
        partition=3,
        model="m-1a2bé",
    )
    data = state.to_bytes()
    assert data[4] == 5  # the format version, right after the magic
    assert data[30] == 0  # the cell (LSTM), after the 30-byte header
    back = StreamState.from_bytes(data)
    assert (back.partition, back.model, back.extra) == (3, "m-1a2bé", (0.25, 4.0, -2.0))
    # Version 3 (no cell byte), as an older daemon wrote it: read, as an LSTM's.
    data = data[:-4]  # version 5's empty history (K = F = 0): older versions have none
    v3 = data[:4] + bytes([3]) + data[5:30] + data[31:]
    old3 = StreamState.from_bytes(v3)
    assert (old3.cell, old3.partition, old3.model) == ("lstm", 3, "m-1a2bé")
    np.testing.assert_array_equal(old3.c[0], state.c[0])
    # Version 2 (no partition, no model): still read.
    tail = 6 + len("m-1a2bé".encode())
    v2 = data[:4] + bytes([2]) + data[5:30] + data[31:-tail]
    old = StreamState.from_bytes(v2)
    assert (old.partition, old.model, old.extra, old.offset) == (-1, "", (0.25, 4.0, -2.0), 77)
    with pytest.raises(StateError):
        StreamState.from_bytes(data[:-1])


@pytest.mark.parametrize(("cell", "raw"), [("lstm", 2048), ("gru", 1024), ("rnn", 1024)])
def test_memory_is_near_the_raw_state_size(cell: str, raw: int) -> None:
    # A GRU or RNN stream keeps h alone: half an LSTM's bytes, no c columns at all.
    store = StateStore((128, 128), cell=cell, max_streams=8192, initial_capacity=4096)
    store.acquire([f"stream-{i}" for i in range(4096)], np.zeros(4096))
    per_stream = store.memory_bytes() / len(store)
    assert store.raw_bytes_per_stream() == raw
    assert len(store.c) == (2 if cell == "lstm" else 0)
    assert per_stream < raw + 0.25 * 2048
    store.reserve(8000)  # grown, still without c
    assert store.capacity == 8192 and len(store.c) == (2 if cell == "lstm" else 0)

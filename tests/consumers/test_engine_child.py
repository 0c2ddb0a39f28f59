"""The engine child's checkpoint and restore, in process: what is written, what is loaded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from streamlstm import Bundle, Engine, StreamState
from streamlstm.consumers.engine.child import EngineHost
from tests.conftest import BundleFactory
from tests.helpers.engine_requests import step_request as _request


def test_a_checkpoint_holds_the_changed_streams_and_tombstones_once(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    child = EngineHost(Engine(bundle))
    x = np.ones((3, 2))
    child.step(_request(["a", "b", "c"], x, [0, 1, 2], part=3))
    records = {s: (p, v) for s, p, v in child.checkpoint()}
    assert set(records) == {"a", "b", "c"} and {p for p, _ in records.values()} == {3}
    state = StreamState.from_bytes(records["b"][1] or b"")
    assert (state.partition, state.offset, state.step, state.model) == (3, 1, 1, bundle.model_id)
    assert child.checkpoint() == []  # nothing changed since
    child.step(_request(["a", "b"], x[:2], [3, 4], part=3, ends=[False, True]))
    records = {s: (p, v) for s, p, v in child.checkpoint()}
    assert records["b"] == (3, None)  # ended: a tombstone in its partition
    assert records["a"][1] is not None and "c" not in records


def test_restored_streams_continue_as_if_never_moved(make_bundle: BundleFactory) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    rng = np.random.default_rng(1)
    ids = [f"s{i % 6}" for i in range(24)]
    x = rng.normal(size=(24, 2))
    first = EngineHost(Engine(bundle))
    first.step(_request(ids[:12], x[:12], list(range(12)), part=1))
    blobs = {s: v for s, _, v in first.checkpoint() if v is not None}
    rest = first.step(_request(ids[12:], x[12:], list(range(12, 24)), part=1)).result
    second = EngineHost(Engine(bundle))
    report = second.restore(1, blobs, "reset")
    assert (report.loaded, report.reset_model_changed, report.corrupt) == (6, 0, 0)
    # The last commit was earlier than the checkpoint: ticks 8..11 are read again.
    again = second.step(_request(ids[8:], x[8:], list(range(8, 24)), part=1)).result
    assert again.skipped.tolist() == [True] * 4 + [False] * 12
    np.testing.assert_allclose(again.predictions[4:], rest.predictions, atol=1e-6)
    assert second.partition_of == dict.fromkeys(blobs, 1)


def test_states_of_another_model_follow_the_policy_and_corrupt_ones_are_counted(
    make_bundle: BundleFactory,
) -> None:
    old = make_bundle(input_size=2, output_size=1, seed=1)
    new = make_bundle(input_size=2, output_size=1, seed=2)
    other_shape = make_bundle(input_size=2, output_size=1, hidden_sizes=(4,), seed=3)
    assert old.model_id != new.model_id
    writer = EngineHost(Engine(old))
    writer.step(_request(["a", "b"], np.ones((2, 2)), [0, 1], part=0))
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    assert EngineHost(Engine(new)).restore(0, blobs, "reset").reset_model_changed == 2
    kept = EngineHost(Engine(new)).restore(0, blobs, "carry")
    assert (kept.loaded, kept.kept_model_changed) == (2, 2)
    shaped = EngineHost(Engine(other_shape)).restore(0, blobs, "carry")
    assert (shaped.loaded, shaped.reset_model_changed) == (0, 2)
    # auto: a retrain (the same bundle name, the same layer sizes) carries; another resets.
    retrain = Bundle(config=new.config, weights=new.weights, name=old.name)
    carried = EngineHost(Engine(retrain)).restore(0, blobs, "auto")
    assert (carried.loaded, carried.kept_model_changed) == (2, 2)
    assert EngineHost(Engine(new)).restore(0, blobs, "auto").reset_model_changed == 2
    broken = {**blobs, "c": b"SLST\x03 not a state"}
    report = EngineHost(Engine(old)).restore(0, broken, "reset")
    assert (report.loaded, report.corrupt) == (2, 1)


def test_states_of_another_cell_always_start_again(make_bundle: BundleFactory) -> None:
    # Same layer sizes, another cell: a GRU's h means nothing to an LSTM, whatever the
    # policy, and a state without a model name is no exception (as a table, one by one).
    lstm = make_bundle(input_size=2, output_size=1, seed=1)
    gru = make_bundle(input_size=2, output_size=1, seed=1, cell="gru")
    writer = EngineHost(Engine(gru))
    writer.step(_request(["a", "b"], np.ones((2, 2)), [0, 1], part=0))
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    unnamed = {s: replace(StreamState.from_bytes(v), model="").to_bytes() for s, v in blobs.items()}
    for states in (blobs, unnamed, {**unnamed, "x": b"SLST\x03 not a state"}):
        report = EngineHost(Engine(lstm)).restore(0, states, "keep-if-compatible")
        assert (report.loaded, report.reset_model_changed) == (0, 2)
    host = EngineHost(Engine(gru))
    assert host.restore(0, unnamed, "reset").loaded == 2  # its own cell: loaded
    assert host.engine.store.c == []


def test_a_restore_over_max_streams_keeps_the_most_recently_seen(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    writer = EngineHost(Engine(bundle))
    ids = [f"s{i}" for i in range(8)]
    for i, stream in enumerate(ids):  # s7 is seen last
        request = _request([stream], np.ones((1, 2)), [i], part=0)
        request.timestamps[:] = 1.7e12 + 1000 * i
        writer.step(request)
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    small = EngineHost(Engine(bundle, max_streams=5))
    report = small.restore(0, blobs, "reset")
    assert (report.loaded, report.over_capacity) == (5, 3)
    assert set(small.engine.store.stream_ids()) == set(ids[3:])


def test_checkpoints_follow_evictions_restores_and_revoked_partitions(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    child = EngineHost(Engine(bundle, max_streams=4, idle_ttl_s=60.0))
    x = np.ones((4, 2))
    first = _request(["a", "b", "c", "d"], x, [0, 1, 2, 3], part=0)
    first.timestamps[:] = 1.7e12
    child.step(first)
    blobs = {s: v for s, _, v in child.checkpoint() if v is not None}
    assert set(blobs) == {"a", "b", "c", "d"}
    # "a" and "b" come back after the TTL (two streams agree on the time): each is
    # evicted and begins again from zero in the same call, so its new state is
    # written, not a tombstone; "e" (partition 1) takes the slot of "c" or "d"
    # (least recently used), and the other, idle past the TTL now, is swept.
    late = _request(["a", "b", "e"], x[:3], [4, 5, 0], part=0)
    late.timestamps[:] = 1.7e12 + 120_000
    late.partitions[2] = 1  # type: ignore[index]
    reply = child.step(late)
    evicted = {e.stream_id: e.reason for e in reply.result.evictions}
    assert sorted(evicted) == ["a", "b", "c", "d"] and evicted["a"] == evicted["b"] == "ttl"
    records = {s: (p, v) for s, p, v in child.checkpoint()}
    assert set(records) == {"a", "b", "c", "d", "e"}
    assert records["c"] == records["d"] == (0, None)  # gone: tombstones
    state = StreamState.from_bytes(records["a"][1] or b"")
    assert (state.step, state.offset, state.partition) == (1, 4, 0)
    assert records["e"][0] == 1
    assert child.partition_of == {"a": 0, "b": 0, "e": 1}
    # Partition 0 revoked: its streams leave, none is checkpointed again.
    assert child.drop({0}) == 2
    assert child.engine.store.stream_ids() == ["e"]
    assert child.checkpoint() == []
    # A restore is not a change: restored states are not written back.
    assert child.restore(0, {"a": blobs["a"]}, "reset").loaded == 1
    assert child.checkpoint() == []
    assert child.partition_of == {"a": 0, "e": 1}


def test_memory_state_keeps_no_tombstones(make_bundle: BundleFactory) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    child = EngineHost(Engine(bundle), changelog=False)
    for i in range(50):  # sessions that end: none may leave anything behind
        child.step(_request([f"s{i}"], np.ones((1, 2)), [i], part=0, ends=[True]))
    assert child.engine.store.stream_ids() == []
    assert child.checkpoint() == []


def test_a_stream_that_ends_in_one_partition_and_begins_in_another(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    child = EngineHost(Engine(bundle))
    child.step(_request(["s", "t"], np.ones((2, 2)), [0, 1], part=0))
    child.checkpoint()
    child.step(_request(["s"], np.ones((1, 2)), [2], part=0, ends=[True]))
    child.step(_request(["s"], np.ones((1, 2)), [0], part=1))  # the topic was repartitioned
    child.step(_request(["t"], np.ones((1, 2)), [3], part=0, ends=[True]))
    child.step(_request(["t"], np.ones((1, 2)), [4], part=0))  # begins again where it was
    records = {(s, p): v for s, p, v in child.checkpoint()}
    assert set(records) == {("s", 0), ("s", 1), ("t", 0)}
    assert records["s", 0] is None and records["s", 1] is not None  # gone from 0, now in 1
    assert records["t", 0] is not None  # its new state replaces the old, no tombstone
    # A revoke: what ended in the revoked partition leaves no tombstone either.
    child.step(_request(["t"], np.ones((1, 2)), [5], part=0, ends=[True]))
    assert child.drop({0}) == 0
    assert child.checkpoint() == []


def test_the_worst_streams_ride_with_the_stats_refreshed_at_most_each_interval() -> None:
    from streamlstm import Bundle, ModelConfig, OutputSpec

    bundle = Bundle.random(
        ModelConfig(input_size=1, hidden_sizes=(4,), output_size=1),
        outputs=OutputSpec(target_feature=0),
    )
    now = [0.0]
    child = EngineHost(Engine(bundle), worst_interval_s=10.0, clock=lambda: now[0])
    assert not child.stats.worst_streams  # ranked at once: nothing held yet
    ramp = np.arange(8, dtype=np.float64)[:, None]
    child.step(_request(["calm"] * 8, ramp, list(range(8)), part=0))
    reply = child.step(_request(["wild"] * 8, ramp * 50, list(range(8, 16)), part=0))
    assert not reply.stats.worst_streams  # not ranked again within the interval
    now[0] = 10.0
    worst = child.stats.worst_streams
    assert [w.stream for w in worst] == ["wild", "calm"]
    assert worst == tuple(child.engine.worst_streams(5))


def test_a_state_kept_from_another_model_starts_its_quality_history_again() -> None:
    """carry keeps (h, c) across a model change; the forecasts in the state
    are the old model's, so the new one is judged only on its own."""
    from streamlstm import Bundle, ModelConfig, OutputSpec

    def forecaster(seed: int) -> Bundle:
        config = ModelConfig(input_size=1, hidden_sizes=(4,), output_size=1)
        return Bundle.random(config, seed=seed, outputs=OutputSpec(target_feature=0))

    x = np.linspace(0.0, 1.0, 20)[:, None]
    old = EngineHost(Engine(forecaster(1)))
    old.step(_request(["s"] * 10, x[:10], list(range(10)), part=0))
    ((stream, partition, blob),) = old.checkpoint()
    assert blob is not None
    new = EngineHost(Engine(forecaster(2)))
    report = new.restore(partition, {stream: blob}, "carry")
    assert report.kept_model_changed == 1
    out = new.step(_request(["s"] * 10, x[10:], list(range(10, 20)), part=0))
    quality = new.engine.quality
    assert quality is not None
    judged = quality.horizons[0].model
    errors = np.abs(out.result.predictions[:9, 0].astype(np.float64) - x[11:, 0])
    assert judged.count == 9  # the first forecast judged is the first made after restore
    assert judged.total == pytest.approx(errors.sum(), rel=1e-6)  # truths read as float32


def test_a_restore_re_warms_another_models_states_over_their_ticks(
    make_bundle: BundleFactory,
) -> None:
    """A changelog written by one model, restored by another (not a retrain) that keeps
    ticks: each stream's state is the new model run over the last K ticks its record
    holds, whatever the K it was written with (re-laid), and a record without ticks
    starts again; the same rule as a live swap (``--swap-state auto``)."""
    old = make_bundle(input_size=2, output_size=1, seed=1)
    new = make_bundle(input_size=2, output_size=1, seed=2, hidden_sizes=(8,), cell="gru")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 2)).astype(np.float32)
    ids = ["a", "b"] * 15
    writer = EngineHost(Engine(old, history_ticks=6))
    writer.step(_request(ids, x, list(range(30)), part=0))
    bare = EngineHost(Engine(old))  # no ticks kept: its record holds none
    bare.step(_request(["c"] * 3, x[:3], [0, 1, 2], part=1))
    blobs = {s: v for s, _, v in [*writer.checkpoint(), *bare.checkpoint()] if v is not None}
    reader = EngineHost(Engine(new, history_ticks=4))
    report = reader.restore(0, blobs, "auto")
    assert (report.loaded, report.rewarmed_model_changed) == (3, 3)
    y = rng.normal(size=(1, 2)).astype(np.float32)
    for stream, mine in (("a", x[0::2]), ("b", x[1::2])):
        got = reader.step(_request([stream], y, [100], part=0)).result.predictions
        want = new.predict_sequence(np.concatenate([mine[-4:], y]))[-1]
        np.testing.assert_allclose(got[0], want, atol=1e-5)
    fresh = reader.step(_request(["c"], y, [100], part=1)).result
    assert fresh.steps.tolist() == [1]  # nothing to replay: it started again
    np.testing.assert_allclose(fresh.predictions[0], new.predict_sequence(y)[0], atol=1e-5)


def test_a_changelog_of_two_models_is_sorted_record_by_record(
    make_bundle: BundleFactory,
) -> None:
    """After a swap a partition's changelog holds the old model's records (streams quiet
    since) and the new model's: each goes its own way. The new model's go on as they are,
    the old model's are reset (``--swap-state reset``), not all of them as the first."""
    old = make_bundle(input_size=2, output_size=1, seed=1)
    new = make_bundle(input_size=2, output_size=1, seed=2)
    x = np.random.default_rng(5).normal(size=(4, 2)).astype(np.float32)
    before = EngineHost(Engine(old))
    before.step(_request(["quiet", "busy"], x[:2], [0, 1], part=0))
    records = {s: v for s, _, v in before.checkpoint() if v is not None}
    after = EngineHost(Engine(new))
    after.step(_request(["busy", "busy"], x[2:], [2, 3], part=0))
    records.update({s: v for s, _, v in after.checkpoint() if v is not None})
    reader = EngineHost(Engine(new))
    report = reader.restore(0, records, "reset")
    assert (report.loaded, report.reset_model_changed) == (1, 1)
    view = reader.engine.inspect("busy")
    assert view is not None and view.steps == 2 and reader.engine.inspect("quiet") is None

"""The engine child's checkpoint and restore, in process: what is written, what is loaded."""

from __future__ import annotations

import numpy as np

from streamlstm import Engine, StreamState
from streamlstm.consumers.engine_child import ChildEngine
from streamlstm.consumers.engine_process import StepRequest
from tests.conftest import BundleFactory


def _request(
    ids: list[str], x: np.ndarray, offsets: list[int], part: int, **flags: list[bool]
) -> StepRequest:
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=x,
        resets=flags.get("resets", [False] * n),
        ends=flags.get("ends", [False] * n),
        timestamps=np.full(n, np.nan),
        offsets=offsets,
        partitions=[part] * n,
    )


def test_a_checkpoint_holds_the_changed_streams_and_tombstones_once(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    child = ChildEngine(Engine(bundle))
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
    first = ChildEngine(Engine(bundle))
    first.step(_request(ids[:12], x[:12], list(range(12)), part=1))
    blobs = {s: v for s, _, v in first.checkpoint() if v is not None}
    rest = first.step(_request(ids[12:], x[12:], list(range(12, 24)), part=1)).result
    second = ChildEngine(Engine(bundle))
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
    writer = ChildEngine(Engine(old))
    writer.step(_request(["a", "b"], np.ones((2, 2)), [0, 1], part=0))
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    assert ChildEngine(Engine(new)).restore(0, blobs, "reset").reset_model_changed == 2
    kept = ChildEngine(Engine(new)).restore(0, blobs, "keep-if-compatible")
    assert (kept.loaded, kept.kept_model_changed) == (2, 2)
    shaped = ChildEngine(Engine(other_shape)).restore(0, blobs, "keep-if-compatible")
    assert (shaped.loaded, shaped.reset_model_changed) == (0, 2)
    broken = {**blobs, "c": b"SLST\x03 not a state"}
    report = ChildEngine(Engine(old)).restore(0, broken, "reset")
    assert (report.loaded, report.corrupt) == (2, 1)


def test_a_restore_over_max_streams_keeps_the_most_recently_seen(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    writer = ChildEngine(Engine(bundle))
    ids = [f"s{i}" for i in range(8)]
    for i, stream in enumerate(ids):  # s7 is seen last
        request = _request([stream], np.ones((1, 2)), [i], part=0)
        request.timestamps[:] = 1.7e12 + 1000 * i
        writer.step(request)
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    small = ChildEngine(Engine(bundle, max_streams=5))
    report = small.restore(0, blobs, "reset")
    assert (report.loaded, report.over_capacity) == (5, 3)
    assert set(small.engine.store.stream_ids()) == set(ids[3:])

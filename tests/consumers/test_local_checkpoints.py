"""Local checkpoints in the engine child: written once durable, restored with the tail.

A changelog partition is played by a list of (key, value) records whose index is
the offset; the parent's part (confirming a checkpoint with the offsets its
records end at, reading the tail after a local offset) is played here by hand.
The oracle is ``predict_sequence`` over each stream's whole history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition

from streamlstm import Bundle, Engine, StepResult
from streamlstm.checkpoint_store import CheckpointStore, Header
from streamlstm.consumers.durability.changelog import Restored, _begins
from streamlstm.consumers.engine.child import EngineHost
from streamlstm.consumers.engine.local_checkpoints import LocalCheckpoints
from streamlstm.consumers.engine.protocol import LocalRestore
from tests.conftest import BundleFactory
from tests.helpers.engine_requests import step_request
from tests.streamlstm.oracle import expected_outputs

TOPIC = "g-in-changelog"
Log = list[tuple[str, bytes | None]]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _host(bundle: Bundle, directory: Path, clock: Clock | None = None) -> EngineHost:
    local = LocalCheckpoints(directory, TOPIC, grace_s=60.0, clock=clock or Clock())
    return EngineHost(Engine(bundle, max_streams=64), local=local)


def _first_start(host: EngineHost) -> None:
    """Partition 0 assigned for the first time: no local checkpoint, an empty changelog."""
    assert host.open_local([0]).refused == {0: "missing"}
    host.restore(0, {}, "reset", LocalRestore(False, 0))


def _checkpoint(host: EngineHost, log: Log, *, durable: bool = True) -> None:
    """The parent's checkpoint: the records to the changelog, then (once durable) the
    offset after them to the child."""
    log += [(c.stream, c.state) for c in host.checkpoint()]
    if durable:
        host.checkpointed({0: len(log)})
        host.write_local(everything=True)  # as the child does between requests


def _restore(host: EngineHost, log: Log, *, use_local: bool = True) -> int:
    """The parent's restore of partition 0: from the local offset where there is one (and
    ``use_local``), else whole; returns where the read began."""
    opened = host.open_local([0])
    begin = opened.offsets.get(0, 0) if use_local else 0
    states: dict[str, bytes] = {}
    deleted: set[str] = set()
    for key, value in log[begin:]:
        if value is None:
            states.pop(key, None)
            deleted.add(key)
        else:
            states[key] = value
            deleted.discard(key)
    tail = begin > 0 or (use_local and 0 in opened.offsets)
    host.restore(0, states, "reset", LocalRestore(tail, len(log), tuple(sorted(deleted))))
    return begin


def _run(host: EngineHost, ids: list[str], x: np.ndarray, lo: int, hi: int) -> list[StepResult]:
    out = []
    for i in range(lo, hi, 4):
        j = min(i + 4, hi)
        out.append(host.step(step_request(ids[i:j], x[i:j], range(i, j), 0)).result)
    return out


def _series(n: int, streams: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"s{i}" for i in rng.integers(0, streams, n)], rng.normal(size=(n, 2)).astype(
        np.float32
    )


def _assert_on_oracle(bundle: Bundle, ids: list[str], x: np.ndarray, got: list[StepResult]) -> None:
    want, _ = expected_outputs(bundle, ids, x)
    predictions = np.concatenate([r.predictions for r in got])
    np.testing.assert_allclose(predictions, want, atol=1e-5, rtol=0)


def test_a_restart_reads_the_local_checkpoint_and_only_the_changelog_after_it(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """Three durable checkpoints, then one whose records reached the changelog but whose
    confirmation never came (a kill between): a new host opens the store at the third's
    offset, reads only the records after it, and every stream continues on the oracle."""
    bundle = make_bundle(input_size=2, output_size=1)
    ids, x = _series(200, 10, seed=4)
    log: Log = []
    first = _host(bundle, tmp_path)
    _first_start(first)
    got = []
    for lo in range(0, 120, 40):
        got += _run(first, ids, x, lo, lo + 40)
        _checkpoint(first, log)
    durable = len(log)
    got += _run(first, ids, x, 120, 140)
    _checkpoint(first, log, durable=False)
    assert len(log) > durable
    assert first.local is not None
    first.local.close()  # the process ends: what its store holds is what it confirmed
    second = _host(bundle, tmp_path)
    assert _restore(second, log) == durable
    assert second.engine.stats.active_streams == len(set(ids[:140]))
    got += _run(second, ids, x, 140, 200)
    _assert_on_oracle(bundle, ids, x, got)


def test_a_stream_ended_after_the_local_checkpoint_is_deleted_by_the_tail(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    log: Log = []
    host = _host(bundle, tmp_path)
    _first_start(host)
    x = np.ones((3, 2), np.float32)
    host.step(step_request(["a", "b", "c"], x, [0, 1, 2], 0))
    _checkpoint(host, log)
    host.step(step_request(["b"], x[:1], [3], 0, ends=[True]))
    _checkpoint(host, log, durable=False)  # b's tombstone only in the changelog
    assert log[-1] == ("b", None)
    assert host.local is not None
    host.local.close()
    again = _host(bundle, tmp_path)
    _restore(again, log)
    assert sorted(again.engine.store.stream_ids()) == ["a", "c"]


def test_a_checkpoint_reaches_local_disk_only_once_it_is_durable(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    log: Log = []
    host = _host(bundle, tmp_path)
    _first_start(host)
    host.step(step_request(["a"], np.ones((1, 2), np.float32), [0], 0))
    _checkpoint(host, log, durable=False)
    assert host.local is not None
    host.local.close()
    store = CheckpointStore.open(tmp_path, 0)
    assert store.records() == {}
    assert store.header() == Header(TOPIC, bundle.model_id, 0)
    store.close()


def _corrupt_current(path: Path) -> None:
    (path / "CURRENT").write_text("garbage\n")


def _corrupt_tables(path: Path) -> None:
    for table in path.glob("*.sst"):
        data = bytearray(table.read_bytes())
        data[100:4000] = b"\xa5" * len(data[100:4000])
        table.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "spoil"),
    [
        ("missing", lambda path, bundle: CheckpointStore.discard(path.parent, 0)),
        ("corrupt", lambda path, bundle: _corrupt_current(path)),
        ("corrupt", lambda path, bundle: _corrupt_tables(path)),
        ("other_model", None),
        ("other_changelog", None),
    ],
)
def test_a_local_checkpoint_that_cannot_serve_is_discarded_and_rebuilt(
    make_bundle: BundleFactory, tmp_path: Path, kind: str, spoil: object
) -> None:
    """Missing, corrupt (RocksDB's own files, or its tables' blocks), another model's or
    another changelog's: refused, the partition restored whole from the changelog, the
    store rebuilt from it, and every stream on the oracle."""
    bundle = make_bundle(input_size=2, output_size=1)
    ids, x = _series(160, 8, seed=5)
    log: Log = []
    first = _host(bundle, tmp_path)
    _first_start(first)
    got = _run(first, ids, x, 0, 80)
    _checkpoint(first, log)
    assert first.local is not None
    first.local.close()
    if callable(spoil):
        spoil(tmp_path / "checkpoint-0", bundle)
    other = make_bundle(input_size=2, output_size=1, seed=1) if kind == "other_model" else bundle
    second = EngineHost(
        Engine(other, max_streams=64),
        local=LocalCheckpoints(tmp_path, "another" if kind == "other_changelog" else TOPIC),
    )
    assert second.open_local([0]).refused == {0: kind}
    if kind in ("other_model", "other_changelog"):
        return  # refused, which is the point; the rebuild is the other cases'
    assert _restore(second, log) == 0
    got += _run(second, ids, x, 80, 160)
    _assert_on_oracle(bundle, ids, x, got)
    assert second.local is not None
    second.local.close()
    rebuilt = CheckpointStore.open(tmp_path, 0)
    assert rebuilt.header() == Header(TOPIC, bundle.model_id, len(log))
    assert sorted(rebuilt.records()) == sorted({k for k, _ in log})
    rebuilt.close()


def test_an_offset_outside_the_changelog_is_refused_and_the_store_rebuilt(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """Behind the changelog's start (or past its end): the read is whole, and the child
    replaces the store it had opened."""
    tps = [TopicPartition(TOPIC, p) for p in range(3)]
    read = {tp: Restored(tp.partition) for tp in tps}
    starts, ends = dict.fromkeys(tps, 5), dict.fromkeys(tps, 20)
    begins = _begins(read, starts, ends, {0: 3, 1: 12, 2: 21})
    assert [begins[tp] for tp in tps] == [5, 12, 5]
    assert [read[tp].tail for tp in tps] == [False, True, False]
    assert all("outside" in read[tps[p]].refused for p in (0, 2))
    bundle = make_bundle(input_size=2, output_size=1)
    log: Log = []
    host = _host(bundle, tmp_path)
    _first_start(host)
    host.step(step_request(["a", "b"], np.ones((2, 2), np.float32), [0, 1], 0))
    _checkpoint(host, log)
    assert host.local is not None
    host.local.close()
    again = _host(bundle, tmp_path)
    _restore(again, log, use_local=False)
    assert again.local is not None
    assert again.local.counts.discarded == {"outside_changelog": 1}
    assert sorted(again.engine.store.stream_ids()) == ["a", "b"]


def test_a_released_partition_keeps_its_local_checkpoint_for_the_grace_period(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    clock = Clock()
    log: Log = []
    host = _host(bundle, tmp_path, clock)
    _first_start(host)
    host.step(step_request(["a"], np.ones((1, 2), np.float32), [0], 0))
    _checkpoint(host, log)
    host.drop({0})  # moved away: kept
    clock.now = 59.0
    assert host.local is not None and host.local.sweep() == 0
    assert host.open_local([0]).offsets == {0: len(log)}  # back in time: still valid
    host.restore(0, {}, "reset", LocalRestore(True, len(log)))
    assert list(host.engine.store.stream_ids()) == ["a"]
    host.drop({0})
    clock.now = 119.0
    _checkpoint(host, log)  # each durable checkpoint sweeps
    assert not (tmp_path / "checkpoint-0").exists()
    assert host.local.counts.expired == 1


def test_a_store_found_at_start_and_never_held_is_deleted_after_the_grace_period(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    CheckpointStore.open(tmp_path, 7).close()
    clock = Clock()
    local = LocalCheckpoints(tmp_path, TOPIC, grace_s=60.0, clock=clock)
    assert local.sweep() == 0
    clock.now = 60.0
    assert local.sweep() == 1
    assert not (tmp_path / "checkpoint-7").exists()


def test_a_restore_between_the_chunks_of_a_checkpoint_equals_the_changelog(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """A durable checkpoint written in part (3 of its 10 states, without its offset) when
    the process dies: the store's offset is the previous checkpoint's, the tail from
    there holds all ten again, and every stream continues on the oracle."""
    bundle = make_bundle(input_size=2, output_size=1)
    ids, x = _series(120, 10, seed=6)
    ids[:10] = [f"s{i}" for i in range(10)]  # each stream ticks in both halves
    ids[60:70] = ids[:10]
    log: Log = []
    first = _host(bundle, tmp_path)
    _first_start(first)
    got = _run(first, ids, x, 0, 60)
    _checkpoint(first, log)
    before = len(log)
    got += _run(first, ids, x, 60, 80)
    log += [(c.stream, c.state) for c in first.checkpoint()]
    first.checkpointed({0: len(log)})
    assert first.local is not None and first.local.write_some(3) == 3
    assert first.local.unwritten == 7
    first.local.close(drain=False)
    store = CheckpointStore.open(tmp_path, 0)
    header = store.header()
    store.close()
    assert header is not None and header.offset == before
    second = _host(bundle, tmp_path)
    assert _restore(second, log) == before
    got += _run(second, ids, x, 80, 120)
    _assert_on_oracle(bundle, ids, x, got)

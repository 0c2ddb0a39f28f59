"""The engine child with a cold tier: what its checkpoints write and its restores load.

A compacted changelog is played by a dict (last record per stream, a tombstone
deletes); the oracle is ``predict_sequence`` over each stream's whole history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamlstm import Bundle, Engine
from streamlstm.cold_tier import ColdConfig
from streamlstm.consumers.engine.child import EngineHost
from streamlstm.consumers.engine.process import StepRequest
from streamlstm.consumers.observability.metrics import EngineStatsCollector
from tests.conftest import BundleFactory
from tests.streamlstm.oracle import expected_outputs


def _request(ids: list[str], x: np.ndarray, first: int, part: int) -> StepRequest:
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=x,
        resets=[False] * n,
        ends=[False] * n,
        timestamps=np.full(n, np.nan),
        offsets=list(range(first, first + n)),
        partitions=[part] * n,
    )


def _host(bundle: Bundle, directory: Path, max_streams: int) -> EngineHost:
    engine = Engine(bundle, max_streams=max_streams, cold=ColdConfig(directory=directory))
    return EngineHost(engine)


def _compact(changelog: dict[str, bytes], host: EngineHost) -> None:
    for stream, _, value in host.checkpoint():
        if value is None:
            changelog.pop(stream, None)
        else:
            changelog[stream] = value


def test_streams_on_disk_survive_a_restart_through_the_changelog(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """Moves to disk leave no tombstone and write the states the changelog lacks; a new
    instance (its cold tier empty) restores all 12 streams into room for 4, the rest
    straight to disk, and every stream continues on the oracle."""
    bundle = make_bundle(input_size=2, output_size=1)
    rng = np.random.default_rng(3)
    ids = [f"s{i}" for i in rng.integers(0, 12, 240)]
    x = rng.normal(size=(240, 2)).astype(np.float32)
    changelog: dict[str, bytes] = {}
    first = _host(bundle, tmp_path / "a", max_streams=4)
    got = []
    for lo in range(0, 120, 3):  # a checkpoint every other poll
        got.append(first.step(_request(ids[lo : lo + 3], x[lo : lo + 3], lo, 0)).result)
        if lo % 6:
            _compact(changelog, first)
    _compact(changelog, first)
    assert sorted(changelog) == sorted(set(ids[:120]))  # every stream's state, none lost
    first.engine.close()
    second = _host(bundle, tmp_path / "b", max_streams=4)
    report = second.restore(0, changelog, "reset")
    assert (report.loaded, report.over_capacity, report.to_disk) == (4, 0, len(changelog) - 4)
    cold = second.engine.stats.cold
    assert cold is not None and cold.streams == len(changelog) - 4
    for lo in range(120, 240, 3):
        got.append(second.step(_request(ids[lo : lo + 3], x[lo : lo + 3], lo, 0)).result)
    want, _ = expected_outputs(bundle, ids, x)
    predictions = np.concatenate([r.predictions for r in got])
    np.testing.assert_allclose(predictions, want, atol=1e-5, rtol=0)
    assert not any(r.evictions for r in got)


def test_a_dropped_partition_takes_its_cold_store_with_it(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    host = _host(make_bundle(input_size=2, output_size=1), tmp_path, max_streams=2)
    x = np.ones((4, 2), np.float32)
    host.step(_request(["a", "b"], x[:2], 0, 1))
    host.step(_request(["c", "d"], x[2:], 2, 2))  # a, b to partition 1's store
    host.checkpoint()
    assert (tmp_path / "partition-1").exists()
    host.drop({1})
    assert not (tmp_path / "partition-1").exists()
    cold = host.engine.stats.cold
    assert cold is not None and cold.streams == 0
    assert host.checkpoint() == []  # another owner's streams now: no tombstones


def test_the_cold_figures_are_metrics(make_bundle: BundleFactory, tmp_path: Path) -> None:
    host = _host(make_bundle(input_size=2, output_size=1), tmp_path, max_streams=2)
    x = np.ones((3, 2), np.float32)
    host.step(_request(["a", "b"], x[:2], 0, 1))
    host.step(_request(["c"], x[2:], 2, 1))  # a to disk
    host.step(_request(["a"], x[:1], 3, 1))  # a back, b to disk
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for family in EngineStatsCollector(lambda: host.stats).collect()
        for s in family.samples
    }
    assert samples["streamlstm_cold_streams[]"] == 1
    assert samples["streamlstm_cold_writes_total[]"] == 2
    assert samples["streamlstm_cold_hits_total[]"] == 1
    # a back: one read (before the first move the partition had no store: none to read)
    assert samples["streamlstm_cold_reads_total[]"] == 1
    assert samples["streamlstm_cold_dropped_total[('reason', 'bound')]"] == 0
    assert samples["streamlstm_evictions_total[('reason', 'lru')]"] == 0

"""A restore from a changelog on Apache Kafka: what is read, what is loaded, what is counted."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from streamlstm import Engine, StreamState
from streamlstm.consumers.durability import changelog as changelog_module
from streamlstm.consumers.durability.changelog import Changelog
from streamlstm.consumers.engine import spool
from streamlstm.consumers.engine.child import EngineHost, InProcessClient
from streamlstm.consumers.engine.process import ProcessClient, StepRequest
from streamlstm.consumers.observability.metrics import ServeMetrics
from tests.conftest import BundleFactory


def _states(bundle: Any, ids: list[str], part: int, offset: int) -> dict[str, bytes]:
    """Checkpointed state bytes of ``ids`` after one tick each (distinct values per call)."""
    child = EngineHost(Engine(bundle))
    n = len(ids)
    x = np.random.default_rng(offset).standard_normal((n, 2))
    no = [False] * n
    child.step(
        StepRequest(ids, x, no, no, np.zeros(n), list(range(offset, offset + n)), [part] * n)
    )
    return {s: v for s, _, v in child.checkpoint() if v is not None}


async def _send(bootstrap: str, topic: str, records: list[tuple[str, bytes | None, int]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 << 20)
    await producer.start()
    try:
        for key, value, partition in records:
            await producer.send_and_wait(topic, value, key=key.encode(), partition=partition)
    finally:
        await producer.stop()


async def _send_aborted(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"t-{topic}")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(topic, value, key=key.encode(), partition=0)
        await producer.abort_transaction()
    finally:
        await producer.stop()


def _fill(
    bootstrap: str, topic: str, bundle: Any
) -> tuple[list[tuple[str, bytes | None, int]], dict[str, bytes]]:
    """A changelog to restore: the records written, and the states a restore must load."""
    old = _states(bundle, ["a", "b", "c", "d", "e"], part=0, offset=0)
    new = _states(bundle, ["a", "e"], part=0, offset=100)
    other = _states(bundle, ["f"], part=1, offset=7)
    records: list[tuple[str, bytes | None, int]] = [
        *((s, v, 0) for s, v in old.items()),
        ("a", new["a"], 0),  # a later state wins
        ("b", None, 0),  # a tombstone deletes
        ("c", b"SLST\x03 not a state", 0),  # a corrupt last record is counted, not loaded
        ("e", new["e"], 0),
        ("f", other["f"], 1),
    ]
    asyncio.run(_send(bootstrap, topic, records))
    # An aborted transaction's state for "d": read_committed must not see it.
    asyncio.run(_send_aborted(bootstrap, topic, "d", new["a"]))
    return records, {"a": new["a"], "d": old["d"], "e": new["e"], "f": other["f"]}


def _check_metrics(registry: CollectorRegistry, records: list[tuple[str, Any, int]]) -> None:
    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        assert value is not None, name
        return value

    assert sample("streamlstm_restored_streams_total") == 4
    assert sample("streamlstm_restore_left_out_streams_total", reason="corrupt") == 1
    written = sum(len(v) for _, v, _ in records if v is not None)
    assert sample("streamlstm_restore_bytes_total") == written
    assert sample("streamlstm_restore_seconds_count") == 2


def test_the_last_committed_record_of_each_stream_is_loaded_and_the_rest_counted(
    kafka_bootstrap: str,
    make_kafka_topics: Callable[..., list[str]],
    make_bundle: BundleFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    (topic,) = make_kafka_topics("changelog", partitions=2)
    records, loaded = _fill(kafka_bootstrap, topic, bundle)
    monkeypatch.setattr(changelog_module, "_PROGRESS_S", 0.0)  # a progress line per fetch
    engine = InProcessClient(EngineHost(Engine(bundle, max_streams=64)))
    registry = CollectorRegistry()
    changelog = Changelog(
        {"bootstrap_servers": kafka_bootstrap},
        topic,
        engine=engine,
        metrics=ServeMetrics(registry),
        swap_state="reset",
        isolation_level="read_committed",
    )
    caplog.set_level(logging.INFO, logger=changelog_module.__name__)
    asyncio.run(changelog.restore([0, 1]))
    assert gc.isenabled()  # off only while the records are read
    store = engine.child.engine.store
    assert sorted(store.stream_ids()) == ["a", "d", "e", "f"]
    for stream, want in loaded.items():
        state = StreamState.from_bytes(want)
        slot = store.slot_of(stream)
        assert slot is not None
        for layer in range(len(state.h)):  # bitwise
            assert store.h[layer][slot].tobytes() == state.h[layer].tobytes()
            assert store.c[layer][slot].tobytes() == state.c[layer].tobytes()
        assert store.offsets[slot] == state.offset
    assert engine.child.partition_of == {"a": 0, "d": 0, "e": 0, "f": 1}

    _check_metrics(registry, records)
    text = caplog.text
    assert "partition 0: restored 3 streams (9 records" in text and "1 corrupt" in text
    assert "partition 1: restored 1 streams (1 records" in text
    # Small fetches: a progress line after each but the last (every 0 s here).
    (read,) = asyncio.run(
        changelog_module.read_partitions(
            {"bootstrap_servers": kafka_bootstrap},
            topic,
            [0],
            isolation_level="read_committed",
            max_partition_fetch_bytes=1024,
        )
    )
    assert set(read.states) == {"a", "c", "d", "e"} and read.records == 9
    # At most 11: the aborted record and its abort marker take offsets too.
    progress = re.findall(rf"restoring from {topic}: (\d+) of at most 11 records", caplog.text)
    assert len(progress) >= 2 and all(0 < int(n) < 11 for n in progress)


def test_the_engine_process_takes_the_states_through_a_spool_with_the_same_outcome(
    kafka_bootstrap: str,
    make_kafka_topics: Callable[..., list[str]],
    make_bundle: BundleFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    (topic,) = make_kafka_topics("changelog", partitions=2)
    records, loaded = _fill(kafka_bootstrap, topic, bundle)
    monkeypatch.setattr(spool, "_directory", lambda size: str(tmp_path))  # to see it go
    ids = list(loaded)
    no = [False] * len(ids)
    x = np.random.default_rng(3).standard_normal((len(ids), 2))
    parts = [StreamState.from_bytes(loaded[s]).partition for s in ids]
    then = StepRequest(ids, x, no, no, np.zeros(len(ids)), [1000] * len(ids), parts)
    local = EngineHost(Engine(bundle, max_streams=64))
    for part in (0, 1):
        local.restore(part, {s: v for s, v in loaded.items() if (s == "f") == part}, "reset")
    want = local.step(then).result.predictions
    registry = CollectorRegistry()

    async def main() -> None:
        proc = ProcessClient(bundle, max_streams=64, idle_ttl_s=None)
        await proc.start()
        try:
            changelog = Changelog(
                {"bootstrap_servers": kafka_bootstrap},
                topic,
                engine=proc,
                metrics=ServeMetrics(registry),
                swap_state="reset",
                isolation_level="read_committed",
            )
            await changelog.restore([0, 1])
            assert proc.stats is not None and proc.stats.active_streams == 4
            # Bitwise the states of the in-process restore: the same predictions.
            assert (await proc.step(then)).result.predictions.tobytes() == want.tobytes()
        finally:
            await proc.close()

    asyncio.run(main())
    _check_metrics(registry, records)
    assert list(tmp_path.iterdir()) == []

"""Local checkpoints through Kafka: a restart with a state dir reads only the changelog's tail."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.serving import (
    check_against_oracle,
    random_ticks,
    saved_bundle,
    serve_config,
    tick_messages,
)

# Durable state needs Apache Kafka (topic configs, compaction), even on a Tansu suite run.
pytestmark = pytest.mark.apache_kafka


def _sample(server: Server, name: str, **labels: str) -> float:
    value = server.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _restores(server: Server) -> dict[str, float]:
    """The restores a life made: partitions by source, bytes read from the changelog, states
    taken from local checkpoints."""
    seconds = "streamlstm_restore_partition_seconds_count"
    return {
        "local": _sample(server, seconds, source="local"),
        "changelog": _sample(server, seconds, source="changelog"),
        "bytes": _sample(server, "streamlstm_restore_bytes_total"),
        "from_local": _sample(server, "streamlstm_restore_local_streams_total"),
    }


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_restart_restores_from_its_local_checkpoints_and_reads_no_changelog(
    bootstrap: str, make_topics: Any, tmp_path: Path, guarantee: str
) -> None:
    """Three lives on one state dir, each stopped cleanly. The second restores all four
    partitions from their local checkpoints and reads no changelog record (a clean stop
    leaves them at the changelog's end); before the third, partition 0's local
    checkpoint is deleted, so that partition alone is read whole from the changelog.
    Every answer is on the oracle (torch's own LSTM over each stream's whole history),
    each tick answered once."""
    rng = np.random.default_rng(33)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    lives = [random_ticks(rng, streams=60, n=400) for _ in range(3)]
    state_dir = tmp_path / "state"
    config = serve_config(
        model_dir, bootstrap, src, out, dlq, state="durable", commit_interval_ms=200,
        guarantee=guarantee, state_dir=str(state_dir),
    )  # fmt: skip
    seen: list[dict[str, float]] = []

    async def scenario() -> tuple[list[Any], list[Any]]:
        metas: list[Any] = []
        start = 0
        for life, ticks in enumerate(lives):
            if life == 2:
                shutil.rmtree(state_dir / "checkpoint-0")
            async with Server(config) as server:
                metas += await send_raw(bootstrap, src, tick_messages(ticks, start))
                start += len(ticks)
                got = await read_all(bootstrap, out, len(metas), timeout_s=60)
                assert len(got) >= len(metas)
                seen.append(_restores(server))  # every partition restored before its ticks
                server.request_stop()
                await server.wait()
        return metas, await read_all(bootstrap, out, len(metas) + 1, timeout_s=5)

    metas, outputs = asyncio.run(scenario())
    assert seen[0] == {"local": 0, "changelog": 4, "bytes": 0, "from_local": 0}
    streams = len({t[0] for t in lives[0]})
    assert seen[1] == {"local": 4, "changelog": 0, "bytes": 0, "from_local": streams}
    assert (seen[2]["local"], seen[2]["changelog"]) == (3, 1)
    assert seen[2]["bytes"] > 0  # partition 0's states, read from the changelog
    by_tick = check_against_oracle(model_dir, [t for life in lives for t in life], metas, outputs)
    assert all(len(v) == 1 for v in by_tick.values())  # a clean stop repeats nothing

"""Durable state on Apache Kafka: streams keep their memory across stops, restarts and kills."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streamlstm import Bundle, StreamState
from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.serving import (
    check_against_oracle,
    random_ticks,
    saved_bundle,
    serve_config,
    tick_messages,
)

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


def test_a_clean_stop_and_start_continues_every_stream(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(31)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    first, second = random_ticks(rng, streams=80, n=800), random_ticks(rng, streams=80, n=800)
    config = serve_config(
        model_dir, bootstrap, src, out, dlq, state="durable", commit_interval_ms=200
    )

    async def scenario() -> tuple[list[Any], list[Any]]:
        metas: list[Any] = []
        for ticks, start in ((first, 0), (second, len(first))):
            async with Server(config) as server:
                metas += await send_raw(bootstrap, src, tick_messages(ticks, start))
                got = await read_all(bootstrap, out, len(metas), timeout_s=60)
                assert len(got) >= len(metas)
                server.request_stop()
                await server.wait()
        return metas, await read_all(bootstrap, out, len(metas) + 1, timeout_s=5)

    metas, outputs = asyncio.run(scenario())
    by_tick = check_against_oracle(model_dir, first + second, metas, outputs)
    assert all(len(v) == 1 for v in by_tick.values())  # a clean stop repeats nothing
    # The changelog holds one state per stream, made by this model, in its input partition.
    changelog = f"{config.group_id}-{src}-changelog"
    records = asyncio.run(read_all(bootstrap, changelog, 10**9, timeout_s=5))
    last = {m.key: m for m in records}
    streams = {t[0] for t in first + second}
    assert {k.decode() for k in last} == streams
    partition_of = {
        json.loads(m.value)["stream"]: json.loads(m.value)["partition"] for m in outputs
    }
    bundle = Bundle.load(model_dir)
    for key, msg in last.items():
        state = StreamState.from_bytes(msg.value)
        assert msg.partition == state.partition == partition_of[key.decode()]
        assert state.model == bundle.model_id

    async def config_of_changelog() -> Any:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return await admin.describe_topics([changelog])
        finally:
            await admin.close()

    (described,) = asyncio.run(config_of_changelog())
    assert len(described["partitions"]) == 4

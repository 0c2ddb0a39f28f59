"""Exactly-once mode on Apache Kafka: read_committed consumers see each answer once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from streamlstm.consumers.devtools.tansu import TansuBroker
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import BrokerError, ConfigError
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.serving import (
    check_against_oracle,
    committed_offsets,
    random_ticks,
    saved_bundle,
    serve_config,
    tick_messages,
)

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


def test_exactly_once_needs_durable_state() -> None:
    def config(**overrides: Any) -> ServeConfig:
        return ServeConfig(
            model="m", bootstrap_servers="b", input_topic="i", output_topic="o", **overrides
        )

    with pytest.raises(ConfigError, match="exactly-once needs --state durable"):
        config(state="memory", guarantee="exactly-once")
    with pytest.raises(ConfigError, match="guarantee: must be"):
        config(guarantee="twice")
    assert config(guarantee="exactly-once", group_id="grp").transactional_id_prefix == "grp"
    assert config().state == "durable" and config().guarantee == "at-least-once"


@pytest.mark.broker  # starts Tansu itself
def test_exactly_once_is_refused_at_start_up_on_a_broker_without_transactions(
    tmp_path: Path,
) -> None:
    model_dir = saved_bundle(tmp_path)
    with TansuBroker() as broker:
        config = serve_config(
            model_dir,
            broker.bootstrap,
            "ticks",
            "preds",
            "dlq",
            state="durable",
            guarantee="exactly-once",
            create_topics=True,
        )

        async def start() -> None:
            async with Server(config):
                pass

        with pytest.raises(BrokerError, match="exactly-once needs a broker with transactions"):
            asyncio.run(start())


def test_each_tick_and_dead_letter_is_seen_once_by_read_committed_and_state_continues(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(41)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    first, second = random_ticks(rng, streams=60, n=700), random_ticks(rng, streams=60, n=700)
    config = serve_config(
        model_dir,
        bootstrap,
        src,
        out,
        dlq,
        state="durable",
        guarantee="exactly-once",
        commit_interval_ms=200,
    )
    bad = [(b"broken", b'{"values": [1.0'), (b"wide", b'{"values": [1, 2, 3]}')]

    async def scenario() -> tuple[list[Any], list[Any], list[Any], float]:
        metas: list[Any] = []
        committed = 0.0
        for ticks, start in ((first, 0), (second, len(first))):
            async with Server(config) as server:
                metas += await send_raw(bootstrap, src, tick_messages(ticks, start))
                await send_raw(bootstrap, src, bad)
                got: list[Any] = []
                for _ in range(60):
                    got = await read_all(
                        bootstrap, out, len(metas), timeout_s=2, isolation_level="read_committed"
                    )
                    if len(got) >= len(metas):
                        break
                assert len(got) >= len(metas)
                server.request_stop()
                await server.wait()
                committed += (
                    server.registry.get_sample_value(
                        "streamlstm_transactions_total", {"outcome": "committed"}
                    )
                    or 0.0
                )
        outputs = await read_all(
            bootstrap, out, 10**9, timeout_s=3, isolation_level="read_committed"
        )
        dead = await read_all(bootstrap, dlq, 10**9, timeout_s=3, isolation_level="read_committed")
        return metas, outputs, dead, committed

    metas, outputs, dead, committed = asyncio.run(scenario())
    by_tick = check_against_oracle(model_dir, first + second, metas, outputs)
    assert all(len(v) == 1 for v in by_tick.values())
    assert sorted(m.key for m in dead) == sorted([b"broken", b"wide"] * 2)
    assert committed > 0
    # The offsets went with the transactions: the group is at the end of every partition.
    ends: dict[int, int] = {}
    polled = asyncio.run(read_all(bootstrap, src, 10**9, timeout_s=3))
    for msg in polled:
        ends[msg.partition] = max(ends.get(msg.partition, 0), msg.offset + 1)
    assert asyncio.run(committed_offsets(bootstrap, config.group_id, src)) == ends


def test_a_zombie_is_fenced_by_the_next_owner_of_its_partition(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    # The transactional.id is per input partition, so whoever takes partition p next
    # fences the producer of p's previous owner: a zombie cannot commit any more.
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=1)
    config = serve_config(
        model_dir, bootstrap, src, out, dlq, state="durable", guarantee="exactly-once"
    )
    zombie_id = f"{config.transactional_id_prefix}-{src}-0"

    async def scenario() -> None:
        zombie = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=zombie_id)
        await zombie.start()
        try:
            await zombie.begin_transaction()
            await zombie.send_and_wait(out, b'{"zombie": true}', key=b"z")
            async with Server(config) as server:
                await send_raw(
                    bootstrap, src, tick_messages(random_ticks(np.random.default_rng(5), 3, 5), 0)
                )
                for _ in range(30):
                    got = await read_all(
                        bootstrap, out, 5, timeout_s=1, isolation_level="read_committed"
                    )
                    if len(got) >= 5:
                        break
                server.request_stop()
                await server.wait()
            with pytest.raises(Exception, match=r"(?i)fenced|epoch"):
                await zombie.commit_transaction()
        finally:
            await zombie.stop()
        seen = await read_all(bootstrap, out, 10**9, timeout_s=2, isolation_level="read_committed")
        assert len(seen) == 5 and all(b"zombie" not in m.value for m in seen)

    asyncio.run(scenario())

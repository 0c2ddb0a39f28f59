"""Control records over Apache Kafka, checked against the oracle: a reset and a delete
are applied in offset order with their stream's ticks, acknowledged on the output topic,
written to the changelog, and survive a kill -9 once each in both guarantees."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamlstm.consumers.server import Server
from tests.consumers.conftest import read_all, send_raw, start_serve
from tests.helpers.polling import wait_for
from tests.helpers.serving import (
    Tick,
    check_against_oracle,
    random_ticks,
    read_answers,
    saved_bundle,
    serve_cmd,
    serve_config,
    tick_messages,
    wait_checkpointed,
)

CONTROL = "streamlstm-control"
STRONG = {"acks": "all", "enable_idempotence": True}


# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


async def _send_control(bootstrap: str, topic: str, stream: str, op: str) -> Any:
    (meta,) = await send_raw(
        bootstrap, topic, [(stream.encode(), b"")], STRONG, headers=[(CONTROL, op.encode())]
    )
    return meta


def _split(outputs: list[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The predictions, and the acknowledgements' bodies."""
    bodies = [json.loads(o.value) for o in outputs]
    return (
        [o for o, b in zip(outputs, bodies, strict=True) if "control" not in b],
        [b for b in bodies if "control" in b],
    )


def test_a_reset_and_a_delete_apply_in_order_with_the_ticks(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """sensor-1 reset and sensor-2 deleted among the ticks: their next ticks start from
    zero; "gone", deleted with no tick after, leaves a tombstone in the changelog, is
    not restored by the next daemon, and a tick of it there starts from zero."""
    rng = np.random.default_rng(5)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=3)
    config = serve_config(
        model_dir, bootstrap, src, out, dlq, state="durable", commit_interval_ms=300
    )
    first = random_ticks(rng, streams=4, n=60) + [("gone", [1.0, 2.0], False)] * 5
    later = random_ticks(rng, streams=4, n=60)
    comeback: list[Tick] = [("gone", [3.0, 4.0], False)]

    async def scenario() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        async with Server(config) as server:
            metas = await send_raw(bootstrap, src, tick_messages(first, 0), STRONG)
            controls = [
                await _send_control(bootstrap, src, stream, op)
                for stream, op in (
                    ("sensor-1", "reset"),
                    ("sensor-2", "delete"),
                    ("gone", "delete"),
                )
            ]
            metas += await send_raw(bootstrap, src, tick_messages(later, 65), STRONG)
            outputs = await read_all(bootstrap, out, len(metas) + 3, timeout_s=60)
            changelog = str(server.config.changelog_topic)

            def tombstoned() -> bool:
                read = asyncio.run(read_all(bootstrap, changelog, 10**9, timeout_s=2))
                last = {m.key: m.value for m in read}
                return b"gone" in last and last[b"gone"] is None

            await asyncio.to_thread(wait_for, tombstoned, 30, "the tombstone of gone")
            server.request_stop()
            await server.wait()
        async with Server(config) as server:  # the same group: it restores the changelog
            metas += await send_raw(bootstrap, src, tick_messages(comeback, 125), STRONG)
            outputs = await read_all(bootstrap, out, len(metas) + 3, timeout_s=60)
            server.request_stop()
            await server.wait()
        return metas, outputs, controls, []

    metas, outputs, controls, _ = asyncio.run(scenario())
    predictions, acks = _split(outputs)
    assert sorted((a["stream"], a["control"], a["partition"], a["offset"]) for a in acks) == sorted(
        (stream, op, m.partition, m.offset)
        for (stream, op), m in zip(
            (("sensor-1", "reset"), ("sensor-2", "delete"), ("gone", "delete")),
            controls,
            strict=True,
        )
    )
    # The oracle: each controlled stream's next tick starts from zero (a reset; a delete
    # starts it again), the other streams go on.
    restarted = {"sensor-1", "sensor-2", "gone"}
    reseeded: list[Tick] = []
    for stream, values, flag in later + comeback:
        reseeded.append((stream, values, flag or stream in restarted))
        restarted.discard(stream)
    by_tick = check_against_oracle(model_dir, first + reseeded, metas, predictions)
    assert [b["step"] for b in by_tick[(metas[-1].partition, metas[-1].offset)]] == [1]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_reset_survives_a_kill_9_between_its_acknowledgement_and_the_next_checkpoint(
    bootstrap: str, make_topics: Any, tmp_path: Path, guarantee: str
) -> None:
    """Checkpointed before the reset, killed once the reset and the ticks after it are
    answered: the restart reads them again from the checkpoint's offsets, applies the
    reset once more in its place (the state it restored never saw it), and every
    answer, repeats included, is the oracle's; read_committed sees one of each."""
    rng = np.random.default_rng(9)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    cmd += ["--state", "durable", "--guarantee", guarantee, "--group-instance-id", "ctl"]
    # One checkpoint early, then none for a minute: the kill comes before the next.
    cmd += ["--commit-interval-ms", "60000"]
    before, after, last = (random_ticks(rng, streams=3, n=n) for n in (40, 40, 30))
    proc, port = start_serve(cmd, tmp_path / "serve-1.log")
    try:
        metas = asyncio.run(send_raw(bootstrap, src, tick_messages(before, 0), STRONG))
        wait_checkpointed(port)  # the first checkpoint comes once the first poll is sent
        reset = asyncio.run(_send_control(bootstrap, src, "sensor-0", "reset"))
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(after, 40), STRONG))
        wanted = {(m.partition, m.offset) for m in [*metas, reset]}

        def answered() -> bool:
            read = asyncio.run(read_all(bootstrap, out, 10**9, timeout_s=2))
            return wanted <= {
                (b["partition"], b["offset"]) for b in map(json.loads, (m.value for m in read))
            }

        wait_for(answered, 60, "the reset's acknowledgement and the ticks' answers")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = start_serve(cmd, tmp_path / "serve-2.log")[0]
    try:
        metas += asyncio.run(send_raw(bootstrap, src, tick_messages(last, 80), STRONG))
        outputs = read_answers(bootstrap, out, metas, guarantee, group, src)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    predictions, acks = _split(outputs)
    restarted = {"sensor-0"}
    reseeded: list[Tick] = []
    for stream, values, flag in after:
        reseeded.append((stream, values, flag or stream in restarted))
        restarted.discard(stream)
    by_tick = check_against_oracle(model_dir, before + reseeded + last, metas, predictions)
    ack = ("sensor-0", "reset", reset.partition, reset.offset)
    assert {(a["stream"], a["control"], a["partition"], a["offset"]) for a in acks} == {ack}
    if guarantee == "exactly-once":
        assert len(acks) == 1 and all(len(v) == 1 for v in by_tick.values())
    else:
        assert len(acks) == 2  # answered again after the kill, from the same place


def test_the_streams_command_sends_a_control_and_waits_for_its_acknowledgement(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    config = serve_config(model_dir, bootstrap, src, out, dlq, state="memory")
    command = [sys.executable, "-m", "streamlstm.cli", "streams"]
    where = ["--input-topic", src, "--bootstrap-servers", bootstrap]

    async def run(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *command, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stdout, stderr = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, stdout.decode(), stderr.decode()

    async def scenario() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
        async with Server(config) as server:
            await send_raw(bootstrap, src, tick_messages([("pump", [1.0, 2.0], False)], 0))
            await read_all(bootstrap, out, 1, timeout_s=30)
            waited = await run("reset", "pump", *where, "--output-topic", out, "--wait-s", "30")
            server.request_stop()
            await server.wait()
        # Nobody serves now: sent, not acknowledged in time.
        late = await run("delete", "pump", *where, "--output-topic", out, "--wait-s", "2")
        return waited, late

    waited, late = asyncio.run(scenario())
    assert waited[0] == 0, waited
    sent, ack = map(json.loads, waited[1].splitlines())
    assert sent["sent"] == "reset" and ack["control"] == "reset" and ack["stream"] == "pump"
    assert (ack["partition"], ack["offset"]) == (sent["partition"], sent["offset"])
    assert late[0] == 3 and "not acknowledged within 2 s" in late[2]

"""Nothing stops the daemon but what should: hostile input, a wedged engine, a second signal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlstm import Bundle
from streamlstm.consumers.engine.child import EngineHost, InProcessClient
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig
from tests.consumers.conftest import (
    FragileEngine,
    await_answers,
    read_all,
    send_raw,
    start_serve,
)
from tests.helpers.polling import await_for, poll_until, wait_for
from tests.helpers.serving import (
    EPOCH_MS,
    committed_offsets,
    end_offsets,
    engine_child_pid,
    http_get,
    oracle_predictions,
    random_ticks,
    saved_bundle,
    serve_cmd,
    serve_config,
    wait_consumed,
)

NOW_MS = int(time.time() * 1000)

#: Hostile messages (key, value, the field the dead letter must name).
HOSTILE: list[tuple[bytes | None, bytes | None, str]] = [
    # A lone surrogate: valid JSON, not valid UTF-8 text once decoded (it stopped the
    # whole consumer group once: the encoder failed after the engine had stepped it).
    (None, b'{"stream": "\\ud800", "values": [1.0, 2.0]}', "stream"),
    (b"\xff\xfe", b'{"values": [1.0, 2.0]}', "key"),
    (b"h-" + b"x" * 5000, b'{"values": [1.0, 2.0]}', "key"),
    (b"h-nested", b'{"values": [[1.0], 2.0]}', "values"),
    (b"h-bool", b'{"values": [true, 2.0]}', "values"),
    (b"h-null", b'{"values": [null, 2.0]}', "values"),
    (b"h-f32", b'{"values": [3.5e38, 2.0]}', "values"),
    (b"h-seconds", b'{"values": [1.0, 2.0], "ts": 1700000000}', "ts"),
    (b"h-nanos", b'{"values": [1.0, 2.0], "ts": 1700000000000000000}', "ts"),
    (b"h-future", b'{"values": [1.0, 2.0], "ts": %d}' % (NOW_MS + 400 * 86_400_000), "ts"),
    (b"h-flag", b'{"values": [1.0, 2.0], "reset": "yes"}', "reset"),
    (b"h-deep", b"[" * 100_000 + b"]" * 100_000, "value"),
    (b"h-utf16", '{"values": [1.0, 2.0]}'.encode("utf-16"), "value"),
    (b"h-null-value", None, "value"),
]


def test_hostile_messages_become_dead_letters_and_every_tick_equals_the_oracle(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(23)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    ticks = random_ticks(rng, streams=60, n=600)
    msgs: list[tuple[bytes | None, bytes | None]] = []
    valid: list[bool] = []
    hostile_at = dict(
        zip(rng.choice(len(ticks), len(HOSTILE), replace=False).tolist(), HOSTILE, strict=True)
    )
    for i, (stream, values, reset) in enumerate(ticks):
        if i in hostile_at:
            key, value, _ = hostile_at[i]
            msgs.append((key, value))
            valid.append(False)
        body = {"stream": stream, "ts": EPOCH_MS + i, "values": values, "reset": reset}
        msgs.append((stream.encode(), json.dumps(body).encode()))
        valid.append(True)
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=100)

    async def scenario() -> tuple[list[Any], list[Any], list[Any], dict[int, int]]:
        async with Server(config) as server:
            metas = await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, len(ticks), timeout_s=90)
            dead = await read_all(bootstrap, dlq, len(HOSTILE), timeout_s=30)
            # Every message went through to its commit, the daemon still healthy after.
            await _await_committed(bootstrap, config.group_id, src, metas)
            assert server.healthy()
            server.request_stop()
            await server.wait()
        return metas, outputs, dead, await committed_offsets(bootstrap, config.group_id, src)

    metas, outputs, dead, committed = asyncio.run(scenario())
    expected = oracle_predictions(model_dir, ticks, metas, valid)
    got: dict[tuple[int, int], list[float]] = defaultdict(list)
    for msg in outputs:
        body = json.loads(msg.value)
        got[(body["partition"], body["offset"])].append(body["prediction"][0])
    assert set(got) == set(expected)
    assert all(len(v) == 1 for v in got.values())
    assert max(abs(got[k][0] - v) for k, v in expected.items()) <= 1e-5
    position = {(m.partition, m.offset): i for i, m in enumerate(metas) if not valid[i]}
    fields = {}
    for msg in dead:
        headers = dict(msg.headers)
        source = (
            int(headers["streamlstm-source-partition"]),
            int(headers["streamlstm-source-offset"]),
        )
        fields[position[source]] = headers["streamlstm-field"].decode()
        assert headers["streamlstm-error"]
    want = {
        i: f
        for i, (ok, f) in enumerate(zip(valid, _fields(valid, hostile_at), strict=True))
        if not ok
    }
    assert fields == want
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    assert committed == ends


async def _await_committed(
    bootstrap: str, group: str, topic: str, metas: list[Any], partitions: int = 4
) -> None:
    """Until the group has committed every one of the sent records (``metas``)."""
    ends = end_offsets(metas)

    async def committed() -> bool:
        return await committed_offsets(bootstrap, group, topic, partitions) == ends

    await await_for(committed, 60, f"the commit of {ends}")


def _fields(valid: list[bool], hostile_at: dict[int, tuple[Any, Any, str]]) -> list[str]:
    """The expected field of each message (empty for valid ones), in send order."""
    order = iter(field for _, (_, _, field) in sorted(hostile_at.items()))
    return ["" if ok else next(order) for ok in valid]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _source(msg: Any) -> tuple[int, int]:
    body = json.loads(msg.value)
    return body["partition"], body["offset"]


#: What the daemon logs when a step outlives --step-timeout-s.
STEP_TIMED_OUT = "the engine did not answer a step within --step-timeout-s"


def _log(path: Path) -> str:
    return path.read_text(errors="replace")


def _health(port: int, timeout_s: float = 1.0) -> int:
    """``/healthz``'s status, or 0 for no answer within ``timeout_s`` (refused, cut, silent)."""

    async def get() -> int:
        return (await asyncio.wait_for(http_get(port, "/healthz"), timeout_s))[0]

    try:
        return asyncio.run(get())
    except (OSError, TimeoutError, IndexError, ValueError):
        return 0


def _probe_health_until_exit(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float
) -> list[tuple[float, int]]:
    """``/healthz`` every ~100 ms until ``proc`` exits: (monotonic time of the answer, status).

    Every request must be answered within 1 s; only the exit itself may go unanswered
    (the endpoint closes last: after it, the daemon logs "stopped after" and exits).
    """
    probes: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"the daemon did not exit within {timeout_s:g} s"
        sent = time.monotonic()
        status = _health(port)
        if status == 0:
            closing = poll_until(
                lambda: proc.poll() is not None or "stopped after" in log.read_text("latin-1"),
                1.0,
                interval_s=0.02,
            )
            assert closing is not None, (
                f"/healthz gave no answer within 1 s (probe {len(probes) + 1}) while the "
                f"daemon was still running; statuses so far: {[s for _, s in probes]}"
            )
            break
        probes.append((time.monotonic(), status))
        time.sleep(max(0.0, sent + 0.1 - time.monotonic()))
    return probes


@pytest.mark.parametrize("step_timeout_s", [3.0])
def test_a_wedged_engine_fails_health_and_exits_and_a_restart_answers_every_tick(
    bootstrap: str, make_topics: Any, tmp_path: Path, step_timeout_s: float
) -> None:
    rng = np.random.default_rng(8)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    ticks = random_ticks(rng, streams=20, n=400)
    msgs = [
        (s.encode(), json.dumps({"values": v, "ts": EPOCH_MS + i}).encode())
        for i, (s, v, _) in enumerate(ticks)
    ]
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    cmd += ["--step-timeout-s", str(step_timeout_s)]
    first_log = tmp_path / "first.log"
    first, port = start_serve(cmd, first_log)
    try:
        metas = asyncio.run(send_raw(bootstrap, src, msgs[:200]))
        assert len(asyncio.run(read_all(bootstrap, out, 200, timeout_s=60))) == 200
        child = engine_child_pid(first.pid)
        os.kill(child, signal.SIGSTOP)
        stopped_at = time.monotonic()  # nothing in flight: every later step starts after it
        metas += asyncio.run(send_raw(bootstrap, src, msgs[200:]))
        # From the stop to the exit, through the step timeout and the shutdown that
        # kills the child: every request answered within 1 s (the loop never blocked).
        probes = _probe_health_until_exit(first, port, first_log, step_timeout_s + 60)
        first.wait(timeout=60)
        exited_at = time.monotonic()
        statuses = [status for _, status in probes]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses, f"/healthz never failed: {statuses}"
        failed = statuses.index(503)
        assert statuses[failed:] == [503] * (len(statuses) - failed), statuses  # stays failed
        failed_at = probes[failed][0]
        # Healthy until the step timeout (a slow step is not a failure), failed soon after.
        assert step_timeout_s <= failed_at - stopped_at <= step_timeout_s + 10
        # The exit follows the child's close grace (10 s, then it is killed).
        assert exited_at - failed_at < 30, exited_at - failed_at
        assert first.returncode == 1  # cli: a StreamLSTMError, here the step timeout
        assert STEP_TIMED_OUT in _log(first_log)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    second, _ = start_serve(cmd, tmp_path / "second.log")
    try:
        keys = {(m.partition, m.offset) for m in metas}
        assert await_answers(bootstrap, out, metas, timeout_s=120) >= keys
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    assert second.returncode == 0


def test_a_second_signal_exits_at_once_without_committing(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    cmd += ["--step-timeout-s", "300", "--shutdown-timeout-s", "120"]
    # Memory mode: no changelog to write, the checkpoint commits the offsets alone.
    cmd += ["--state", "memory"]
    proc, port = start_serve(cmd, tmp_path / "serve.log")
    try:
        body = json.dumps({"values": [1.0, 2.0], "ts": EPOCH_MS}).encode()
        asyncio.run(send_raw(bootstrap, src, [(b"s", body)]))
        assert len(asyncio.run(read_all(bootstrap, out, 1, timeout_s=60))) == 1

        def first_committed() -> bool:
            return asyncio.run(committed_offsets(bootstrap, group, src, partitions=1)) == {0: 1}

        # Its checkpoint closes within --commit-interval-ms (1 s) of the answer.
        wait_for(first_committed, 30, "the commit of the first tick")
        child = engine_child_pid(proc.pid)
        os.kill(child, signal.SIGSTOP)  # the next step never ends
        asyncio.run(send_raw(bootstrap, src, [(b"s", body)] * 5))
        # All six consumed: the five are in a step sent to the stopped child.
        wait_consumed(port, 6)
        proc.send_signal(signal.SIGTERM)  # waits for the wedged step (up to 120 s)
        draining = "SIGTERM: finishing in-flight work"
        wait_for(lambda: draining in _log(tmp_path / "serve.log"), 30, "the first SIGTERM")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert proc.returncode == 128 + signal.SIGTERM
        # The stopped engine child went with it (it could not notice the socket close).
        wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 10, "the child")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # The first tick was committed; the five after it were not answered, so not committed.
    assert asyncio.run(committed_offsets(bootstrap, group, src, partitions=1)) == {0: 1}


def test_an_instance_without_partitions_is_ready(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=1)
    config = serve_config(model_dir, bootstrap, src, out, dlq)

    async def scenario() -> None:
        async with Server(config) as a, Server(config) as b:
            deadline = time.monotonic() + 60
            # Both ready, and the group settled: mid-rebalance the sticky assignor may
            # briefly leave partition 0 with both members (aiokafka logs it).
            while not (a.ready() and b.ready() and len(a.assignment() + b.assignment()) == 1):
                assert time.monotonic() < deadline, "an instance never became ready"
                await asyncio.sleep(0.2)
            assert sorted(a.assignment() + b.assignment()) == [0]
            for server in (a, b):
                assert (await http_get(server.metrics_port, "/readyz"))[0] == 200
                server.request_stop()
                await server.wait()

    asyncio.run(scenario())


def _fragile(bundle: Bundle, config: ServeConfig, shadow: Bundle | None = None) -> InProcessClient:
    # The child's own code (EngineHost), in process: a failed step is taken again
    # tick by tick before the answer, as in the engine's child process.
    return InProcessClient(EngineHost(FragileEngine(bundle, max_streams=config.max_streams)))


def test_a_tick_whose_step_fails_is_a_dead_letter_and_the_rest_of_its_batch_goes_on(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    ticks = random_ticks(rng, streams=30, n=300)
    msgs: list[tuple[bytes | None, bytes | None]] = []
    valid: list[bool] = []
    boom = json.dumps({"values": [1.0, 2.0], "ts": EPOCH_MS}).encode()
    for i, (stream, values, reset) in enumerate(ticks):
        if i % 50 == 7:
            msgs.append((b"boom", boom))
            valid.append(False)
        body = {"ts": EPOCH_MS + i, "values": values, "reset": reset}
        msgs.append((stream.encode(), json.dumps(body).encode()))
        valid.append(True)
    booms = len(valid) - sum(valid)
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=64)

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        async with Server(config, engine=_fragile) as server:
            metas = await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, len(ticks), timeout_s=60)
            dead = await read_all(bootstrap, dlq, booms, timeout_s=30)
            assert server.healthy()
            server.request_stop()
            await server.wait()
        return metas, outputs, dead

    metas, outputs, dead = asyncio.run(scenario())
    expected = oracle_predictions(model_dir, ticks, metas, valid)
    got = {_source(m): json.loads(m.value)["prediction"][0] for m in outputs}
    assert len(outputs) == len(ticks) and set(got) == set(expected)
    assert max(abs(got[k] - v) for k, v in expected.items()) <= 1e-5
    assert len(dead) == booms
    for msg in dead:
        headers = dict(msg.headers)
        assert headers["streamlstm-field"] == b"engine"
        assert b"kaboom" in headers["streamlstm-error"]


def test_records_the_broker_refuses_are_delivered_another_way_and_nothing_stops(
    kafka_bootstrap: str, make_kafka_topics: Any, tmp_path: Path
) -> None:
    # Topic configs (max.message.bytes, time stamp bounds): Apache Kafka even on a Tansu run.
    bootstrap, make_topics = kafka_bootstrap, make_kafka_topics
    # The output topic refuses time stamps over a minute ahead (Kafka 4 refuses those over
    # an hour ahead by default); the dead-letter topic refuses records over 4 KiB.
    model_dir = saved_bundle(tmp_path)
    (src,) = make_topics("ticks", partitions=2)
    suffix = uuid.uuid4().hex[:6]
    out, dlq = f"preds-{suffix}", f"dlq-{suffix}"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(out, 2, 1, topic_configs={"message.timestamp.after.max.ms": "60000"}),
                    NewTopic(dlq, 2, 1, topic_configs={"max.message.bytes": "4096"}),
                ]
            )
        finally:
            await admin.close()

    asyncio.run(create())
    ahead = int(time.time() * 1000) + 2 * 3_600_000  # plausible, so a valid tick
    huge = b'{"values": [1.0, 2.0], "pad": "' + b"x" * 20_000 + b'"'  # not JSON: a dead letter
    msgs: list[tuple[bytes | None, bytes | None]] = []
    for i in range(200):
        ts = ahead + i if i % 40 == 5 else EPOCH_MS + i
        msgs.append((f"s{i % 7}".encode(), json.dumps({"values": [0.1, i], "ts": ts}).encode()))
        if i % 50 == 9:
            msgs.append((b"big", huge))
    config = serve_config(model_dir, bootstrap, src, out, dlq, max_records=64)

    async def scenario() -> tuple[list[Any], list[Any], list[Any], dict[int, int]]:
        async with Server(config) as server:
            metas = await send_raw(bootstrap, src, msgs)
            outputs = await read_all(bootstrap, out, 200, timeout_s=60)
            dead = await read_all(bootstrap, dlq, 4, timeout_s=30)
            await _await_committed(bootstrap, config.group_id, src, metas, partitions=2)
            assert server.healthy()
            server.request_stop()
            await server.wait()
        committed = await committed_offsets(bootstrap, config.group_id, src, partitions=2)
        return metas, outputs, dead, committed

    metas, outputs, dead, committed = asyncio.run(scenario())
    valid = {(m.partition, m.offset) for m, (k, _) in zip(metas, msgs, strict=True) if k != b"big"}
    answered = [_source(m) for m in outputs]
    assert sorted(answered) == sorted(valid)  # each valid tick once, the far-ahead ones too
    assert len(dead) == 4
    for msg in dead:
        headers = dict(msg.headers)
        assert msg.value == huge[:1024]
        assert int(headers["streamlstm-truncated"]) == len(huge) + 3
        assert b"MessageSizeTooLarge" in headers["streamlstm-error"]
        assert headers["streamlstm-source-topic"].decode() == src
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    assert committed == ends

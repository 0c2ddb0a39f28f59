"""The stream admin API over Apache Kafka: a stream read mid-run equals the oracle at the
offset it says it reflects and, at the end, the engine's own snapshot (its changelog
record); listing, partitions, reset and delete through the API; where a stream lives
when another member holds it; the token; hostile clients."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from streamlstm import Bundle, StreamState
from streamlstm.consumers.kafka.outbox import partition_of
from streamlstm.consumers.server import Server
from streamlstm.consumers.settings import ServeConfig
from tests.consumers.conftest import read_all, send_raw
from tests.helpers.polling import await_for
from tests.helpers.serving import (
    Tick,
    http_get,
    metric_total,
    saved_bundle,
    serve_config,
    tick_messages,
)
from tests.streamlstm.oracle import expected_outputs, expected_state

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


def _serving(
    tmp_path: Path, bootstrap: str, make_topics: Any, **overrides: Any
) -> tuple[ServeConfig, str, Path]:
    """The serving tests' model on two fresh partitions (memory state unless told), the
    admin API on a free port with a new token (in ``tmp_path / "admin-token"``): the
    config, the token, the model."""
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=2)
    token = secrets.token_hex(24)
    (tmp_path / "admin-token").write_text(token + "\n")
    config = serve_config(
        model_dir, bootstrap, src, out, dlq, admin_port=0,
        admin_token_file=str(tmp_path / "admin-token"), **{"state": "memory", **overrides},
    )  # fmt: skip
    return config, token, model_dir


class Admin:
    """The daemon's admin API, asked with (or without) the token."""

    def __init__(self, session: aiohttp.ClientSession, port: int, token: str) -> None:
        self.session, self.base, self.token = session, f"http://127.0.0.1:{port}/v1", token

    async def call(
        self, method: str, path: str, token: str | None = "", **kwargs: Any
    ) -> tuple[int, Any, Any]:
        """(status, JSON body, headers); ``token`` "" is the right one, None none."""
        given = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {given}"} if given is not None else {}
        async with self.session.request(
            method, self.base + path, headers={**headers, **kwargs.pop("headers", {})}, **kwargs
        ) as response:
            text = await response.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text  # aiohttp's own answer to a request it refused
            return response.status, body, response.headers


def _stream_ticks(rng: np.random.Generator, streams: list[str], n: int) -> list[Tick]:
    return [
        (str(rng.choice(streams)), [float(rng.normal() * 5), float(rng.uniform(0, 100))], False)
        for _ in range(n)
    ]


# -- reads mid-run ---------------------------------------------------------------------


def test_a_stream_read_mid_run_equals_the_oracle_and_at_the_end_the_engines_snapshot(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """While ticks flow, each read of sensor-1 (state included) equals torch's own LSTM
    over sensor-1's ticks up to the offset the read says it reflects; once all is
    answered and checkpointed, the read equals the changelog record the engine wrote."""
    config, token, model_dir = _serving(
        tmp_path, bootstrap, make_topics, state="durable", commit_interval_ms=200, max_records=16
    )
    src, out = config.input_topic, config.output_topic
    ticks = _stream_ticks(np.random.default_rng(3), ["sensor-0", "sensor-1", "sensor-2"], 600)

    async def scenario() -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            admin = Admin(session, server.admin_port or 0, token)
            metas: list[Any] = []
            sending = asyncio.ensure_future(_send_paced(bootstrap, src, ticks, metas))
            reads = []
            while not sending.done():
                status, body, _ = await admin.call("GET", "/streams/sensor-1?include=state")
                if status == 200 and body["held"]:
                    reads.append(body)
                await asyncio.sleep(0.03)
            await sending
            await read_all(bootstrap, out, len(ticks), timeout_s=60)
            final = (await admin.call("GET", "/streams/sensor-1?include=state"))[1]
        return reads, metas, final

    reads, metas, final = asyncio.run(scenario())
    bundle = Bundle.load(model_dir)
    mine = [(m, t) for m, t in zip(metas, ticks, strict=True) if t[0] == "sensor-1"]
    assert sum(0 < r["steps"] < len(mine) for r in reads) >= 2, "too few reads mid-run"
    for body in [*reads, final]:
        _check_read(bundle, body, mine)
    assert final["steps"] == len(mine)
    # The engine's own snapshot of sensor-1: the last changelog record the daemon wrote.
    records = asyncio.run(read_all(bootstrap, str(config.changelog_topic), 10**6, timeout_s=5))
    snapshot = StreamState.from_bytes(
        [r for r in records if r.key == b"sensor-1" and r.value is not None][-1].value
    )
    assert snapshot.offset == final["offset"] and snapshot.step == final["steps"]
    for got, want in zip(
        (*final["state"]["h"], *final["state"]["c"]), (*snapshot.h, *snapshot.c), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


async def _send_paced(bootstrap: str, topic: str, ticks: list[Tick], metas: list[Any]) -> None:
    """The ticks in chunks of 20, a little apart: reads land between them."""
    for start in range(0, len(ticks), 20):
        metas += await send_raw(bootstrap, topic, tick_messages(ticks[start : start + 20], start))
        await asyncio.sleep(0.02)


def _check_read(bundle: Bundle, body: dict[str, Any], mine: list[tuple[Any, Tick]]) -> None:
    """One read of a stream against the oracle over its ticks up to the read's offset."""
    upto = [t for m, t in mine if m.offset <= body["offset"]]
    assert body["partition"] == mine[0][0].partition
    assert body["steps"] == len(upto), (body["steps"], len(upto))
    assert body["as_of"][str(body["partition"])] > body["offset"]
    x = np.array([t[1] for t in upto], np.float32)
    h, c = expected_state(bundle, x)
    for got, want in zip((*body["state"]["h"], *body["state"]["c"]), (*h, *c), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    want_y, _ = expected_outputs(bundle, ["s"] * len(x), x)
    assert abs(body["prediction"][0] - float(want_y[-1, 0])) <= 1e-5


# -- the API end to end ------------------------------------------------------------------


def test_listing_partitions_resets_and_deletes_through_the_api(
    bootstrap: str, make_topics: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The token guards every route (and never shows in a log); pages list each held
    stream once; partitions count them; a reset is applied before the stream's next tick
    and acknowledged on the output topic; a deleted stream is no longer held here."""
    caplog.set_level(logging.DEBUG)
    config, token, model_dir = _serving(tmp_path, bootstrap, make_topics)
    src, out = config.input_topic, config.output_topic
    names = [f"pump-{i}" for i in range(25)] + [f"fan-{i}" for i in range(5)]
    first: list[Tick] = [(s, [1.0, float(i)], False) for i, s in enumerate(names)]
    later: list[Tick] = [("pump-3", [2.0, 50.0], False)]

    async def scenario() -> dict[str, Any]:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            admin = Admin(session, server.admin_port or 0, token)
            await _check_the_token(admin)
            metas = await send_raw(bootstrap, src, tick_messages(first, 0))
            await read_all(bootstrap, out, len(first), timeout_s=30)
            await _check_listing(admin, names)
            status, reset, _ = await admin.call("POST", "/streams/pump-3/reset")
            assert status == 202 and reset["acknowledged"], reset
            metas += await send_raw(bootstrap, src, tick_messages(later, 100))
            status, deleted, _ = await admin.call("DELETE", "/streams/pump-4")
            assert status == 202 and deleted["control"] == "delete", deleted
            status, gone, _ = await admin.call("GET", "/streams/pump-4")
            assert status == 200 and not gone["held"], gone
            assert gone["partition"] == metas[names.index("pump-4")].partition
            assert gone["owner"]["client_id"].startswith("streamlstm-"), gone
            outputs = await read_all(bootstrap, out, len(first) + 3, timeout_s=30)
        return {"reset": reset, "outputs": outputs, "metas": metas}

    got = asyncio.run(scenario())
    bodies = [json.loads(o.value) for o in got["outputs"]]
    acks = [b for b in bodies if "control" in b]
    reset = got["reset"]
    assert {(a["control"], a["partition"], a["offset"]) for a in acks} >= {
        ("reset", reset["partition"], reset["offset"])
    }
    # After the reset pump-3 starts again from zero state.
    after = [b for b in bodies if b.get("stream") == "pump-3" and "control" not in b][-1]
    want, _ = expected_outputs(
        Bundle.load(model_dir), ["pump-3"], np.array([[2.0, 50.0]], np.float32)
    )
    assert after["step"] == 1 and abs(after["prediction"][0] - float(want[0, 0])) <= 1e-5
    assert token not in caplog.text


async def _check_the_token(admin: Admin) -> None:
    for token in (None, "wrong-" + admin.token, admin.token[:-1]):
        status, body, headers = await admin.call("GET", "/streams/x", token=token)
        assert status == 401 and body == {"error": "unauthorized"}, (status, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
    basic = {"Authorization": f"Basic {admin.token}"}
    async with admin.session.get(admin.base + "/streams/x", headers=basic) as response:
        assert response.status == 401
    status, body, _ = await admin.call("GET", "/streams/x")
    assert status == 200 and body["held"] is False
    status, body, _ = await admin.call("GET", "/streams?limit=0")
    assert status == 400 and body["error"]["field"] == "limit"


async def _check_listing(admin: Admin, names: list[str]) -> None:
    seen: list[str] = []
    cursor: str | None = "0"
    while cursor is not None:
        status, page, _ = await admin.call("GET", f"/streams?prefix=pump&limit=7&cursor={cursor}")
        assert status == 200 and len(page["streams"]) <= 7, page
        seen += page["streams"]
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(n for n in names if n.startswith("pump"))
    status, held, _ = await admin.call("GET", "/partitions")
    assert status == 200
    assert sorted(p["partition"] for p in held["partitions"]) == [0, 1]
    assert {p["state"] for p in held["partitions"]} == {"running"}
    assert sum(p["streams"] for p in held["partitions"]) == len(names)
    assert set(held["as_of"]) == {"0", "1"}


def test_a_stream_another_member_holds_is_located_and_its_reset_waits_in_vain(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """With a second member in the group, a stream of its partition is not held here:
    the API names that member, and a reset sent for it is not applied in time (504)."""
    config, token, _ = _serving(tmp_path, bootstrap, make_topics, admin_wait_s=1.0)
    src = config.input_topic

    async def scenario() -> None:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            admin = Admin(session, server.admin_port or 0, token)
            other = AIOKafkaConsumer(
                src, bootstrap_servers=bootstrap, group_id=config.group_id,
                client_id="the-other-member",
                partition_assignment_strategy=(StickyPartitionAssignor,),  # as the daemon's
            )  # fmt: skip
            await other.start()
            try:
                await await_for(_split_between(server, other), 60, "the partitions split")
                theirs = next(iter(other.assignment())).partition
                stream = next(
                    s
                    for s in (f"s{i}" for i in range(100))
                    if partition_of(s.encode(), 2) == theirs
                )
                status, where, _ = await admin.call("GET", f"/streams/{stream}")
                assert status == 200 and not where["held"] and where["partition"] == theirs
                assert where["owner"]["client_id"] == "the-other-member", where
                status, reset, _ = await admin.call("POST", f"/streams/{stream}/reset")
                assert status == 504 and reset["acknowledged"] is False, reset
                assert reset["partition"] == theirs
            finally:
                await other.stop()

    asyncio.run(scenario())


def _split_between(server: Server, other: AIOKafkaConsumer) -> Callable[[], Any]:
    async def split() -> bool:
        await asyncio.sleep(0.2)
        return len(server.assignment()) == 1 and len(other.assignment()) == 1

    return split


# -- hostile clients ----------------------------------------------------------------------


def test_hostile_admin_clients_are_cut_off_without_stalling_metrics_or_the_loop(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    """Oversized headers and bodies are refused; clients trickling a header a byte at a
    time are cut off, and meanwhile /metrics answers and ticks are answered."""
    config, token, _ = _serving(tmp_path, bootstrap, make_topics)
    src, out = config.input_topic, config.output_topic
    ticks: list[Tick] = [(f"t{i % 5}", [1.0, float(i)], False) for i in range(50)]

    async def scenario() -> None:
        async with Server(config) as server, aiohttp.ClientSession() as session:
            admin = Admin(session, server.admin_port or 0, token)
            status, _, _ = await admin.call("GET", "/streams/x", headers={"X-Big": "a" * 20_000})
            assert status in (400, 431), status
            status, _, _ = await admin.call("POST", "/streams/x/reset", data=b"z" * 200_000)
            assert status == 413, status
            slow = [asyncio.ensure_future(_trickle(server.admin_port or 0)) for _ in range(5)]
            await asyncio.sleep(0.5)
            await send_raw(bootstrap, src, tick_messages(ticks, 0))
            answered = await read_all(bootstrap, out, len(ticks), timeout_s=20)
            assert len(answered) == len(ticks)  # the loop went on
            for _ in range(3):
                status, text = await asyncio.wait_for(http_get(server.metrics_port, "/metrics"), 1)
                assert status == 200 and metric_total(text, "streamlstm_ticks_consumed") >= 50
            cut_after = await asyncio.gather(*slow)
            assert all(s < 10 for s in cut_after), cut_after  # the header timeout, not forever

    asyncio.run(scenario())


async def _trickle(port: int) -> float:
    """Send a request head a byte every 0.2 s until the server cuts the connection: the
    seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/streams HTTP/1.1\r\nHost: x\r\n")
    try:
        for _ in range(300):  # 60 s at most
            writer.write(b"X")
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break
            except TimeoutError:
                continue
            break  # an answer (an error status) also ends it
    except ConnectionError:
        pass
    finally:
        writer.close()
    return loop.time() - start


# -- the command line --------------------------------------------------------------------


def test_the_streams_command_gets_and_lists_through_the_api(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    config, _, _ = _serving(tmp_path, bootstrap, make_topics)
    token_file = str(tmp_path / "admin-token")
    src, out = config.input_topic, config.output_topic
    ticks: list[Tick] = [(f"valve/{i}", [1.0, 2.0], False) for i in range(3)]

    async def scenario() -> list[subprocess.CompletedProcess[str]]:
        async with Server(config) as server:
            await send_raw(bootstrap, src, tick_messages(ticks, 0))
            await read_all(bootstrap, out, len(ticks), timeout_s=30)
            where = ["--admin", f"http://127.0.0.1:{server.admin_port}", "--token-file"]
            runs = []
            for argv in (
                ["get", "valve/1", "--state", *where, token_file],
                ["list", "--prefix", "valve/", "--limit", "2", "--all", *where, token_file],
                ["get", "valve/1", *where, str(tmp_path / "nothing")],
                ["reset", "valve/2", *where, token_file],
            ):
                runs.append(await asyncio.to_thread(_cli, argv))
            bad = tmp_path / "bad-token"
            bad.write_text(uuid.uuid4().hex)
            runs.append(await asyncio.to_thread(_cli, ["list", *where, str(bad)]))
        return runs

    got, listed, missing, reset, refused = asyncio.run(scenario())
    assert got.returncode == 0, got.stderr
    body = json.loads(got.stdout)
    assert body["held"] and body["stream"] == "valve/1" and len(body["state"]["h"]) == 2
    assert listed.returncode == 0 and sorted(listed.stdout.split()) == [t[0] for t in ticks]
    assert missing.returncode != 0 and "nothing" in missing.stderr
    assert reset.returncode == 0 and json.loads(reset.stdout)["acknowledged"] is True
    assert refused.returncode == 1 and "401" in refused.stderr


def _cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamlstm.cli", "streams", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

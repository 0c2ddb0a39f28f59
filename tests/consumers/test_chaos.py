"""Chaos on Apache Kafka, checked against the oracle: kill -9 of the daemon and of its engine.

Every stream's every prediction (repeats included) must equal ``predict_sequence``
over the stream's whole history, with step counts that continue: a tick lost
from state, or applied twice, shows up there and nowhere else. The kill test also
serves a GRU that ``streamlstm train --cell gru`` fitted to a real series (yearly
sunspots), fed streams replaying it: its scalers, its forecast of an input and its
anomaly score's state (on an uninterrupted engine's scores) go through every kill.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlstm import Bundle
from streamlstm.consumers.devtools.apache_kafka import KafkaCluster
from tests.consumers.conftest import send_raw, start_serve
from tests.helpers.polling import wait_for
from tests.helpers.real_series import sunspot_replays, train_on_sunspots
from tests.helpers.serving import (
    Tick,
    check_against_oracle,
    check_scores_against_replay,
    committed_offsets,
    engine_child_pid,
    random_ticks,
    read_answers,
    saved_bundle,
    scraped_total,
    serve_cmd,
    tick_messages,
    wait_checkpointed,
    wait_consumed,
)

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka


def _send_slowly(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]], out: list[Any]
) -> None:
    """Send in chunks of 100, 0.1 s apart (about 1000 ticks/s); metadata in order into ``out``.

    Acknowledged by every in-sync replica, once each: with the default acks=1, a
    record the partition leader acknowledged and then lost when it was killed
    (before a follower copied it) left its offset to the next record, so the
    oracle held a tick the daemon never saw (seen once in CI on a loaded machine,
    ``test_a_broker_node_killed...``); and a retried send must not be written twice.
    """
    options = {"acks": "all", "enable_idempotence": True}
    for lo in range(0, len(messages), 100):
        out += asyncio.run(send_raw(bootstrap, topic, messages[lo : lo + 100], options))
        time.sleep(0.1)


def _holds_partitions(log: Path) -> bool:
    """The daemon logging to ``log`` was last assigned some partitions."""
    assigned = re.findall(r"partitions assigned: \[(.*)\]", log.read_text(errors="replace"))
    return bool(assigned and assigned[-1])


GUARANTEES = pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])


def _check_repeats(guarantee: str, by_tick: dict[Any, list[Any]], ticks: int) -> None:
    repeats = sum(len(v) - 1 for v in by_tick.values())
    if guarantee == "exactly-once":
        assert repeats == 0, f"{repeats} ticks answered twice for a read_committed consumer"
    else:
        assert repeats < ticks  # some ticks are answered again after a kill, never all


KILLS = ("daemon", "engine", "daemon", "daemon", "engine")
#: A GRU that ``streamlstm train --cell gru`` fitted to yearly sunspots, fed streams
#: replaying that series (the others: random weights, random ticks).
TRAINED_GRU = "gru-trained-on-sunspots"


def _model_and_waves(
    tmp_path: Path, model: str, rng: np.random.Generator, kills: tuple[str, ...] = KILLS
) -> tuple[Path, Iterator[list[Tick]], float]:
    """The bundle to serve, one wave of ticks per kill (drawn when asked for), and the
    oracle's tolerance (predictions in the hundreds: float32 summed in another order)."""
    if model != TRAINED_GRU:
        waves = (random_ticks(rng, streams=120, n=1500) for _ in kills)
        return saved_bundle(tmp_path, model), waves, 1e-5
    model_dir = train_on_sunspots(tmp_path, "gru")
    bundle = Bundle.load(model_dir)
    assert bundle.config.cell == "gru" and bundle.outputs.target_feature == 0
    # Trained, not a dummy: well below persistence's error on the test part.
    assert bundle.metrics["rmse_over_persistence"] < 0.7, bundle.metrics
    # Twelve streams replaying the series twice (7416 ticks): five waves of ~1500.
    ticks = sunspot_replays(rng, streams=12, replays=2)
    size = -(-len(ticks) // len(kills))
    return model_dir, (ticks[lo : lo + size] for lo in range(0, len(ticks), size)), 1e-3


#: Room for 16 streams of the 120 a wave ticks, the rest on local disk (docs/cold-tier.md):
#: most ticks read their stream back from disk, and the restore at each start writes all
#: but 16 streams straight to disk.
COLD_ROOM = 16
#: With a cold tier, three kills (the daemon's, its engine's, the daemon's again): CI time.
COLD_KILLS = KILLS[:3]


def _tier_args(tier: str, tmp_path: Path) -> tuple[tuple[str, ...], list[str]]:
    """The kills and the ``serve`` options of the tier: memory alone, or a cold tier (one
    state dir that every restart opens again, as a restarted daemon on its volume does)."""
    if tier == "memory":
        return KILLS, []
    room = str(COLD_ROOM)  # and polls of at most as many ticks (max_records <= max_streams)
    state_dir = str(tmp_path / "state")
    return COLD_KILLS, ["--state-dir", state_dir, "--max-streams", room, "--max-records", room]


#: What a daemon with a state dir counts, summed over its lives (``_scrape_cold``).
COLD_FIGURES = (
    "streamlstm_ticks_consumed",
    "streamlstm_cold_hits",
    "streamlstm_restore_local_streams",
    "streamlstm_local_checkpoint_records",
)


def _scrape_cold(port: int, used: dict[str, float]) -> None:
    """Add the daemon's figures so far (before its kill) to ``used``: ticks consumed,
    streams read back from the cold tier, states restored from local checkpoints and
    records written to them."""
    for name in COLD_FIGURES:
        used[name] = used.get(name, 0.0) + scraped_total(port, name)


@pytest.mark.parametrize(
    ("guarantee", "model", "tier"),
    [
        ("at-least-once", "lstm", "memory"),
        ("exactly-once", "lstm", "memory"),
        ("exactly-once", "gru", "memory"),
        ("exactly-once", TRAINED_GRU, "memory"),
        # at-least-once with a cold tier passes too (66 s on a 2-core machine): left out of
        # CI for its time; exactly-once is the stricter (no tick answered twice).
        ("exactly-once", "lstm", "cold"),
    ],
)
def test_kill_9_of_the_daemon_and_of_its_engine_loses_no_tick_and_doubles_none(
    bootstrap: str, make_topics: Any, tmp_path: Path, guarantee: str, model: str, tier: str
) -> None:
    """Five kill -9s of the daemon or its engine child mid-stream, restarts, every answer
    on the oracle (torch's own LSTM or GRU) over each stream's whole history; a trained
    GRU's anomaly scores on an uninterrupted engine's. With a cold tier, in room for 16
    of 120 streams: the kills come mid-checkpoint and mid-read from disk."""
    rng = np.random.default_rng(77)
    kills, tier_args = _tier_args(tier, tmp_path)
    model_dir, waves, atol = _model_and_waves(tmp_path, model, rng, kills)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    # Static membership: a restarted instance takes its partitions back at once.
    cmd += ["--state", "durable", "--commit-interval-ms", "250", "--group-instance-id", "chaos"]
    cmd += ["--guarantee", guarantee, *tier_args]
    ticks: list[tuple[str, list[float], bool]] = []
    metas: list[Any] = []
    used: dict[str, float] = {}
    for round_, (victim, wave) in enumerate(zip(kills, waves, strict=True)):
        proc, port = start_serve(cmd, tmp_path / f"serve-{round_}.log")
        try:
            # The producer keeps sending while the kill comes (mid-stream, mid-checkpoint).
            sent: list[Any] = []
            sender = threading.Thread(
                target=_send_slowly, args=(bootstrap, src, tick_messages(wave, len(ticks)), sent)
            )
            sender.start()
            # Mid-stream: once this daemon has consumed a random number of ticks and
            # committed a checkpoint of its own (killed before its first, a restart that
            # replays its backlog faster than it checkpoints would replay it again each
            # round, and nothing would move), then anywhere in the next two checkpoint
            # intervals, mid-checkpoint included: a jitter that places the fault, the
            # oracle below decides the outcome.
            at = int(rng.integers(100, 1200))
            wait_consumed(port, at)
            wait_checkpointed(port)
            time.sleep(float(rng.uniform(0.0, 0.5)))
            _scrape_cold(port, used)
            target = proc.pid if victim == "daemon" else engine_child_pid(proc.pid)
            os.kill(target, signal.SIGKILL)
            sender.join()
            metas += sent
            ticks += wave
            proc.wait(timeout=60)
            assert proc.returncode != 0, f"round {round_}: the daemon survived its {victim}"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    final = start_serve(cmd, tmp_path / "serve-final.log")[0]
    try:
        outputs = read_answers(bootstrap, out, metas, guarantee, group, src)
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(timeout=60)
    assert final.returncode == 0
    by_tick = check_against_oracle(model_dir, ticks, metas, outputs, atol)
    _check_repeats(guarantee, by_tick, len(ticks))
    if model == TRAINED_GRU:
        assert check_scores_against_replay(model_dir, ticks, metas, by_tick) > len(ticks) // 2
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    assert asyncio.run(committed_offsets(bootstrap, group, src)) == ends
    if tier == "cold":  # the cold tier served: many ticks' streams were read back from disk
        consumed, hits = used["streamlstm_ticks_consumed"], used["streamlstm_cold_hits"]
        assert hits > consumed / 4, used
        # ... and the restarts after the first restored from their local checkpoints (as
        # of their last flush: a kill -9 loses the rest, which the changelog's tail has).
        assert used["streamlstm_local_checkpoint_records"] > 0, used
        assert used["streamlstm_restore_local_streams"] > 0, used


@GUARANTEES
def test_a_group_scaling_out_and_in_with_a_kill_moves_every_stream_with_its_state(
    bootstrap: str, make_topics: Any, tmp_path: Path, guarantee: str
) -> None:
    rng = np.random.default_rng(78)
    model_dir = saved_bundle(tmp_path)
    src, out, dlq = make_topics("ticks", "preds", "dlq", partitions=6)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
    cmd += ["--state", "durable", "--commit-interval-ms", "250", "--guarantee", guarantee]
    ticks: list[tuple[str, list[float], bool]] = []
    metas: list[Any] = []

    def wave(n: int = 1200) -> threading.Thread:
        batch = random_ticks(rng, streams=90, n=n)
        messages = tick_messages(batch, len(ticks))
        ticks.extend(batch)
        sent: list[Any] = []
        thread = threading.Thread(target=_send_slowly, args=(bootstrap, src, messages, sent))
        thread.start()
        waves.append((thread, sent))
        return thread

    waves: list[tuple[threading.Thread, list[Any]]] = []
    members: dict[str, subprocess.Popen[bytes]] = {}
    try:
        members["a"] = start_serve(cmd, tmp_path / "a.log")[0]
        wave().join()
        # Scale out to three while ticks flow: partitions move, with their streams' state.
        sending = wave()
        members["b"], port_b = start_serve(cmd, tmp_path / "b.log")
        members["c"] = start_serve(cmd, tmp_path / "c.log")[0]
        sending.join()
        logs = [tmp_path / f"{member}.log" for member in "abc"]
        wait_for(lambda: all(map(_holds_partitions, logs)), 90, "every member's partitions")
        before = scraped_total(port_b, "streamlstm_ticks_consumed")
        sending = wave()
        wait_consumed(port_b, before + 1)  # b is killed while it serves the new wave
        os.kill(members["b"].pid, signal.SIGKILL)  # its partitions go on from the changelog
        members.pop("b").wait(timeout=60)
        sending.join()
        sending = wave()
        members["c"].send_signal(signal.SIGTERM)  # scale in: a clean leave
        assert members.pop("c").wait(timeout=60) == 0
        sending.join()
        for thread, sent in waves:
            thread.join()
            metas += sent
        outputs = read_answers(bootstrap, out, metas, guarantee, group, src)
    finally:
        for proc in members.values():
            proc.send_signal(signal.SIGTERM)
        for proc in members.values():
            proc.wait(timeout=60)
    assert all(proc.returncode == 0 for proc in members.values())
    by_tick = check_against_oracle(model_dir, ticks, metas, outputs)
    _check_repeats(guarantee, by_tick, len(ticks))
    restored = sum(
        "restored" in line and " 0 streams" not in line
        for log in tmp_path.glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
    )
    assert restored > 0, "no partition moved with its streams' state"


@pytest.mark.cluster
@GUARANTEES
def test_a_broker_node_killed_and_restarted_mid_stream_loses_nothing(
    tmp_path: Path, guarantee: str
) -> None:
    rng = np.random.default_rng(79)
    model_dir = saved_bundle(tmp_path)
    suffix = uuid.uuid4().hex[:6]
    src, out, dlq = f"ticks-{suffix}", f"preds-{suffix}", f"dlq-{suffix}"
    with KafkaCluster(nodes=3) as cluster:
        bootstrap = cluster.bootstrap

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(t, 4, 3) for t in (src, out, dlq)])
            finally:
                await admin.close()

        asyncio.run(create())
        group = f"g-{uuid.uuid4().hex[:8]}"
        cmd = serve_cmd(model_dir, bootstrap, src, out, dlq, group)
        cmd += ["--state", "durable", "--commit-interval-ms", "250"]
        cmd += ["--changelog-replication-factor", "3", "--guarantee", guarantee]
        proc = start_serve(cmd, tmp_path / "serve.log")[0]
        ticks = random_ticks(rng, streams=60, n=2000)
        metas: list[Any] = []
        try:
            sender = threading.Thread(
                target=_send_slowly, args=(bootstrap, src, tick_messages(ticks, 0), metas)
            )
            sender.start()
            time.sleep(0.8)
            cluster.kill(2)  # SIGKILL, data kept: two of three keep serving (min ISR 2)
            time.sleep(3.0)
            cluster.restart(2)
            sender.join()
            outputs = read_answers(bootstrap, out, metas, guarantee, group, src)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        assert proc.returncode == 0
        by_tick = check_against_oracle(model_dir, ticks, metas, outputs)
        _check_repeats(guarantee, by_tick, len(ticks))

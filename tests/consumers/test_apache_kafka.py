"""Apache Kafka as the local broker: transactions with aiokafka, node faults, the CLI.

Real brokers only (JVMs started from the jars in the Kafka cache); without
Java or Maven these tests fail, they never skip. The 3-node tests are marked
``cluster`` (``pytest -m "not cluster"`` leaves them out).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient

from streamlstm.consumers.devtools.apache_kafka import KAFKA_VERSION, KafkaCluster, kafka_libs
from streamlstm.consumers.devtools.brokers import local_broker
from streamlstm.consumers.devtools.tansu import free_port
from streamlstm.errors import BrokerError


@pytest.fixture(scope="module")
def kafka() -> Iterator[KafkaCluster]:
    with KafkaCluster(nodes=1) as cluster:
        yield cluster


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _create(bootstrap: str, topic: str, partitions: int, replicas: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replicas)])
    finally:
        await admin.close()


async def _read_to_end(
    bootstrap: str, topic: str, partitions: int, *, isolation_level: str, timeout_s: float = 60.0
) -> list[Any]:
    """Every record a fresh consumer gets until its position reaches each partition's end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation_level,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        # read_committed consumers stop at the last stable offset; ours are all decided.
        ends = await consumer.end_offsets(parts)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any([await consumer.position(tp) < ends[tp] for tp in parts]):
            assert time.monotonic() < deadline, f"read {len(out)} records, not at the end"
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def _all_in_sync(bootstrap: str, topic: str, node: int) -> bool:
    """Whether ``node`` is in the in-sync replicas of every partition of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return bool(described["partitions"]) and all(node in p["isr"] for p in described["partitions"])


def test_transactions_commit_and_abort(kafka: KafkaCluster) -> None:
    """Consume-transform-produce in transactions: commit one, abort one (aiokafka, Kafka 4.x)."""
    assert kafka.version == KAFKA_VERSION
    source, sink, group = _name("src"), _name("out"), _name("grp")

    async def main() -> None:
        await _create(kafka.bootstrap, source, 1, 1)
        await _create(kafka.bootstrap, sink, 2, 1)
        plain = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
        await plain.start()
        try:
            for i in range(10):
                await plain.send_and_wait(source, f"in-{i}".encode(), partition=0)
        finally:
            await plain.stop()

        consumer = AIOKafkaConsumer(
            source,
            bootstrap_servers=kafka.bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap, transactional_id=_name("txn")
        )
        await consumer.start()
        await producer.start()
        try:
            got: list[Any] = []
            deadline = time.monotonic() + 60
            while len(got) < 10:
                assert time.monotonic() < deadline, f"consumed {len(got)} of 10"
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    got.extend(records)
            tp = TopicPartition(source, 0)
            # The committed transaction: records 0-4 and the group offset after them.
            async with producer.transaction():
                for record in got[:5]:
                    await producer.send(sink, b"committed:" + record.value, key=record.value)
                await producer.send_offsets_to_transaction({tp: got[4].offset + 1}, group)
            # The aborted one: records 5-9 and an offset that must never count.
            await producer.begin_transaction()
            futures = [
                await producer.send(sink, b"aborted:" + record.value, key=record.value)
                for record in got[5:]
            ]
            await asyncio.gather(*futures)  # written to the log before the abort
            await producer.send_offsets_to_transaction({tp: got[9].offset + 1}, group)
            await producer.abort_transaction()
        finally:
            await producer.stop()
            await consumer.stop()

        committed = await _read_to_end(kafka.bootstrap, sink, 2, isolation_level="read_committed")
        assert sorted(r.value for r in committed) == [
            f"committed:in-{i}".encode() for i in range(5)
        ]
        everything = await _read_to_end(
            kafka.bootstrap, sink, 2, isolation_level="read_uncommitted"
        )
        assert sorted(r.value for r in everything if r.value.startswith(b"aborted:")) == [
            f"aborted:in-{i}".encode() for i in range(5, 10)
        ]

        check = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False
        )
        await check.start()
        try:
            assert await check.committed(tp) == got[4].offset + 1 == 5
        finally:
            await check.stop()

    asyncio.run(main())


def test_pause_and_resume(kafka: KafkaCluster) -> None:
    """A paused (SIGSTOPped) node answers nothing; resumed, it serves again."""
    topic = _name("pause")

    async def metadata_answers() -> bool:
        client = AIOKafkaClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=1500)
        try:
            await client.bootstrap()
            return True
        except Exception:
            return False
        finally:
            await client.close()

    async def main() -> None:
        await _create(kafka.bootstrap, topic, 1, 1)
        pid = kafka.node_pids[1]
        kafka.pause(1)
        try:
            assert kafka.node_pids[1] == pid
            assert not await metadata_answers()
        finally:
            kafka.resume(1)
        assert await metadata_answers()
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"after resume")
        finally:
            await producer.stop()
        records = await _read_to_end(kafka.bootstrap, topic, 1, isolation_level="read_uncommitted")
        assert [r.value for r in records] == [b"after resume"]

    asyncio.run(main())


@pytest.mark.broker  # starts Apache Kafka (or Maven) itself
def test_a_data_dir_keeps_topics_and_records_across_runs(tmp_path: Path) -> None:
    """``data_dir`` given: stop() keeps it, and a new cluster on it (new ports) has the data."""
    topic = _name("kept")

    async def write(bootstrap: str) -> None:
        await _create(bootstrap, topic, 1, 1)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"kept")
        finally:
            await producer.stop()

    with KafkaCluster(nodes=1, data_dir=tmp_path / "kafka") as first:
        asyncio.run(write(first.bootstrap))
    assert (tmp_path / "kafka" / "node-1" / "data" / "meta.properties").is_file()
    with KafkaCluster(nodes=1, data_dir=tmp_path / "kafka") as second:
        records = asyncio.run(
            _read_to_end(second.bootstrap, topic, 1, isolation_level="read_uncommitted")
        )
    assert [r.value for r in records] == [b"kept"]


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """Outgoing connections take their ports from the ephemeral range; a broker's port
    chosen there could be taken in the seconds before the JVM binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.broker  # starts Apache Kafka (or Maven) itself
def test_start_failure_names_the_cause(tmp_path: Path) -> None:
    """A node that cannot start raises BrokerError with its log's tail (here: port taken)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = KafkaCluster(nodes=1, port=port, data_dir=tmp_path / "kafka")
        with pytest.raises(BrokerError, match="node 1") as info:
            cluster.start()
    assert "Address already in use" in str(info.value)
    assert cluster.node_pids == {1: None}


def test_missing_java_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="Java"):
        KafkaCluster(nodes=1, data_dir=tmp_path / "kafka").start()
    with pytest.raises(BrokerError, match="Tansu runs a single node"):
        local_broker("auto", nodes=3)


@pytest.mark.broker  # starts Apache Kafka (or Maven) itself
def test_jars_download_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMLSTM_KAFKA_CACHE", str(tmp_path))
    libs = kafka_libs()
    assert libs == tmp_path / KAFKA_VERSION / "libs"
    names = {p.name for p in libs.iterdir()}
    assert f"kafka_2.13-{KAFKA_VERSION}.jar" in names
    assert any(n.startswith("log4j-slf4j-impl-") for n in names)  # the broker's log binding
    assert "downloading Apache Kafka" in capsys.readouterr().err
    assert kafka_libs() == libs
    assert capsys.readouterr().err == ""  # once
    assert [p.name for p in (tmp_path / KAFKA_VERSION).iterdir()] == ["libs"]


def test_a_failed_download_leaves_no_half_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"  # writes part of the jars, then fails as a dropped network would
    mvn.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in -DoutputDirectory=*) d="${a#-DoutputDirectory=}";; '
        "esac; done\n"
        'mkdir -p "$d" && echo partial > "$d/kafka-clients.jar"\n'
        "echo '[ERROR] Could not transfer artifact (simulated)'; exit 1\n"
    )
    mvn.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("STREAMLSTM_KAFKA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BrokerError, match=r"Maven could not resolve(.|\n)*simulated"):
        kafka_libs()
    assert list((tmp_path / "cache" / KAFKA_VERSION).iterdir()) == []
    mvn.unlink()
    with pytest.raises(BrokerError, match="Maven"):
        kafka_libs()
    with pytest.raises(BrokerError, match=r"4\.x"):
        kafka_libs("3.9.1")


@pytest.mark.cluster
def test_node_killed_and_restarted_loses_no_acknowledged_record() -> None:
    """RF 3, min ISR 2, acks=all: SIGKILL the leader of partition 0 mid-stream, restart it.

    Writes go on while it is down (every partition takes new acknowledged
    records after the kill), and every acknowledged record is read back.
    """
    topic = _name("faults")
    with KafkaCluster(nodes=3) as cluster:

        async def main() -> None:
            await _create(cluster.bootstrap, topic, 3, 3)
            producer = AIOKafkaProducer(
                bootstrap_servers=cluster.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                request_timeout_ms=10_000,
            )
            await producer.start()
            acked: dict[int, tuple[int, float]] = {}  # record number -> (partition, ack time)
            failed: list[BaseException] = []
            pending: set[asyncio.Future[Any]] = set()
            stop = asyncio.Event()

            def on_done(number: int, fut: asyncio.Future[Any]) -> None:
                pending.discard(fut)
                if fut.cancelled():
                    return
                exc = fut.exception()
                if exc is None:
                    acked[number] = (fut.result().partition, time.monotonic())
                else:
                    failed.append(exc)

            async def produce() -> None:
                number = 0
                while not stop.is_set():
                    fut = await producer.send(topic, str(number).encode(), partition=number % 3)
                    pending.add(fut)
                    fut.add_done_callback(lambda f, n=number: on_done(n, f))
                    number += 1
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(produce())
            try:
                await asyncio.sleep(2)
                victim = producer.client.cluster.leader_for_partition(TopicPartition(topic, 0))
                assert victim in (1, 2, 3)
                before = len(acked)
                assert before > 50, f"only {before} records acknowledged before the kill"
                killed_at = time.monotonic()
                cluster.kill(victim)
                # Down until every partition (the victim's after failover) took new acks.
                deadline = killed_at + 90
                while {p for p, at in acked.values() if at > killed_at + 0.5} != {0, 1, 2}:
                    assert time.monotonic() < deadline, "writes did not continue with a node down"
                    await asyncio.sleep(0.25)
                assert cluster.node_pids[victim] is None
                restarted_at = time.monotonic()
                await asyncio.to_thread(cluster.restart, victim)
                await asyncio.sleep(2)
            finally:
                stop.set()
                await task
                await producer.flush()
                await producer.stop()
            assert not pending
            during = [n for n, (_, at) in acked.items() if killed_at < at < restarted_at]
            assert during, "no record was acknowledged while the node was down"

            # The restarted node catches up: back in every partition's in-sync replicas.
            deadline = time.monotonic() + 60
            while not await _all_in_sync(cluster.bootstrap, topic, victim):
                assert time.monotonic() < deadline, f"node {victim} did not rejoin the ISRs"
                await asyncio.sleep(0.5)

            records = await _read_to_end(
                cluster.bootstrap, topic, 3, isolation_level="read_uncommitted"
            )
            read = {int(r.value) for r in records}
            lost = sorted(set(acked) - read)
            assert not lost, f"{len(lost)} acknowledged records lost, e.g. {lost[:10]}"
            assert len(records) == len(read), "duplicates despite the idempotent producer"
            print(
                f"killed node {victim}: {len(acked)} acknowledged ({len(during)} while down), "
                f"{len(failed)} failed sends, {len(records)} read back"
            )

        asyncio.run(main())


@pytest.mark.cluster
def test_broker_cli_runs_three_nodes(tmp_path: Path) -> None:
    """``streamlstm broker --nodes 3``: one bootstrap line, RF 3 topics work, SIGTERM stops all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlstm.consumers.devtools.brokers", "--nodes", "3"],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("wb"),
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # blocks until the cluster serves (or exits)
        assert line.startswith("bootstrap="), (line, (tmp_path / "stderr").read_text())
        bootstrap = line.strip().removeprefix("bootstrap=")
        addresses = bootstrap.split(",")
        assert len(addresses) == 3
        topic = _name("cli")

        async def main() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                assert len((await admin.describe_cluster())["brokers"]) == 3
                await admin.create_topics([NewTopic(topic, 1, 3)])
            finally:
                await admin.close()
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
            await producer.start()
            try:
                for i in range(20):
                    await producer.send_and_wait(topic, str(i).encode())
            finally:
                await producer.stop()
            records = await _read_to_end(bootstrap, topic, 1, isolation_level="read_uncommitted")
            assert [int(r.value) for r in records] == list(range(20))

        asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == b""  # the bootstrap line was the only one
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for address in addresses:  # every node's JVM is gone
        host, port = address.split(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()

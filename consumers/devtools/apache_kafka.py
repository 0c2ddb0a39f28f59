"""Apache Kafka as a local broker for the tests, the bench and the demo (KRaft, on loopback).

``KafkaCluster(nodes=3)`` runs one JVM per node, each a combined
broker+controller (``process.roles=broker,controller``) with its own listener
and controller port and a static controller quorum. The broker's jars come
from Maven Central on first use: a tiny pom resolved with
``mvn dependency:copy-dependencies`` into ``$STREAMLSTM_KAFKA_CACHE/<version>/libs``
(default ``~/.cache/streamlstm/kafka/<version>/libs``), so Java 17 and Maven are
all it needs. Fault injection for tests: ``kill(node)`` (SIGKILL, data kept),
``restart(node)``, ``pause(node)`` (SIGSTOP), ``resume(node)`` (SIGCONT).

Kafka 4.4.0 is the version shipped: aiokafka 0.14's transactional producer
(InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit,
EndTxn) works against it, with the broker's default ``transaction.version=2``
(tests/consumers/test_apache_kafka.py proves the round trip).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from streamlstm.consumers.devtools.kafka_jars import (
    JVM_OPTIONS,
    KAFKA_VERSION,
    LOG4J2_PROPERTIES,
    kafka_libs,
    need,
)
from streamlstm.consumers.devtools.kafka_probe import (
    CAN_DIE_WITH_PARENT,
    brokers_seen,
    die_with_parent,
)
from streamlstm.consumers.devtools.tansu import free_port
from streamlstm.errors import BrokerError

__all__ = ["JVM_OPTIONS", "KAFKA_VERSION", "KafkaCluster", "kafka_libs"]


def _cluster_id() -> str:
    while True:  # Kafka's own rule: no id starting with '-' (it reads as an option)
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / "kafka.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


#: Clusters with JVMs running: stopped at interpreter exit if their owner did not.
_LIVE: set[KafkaCluster] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop(timeout_s=5.0)


class KafkaCluster:
    """``with KafkaCluster(nodes=3) as cluster: cluster.bootstrap``.

    Node ids run from 1 to ``nodes``. ``port`` is node 1's listener port (node
    k listens on ``port + k - 1``); by default every port is a free one.
    Replication defaults follow the size: ``default.replication.factor``,
    ``offsets.topic.replication.factor`` and
    ``transaction.state.log.replication.factor`` are ``min(3, nodes)``,
    ``min.insync.replicas`` is 2 from three nodes on. Topics are never created
    automatically. ``data_dir`` keeps the data (and is reused when it already
    holds a formatted cluster); without it a temporary directory is removed
    by ``stop()``.
    """

    def __init__(
        self,
        *,
        nodes: int = 1,
        port: int | None = None,
        data_dir: str | Path | None = None,
        version: str = KAFKA_VERSION,
        heap: str | None = None,
        start_timeout_s: float = 120.0,
        jvm_options: Sequence[str] = JVM_OPTIONS,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be at least 1")
        self.nodes = nodes
        self.version = version
        self.heap = heap or ("-Xmx512m" if nodes == 1 else "-Xmx384m")
        self.start_timeout_s = start_timeout_s
        self.jvm_options = tuple(jvm_options)
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="streamlstm-kafka-"))
            if data_dir is None
            else Path(data_dir).absolute()
        )
        self._nodes = [
            _Node(
                node_id=k,
                port=(port + k - 1) if port else free_port(),
                controller_port=free_port(),
                directory=self.data_dir / f"node-{k}",
            )
            for k in range(1, nodes + 1)
        ]
        self.bootstrap = ",".join(node.address for node in self._nodes)
        self._libs: Path | None = None
        self._java: str | None = None

    # -- configuration ------------------------------------------------------

    def _properties(self, node: _Node) -> str:
        replicas = min(3, self.nodes)
        min_isr = 2 if self.nodes >= 3 else 1
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self._nodes)
        props = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.quorum.voters": voters,
            "log.dirs": node.directory / "data",
            "num.partitions": 1,
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.num.partitions": 10,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "min.insync.replicas": min_isr,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "false",
            "log.cleaner.enable": "true",
            # The cleaner's buffer is heap: 128 MiB by default, too much beside -Xmx384m.
            "log.cleaner.dedupe.buffer.size": 16 << 20,
            # Keep everything: outputs carry their ticks' event time as record time, and
            # replayed or test data from years ago would be deleted at the first retention
            # check (30 s after start) under the default 7 days.
            "log.retention.ms": -1,
            "num.network.threads": 2,
            "num.io.threads": 4,
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def _prepare(self) -> None:
        self._java = need("java", "Java 17 or newer")
        self._libs = kafka_libs(self.version)
        metas = [n.directory / "data" / "meta.properties" for n in self._nodes]
        cluster_id = _cluster_id()
        for meta in metas:  # reuse an existing cluster's id (data_dir given twice)
            if meta.is_file():
                for line in meta.read_text().splitlines():
                    if line.startswith("cluster.id="):
                        cluster_id = line.split("=", 1)[1].strip()
        formats: list[tuple[_Node, subprocess.Popen[bytes]]] = []
        for node, meta in zip(self._nodes, metas, strict=True):
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "server.properties").write_text(self._properties(node))
            (node.directory / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
            if meta.is_file():
                continue
            with node.log.open("ab") as log:
                formats.append(
                    (
                        node,
                        subprocess.Popen(
                            [
                                *self._command("kafka.tools.StorageTool", node),
                                "format",
                                "-t",
                                cluster_id,
                                "-c",
                                str(node.directory / "server.properties"),
                            ],
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        ),
                    )
                )
        for node, proc in formats:
            if proc.wait(timeout=self.start_timeout_s) != 0:
                raise BrokerError(
                    f"formatting Kafka node {node.node_id}'s storage failed "
                    f"(exit {proc.returncode}):\n{node.tail()}"
                )

    def _command(self, main_class: str, node: _Node) -> list[str]:
        assert self._java is not None and self._libs is not None
        return [
            self._java,
            *self.jvm_options,
            self.heap,
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
            "-cp",
            str(self._libs / "*"),
            main_class,
        ]

    # -- processes ----------------------------------------------------------

    def _spawn(self, node: _Node) -> None:
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen(
                [*self._command("kafka.Kafka", node), str(node.directory / "server.properties")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.directory,
                preexec_fn=(
                    # Only from the main thread: a worker thread's end would kill the JVM.
                    die_with_parent
                    if CAN_DIE_WITH_PARENT and threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        node.paused = False
        _LIVE.add(self)

    def _wait_serving(self, nodes: list[_Node], what: str) -> None:
        """Until each of ``nodes`` answers metadata listing every running, unpaused node."""
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(nodes)
        while pending:
            for node in list(pending):
                if not node.running():
                    code = node.proc.returncode if node.proc is not None else None
                    raise BrokerError(
                        f"Kafka node {node.node_id} exited (code {code}) during {what}:\n"
                        f"{node.tail()}"
                    )
                expected = {n.node_id for n in self._nodes if n.running() and not n.paused}
                seen = brokers_seen(node.address)
                if seen is not None and expected <= seen:
                    pending.remove(node)
            if not pending:
                return
            if time.monotonic() > deadline:
                node = pending[0]
                raise BrokerError(
                    f"Kafka node {node.node_id} did not serve on {node.address} within "
                    f"{self.start_timeout_s:.0f} s ({what}):\n{node.tail()}"
                )
            time.sleep(0.25)

    def start(self) -> KafkaCluster:
        """Start every node; returns once each answers metadata listing all of them."""
        try:
            self._prepare()
            for node in self._nodes:
                self._spawn(node)
            self._wait_serving(self._nodes, "start-up")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every JVM (SIGTERM, SIGKILL after ``timeout_s``); remove a temporary data dir."""
        running = [n for n in self._nodes if n.running()]
        for node in running:
            assert node.proc is not None
            with contextlib.suppress(ProcessLookupError):
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for node in running:
            assert node.proc is not None
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        for node in self._nodes:
            node.proc = None
            node.paused = False
        _LIVE.discard(self)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- fault injection ----------------------------------------------------

    def _node(self, node: int) -> _Node:
        if not 1 <= node <= self.nodes:
            raise ValueError(f"node must be in 1..{self.nodes}, not {node}")
        return self._nodes[node - 1]

    def kill(self, node: int) -> None:
        """SIGKILL one node (its data stays for ``restart``)."""
        target = self._node(node)
        if target.proc is not None and target.proc.poll() is None:
            target.proc.kill()
            target.proc.wait()
        target.paused = False

    def restart(self, node: int) -> None:
        """Start a killed (or still running: it is killed first) node again, same ports and data.

        Returns once it answers metadata listing every running, unpaused node.
        """
        target = self._node(node)
        self.kill(node)
        self._spawn(target)
        self._wait_serving([target], f"restart of node {node}")

    def pause(self, node: int) -> None:
        """SIGSTOP one node: its connections stay open but nothing answers."""
        target = self._node(node)
        if target.proc is None or target.proc.poll() is not None:
            raise BrokerError(f"Kafka node {node} is not running")
        target.proc.send_signal(signal.SIGSTOP)
        target.paused = True

    def resume(self, node: int) -> None:
        """SIGCONT a paused node."""
        target = self._node(node)
        if target.proc is not None and target.proc.poll() is None:
            target.proc.send_signal(signal.SIGCONT)
        target.paused = False

    @property
    def node_pids(self) -> dict[int, int | None]:
        """Node id -> the pid of its JVM (None when not running)."""
        return {n.node_id: n.proc.pid if n.running() and n.proc else None for n in self._nodes}

    def node_bootstrap(self, node: int) -> str:
        """One node's own ``127.0.0.1:PORT``."""
        return self._node(node).address

    def log_tail(self, node: int, lines: int = 40) -> str:
        """The last lines of one node's log (stdout and stderr of its JVM)."""
        return self._node(node).tail(lines)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

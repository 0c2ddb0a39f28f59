"""The one local-broker launcher: Apache Kafka where Java is installed, else Tansu.

``local_broker()`` is what the tests, the bench and the demo start;
``streamlstm broker`` runs one from the command line until SIGINT/SIGTERM,
printing a single ``bootstrap=HOST:PORT[,HOST:PORT...]`` line on stdout
(everything else goes to stderr), so scripts can read the address::

    streamlstm broker --nodes 3 | head -1
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from streamlstm.consumers.devtools.apache_kafka import KafkaCluster
from streamlstm.consumers.devtools.tansu import TansuBroker
from streamlstm.errors import BrokerError

__all__ = ["KINDS", "describe", "local_broker", "main"]

KINDS = ("auto", "kafka", "tansu")


def local_broker(
    kind: str = "auto",
    *,
    nodes: int = 1,
    port: int | None = None,
    data_dir: str | Path | None = None,
) -> KafkaCluster | TansuBroker:
    """A broker, not started yet: ``with local_broker() as broker: broker.bootstrap``.

    ``kind``: ``"kafka"`` (Apache Kafka, KRaft, jars from Maven Central on
    first use), ``"tansu"`` (memory only, one node) or ``"auto"`` (Kafka when
    ``java`` is on PATH, else Tansu).
    """
    if kind not in KINDS:
        raise BrokerError(f"unknown broker kind {kind!r} (choose from {', '.join(KINDS)})")
    if nodes < 1:
        raise BrokerError(f"nodes must be at least 1, not {nodes}")
    if kind == "auto":
        kind = "kafka" if shutil.which("java") else "tansu"
    if kind == "kafka":
        return KafkaCluster(nodes=nodes, port=port, data_dir=data_dir)
    if nodes > 1:
        raise BrokerError(
            f"Tansu runs a single node: {nodes} nodes need Apache Kafka "
            "(install Java 17 and Maven, and use --kind kafka)"
        )
    if data_dir is not None:
        raise BrokerError("Tansu keeps its data in memory only: --data-dir needs --kind kafka")
    return TansuBroker(port=port)


def describe(broker: KafkaCluster | TansuBroker) -> str:
    if isinstance(broker, KafkaCluster):
        return f"Apache Kafka {broker.version}, {broker.nodes} node(s), data in {broker.data_dir}"
    return "Tansu (memory only)"


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["broker"]:  # dispatched from `streamlstm broker ...`
        args_in = args_in[1:]
    parser = argparse.ArgumentParser(
        prog="streamlstm broker",
        description="Run a local Kafka broker until SIGINT/SIGTERM; prints "
        "'bootstrap=HOST:PORT[,...]' as the only line on stdout.",
    )
    parser.add_argument("--kind", choices=KINDS, default="auto", help="default: %(default)s")
    parser.add_argument("--nodes", type=int, default=1, help="Kafka nodes (default: 1)")
    parser.add_argument("--port", type=int, default=None, help="node 1's port (default: free)")
    parser.add_argument("--data-dir", default=None, help="keep Kafka's data here (default: temp)")
    args = parser.parse_args(args_in)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker = local_broker(args.kind, nodes=args.nodes, port=args.port, data_dir=args.data_dir)
        print(f"starting {describe(broker)}...", file=sys.stderr, flush=True)
        try:
            broker.start()
            print(f"bootstrap={broker.bootstrap}", flush=True)
            print("running; Ctrl-C (SIGINT) or SIGTERM stops it", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
            print("stopping...", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    except BrokerError as exc:
        print(f"streamlstm broker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())

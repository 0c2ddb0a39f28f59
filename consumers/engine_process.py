"""The daemon's engine, in a child process of its own.

Why not a thread: every torch and NumPy call releases the GIL and takes it
back. Beside an event loop that is busy in Python (decoding, encoding), each
take-back waits for the loop's switch interval, so a step that takes 8 ms
alone took 140 ms beside a busy thread (and 9 ms beside a busy *process*).
A process is scheduled by the OS instead, and the loop's thread only pickles
a batch and waits on a pipe.

The child loads the model from a bundle directory (never unpickles a model
file), owns the ``Engine`` and the map of which input partition each stream
last ticked on, and answers one request at a time. It ignores SIGINT and
SIGTERM (a Ctrl-C reaches the whole process group; the parent decides when
the engine stops) and exits when the parent closes the pipe or dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm import Bundle, Engine, EngineStats, StepResult
from streamlstm.errors import StreamLSTMError

__all__ = ["EngineProcess", "StepReply"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class StepReply:
    """One step's result and the engine's figures after it."""

    result: StepResult
    stats: EngineStats


class EngineProcess:
    """``Engine(bundle, max_streams=..., idle_ttl_s=...)`` behind a pipe.

    Blocking calls, one at a time (the daemon makes them from its single
    engine thread). ``start`` waits until the child has loaded the model;
    ``close`` is safe to call twice. A child that dies makes the next call
    raise ``StreamLSTMError``.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_streams: int,
        idle_ttl_s: float | None,
        threads: int = 1,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._bundle = bundle
        self._options = {"max_streams": max_streams, "idle_ttl_s": idle_ttl_s, "threads": threads}
        self._start_timeout_s = start_timeout_s
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.stats: EngineStats | None = None

    def start(self) -> EngineStats:
        # A fresh interpreter, not fork (the parent has threads) and not
        # multiprocessing's spawn (it re-runs the caller's main script).
        parent, child = socket.socketpair()
        with tempfile.TemporaryDirectory(prefix="streamlstm-engine-") as tmp:
            # The child reads weights from safetensors, as from any bundle directory.
            model_dir = self._bundle.save(Path(tmp) / "model")
            options = json.dumps({**self._options, "model": str(model_dir)})
            with child:
                proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(child.fileno()), options],
                    pass_fds=[child.fileno()],
                )
            conn = self._conn = Connection(parent.detach())
            self._proc = proc
            try:
                if not conn.poll(self._start_timeout_s):
                    raise StreamLSTMError(
                        f"engine process did not start within {self._start_timeout_s:.0f} s"
                    )
                stats = self._reply()
            except BaseException:
                self.close()
                raise
        assert isinstance(stats, EngineStats)
        self.stats = stats
        return stats

    def step(
        self,
        stream_ids: Sequence[str],
        features: npt.NDArray[np.float64],
        *,
        resets: Sequence[bool],
        ends: Sequence[bool],
        timestamps: npt.NDArray[np.float64],
        offsets: Sequence[int],
        partitions: Sequence[int],
    ) -> StepReply:
        """``Engine.step`` in the child; also remembers each stream's partition."""
        self._send(
            ("step", list(stream_ids), features, resets, ends, timestamps, offsets, partitions)
        )
        reply = self._reply()
        assert isinstance(reply, StepReply)
        self.stats = reply.stats
        return reply

    def drop_partitions(self, partitions: Sequence[int]) -> int:
        """Forget every stream whose last tick came from ``partitions``; returns how many."""
        self._send(("drop", list(partitions)))
        count, stats = self._reply()
        self.stats = stats
        return int(count)

    def close(self, timeout_s: float = 10.0) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            with contextlib.suppress(OSError):  # already gone
                conn.send(("close",))
            conn.close()
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("engine process did not exit in %.0f s; killing it", timeout_s)
                proc.kill()
                proc.wait()

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise StreamLSTMError("engine process is not running")
        try:
            self._conn.send(message)
        except OSError as exc:
            raise self._died() from exc

    def _reply(self) -> Any:
        assert self._conn is not None
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        if status == "error":
            raise payload
        return payload

    def _died(self) -> StreamLSTMError:
        code = self._proc.poll() if self._proc is not None else None
        return StreamLSTMError(f"engine process exited unexpectedly (exit code {code})")


# -- the child -------------------------------------------------------------


def _serve(conn: Connection, options: dict[str, Any]) -> None:
    """The child's main: load, then answer requests until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import gc

    import torch

    torch.set_num_threads(int(options["threads"]))
    try:
        engine = Engine(
            Bundle.load(options["model"]),
            max_streams=options["max_streams"],
            idle_ttl_s=options["idle_ttl_s"],
        )
    except Exception as exc:
        _send_error(conn, exc)
        return
    partition_of: dict[str, int] = {}
    gc.freeze()  # the model and torch live as long as the process: no full-collection pauses
    conn.send(("ok", engine.stats))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        kind = message[0]
        if kind == "close":
            return
        try:
            if kind == "step":
                reply: Any = _step(engine, partition_of, *message[1:])
            elif kind == "drop":
                reply = (_drop(engine, partition_of, set(message[1])), engine.stats)
            else:
                raise StreamLSTMError(f"engine process: unknown request {kind!r}")
        except Exception as exc:
            _send_error(conn, exc)
            continue
        conn.send(("ok", reply))


def _step(
    engine: Engine,
    partition_of: dict[str, int],
    ids: list[str],
    features: npt.NDArray[np.float64],
    resets: Sequence[bool],
    ends: Sequence[bool],
    timestamps: npt.NDArray[np.float64],
    offsets: Sequence[int],
    partitions: Sequence[int],
) -> StepReply:
    result = engine.step(
        ids, features, resets=resets, ends=ends, timestamps=timestamps, offsets=offsets
    )
    partition_of.update(zip(ids, partitions, strict=True))
    for eviction in result.evictions:
        partition_of.pop(eviction.stream_id, None)
    store = engine.store
    for i in np.flatnonzero(np.asarray(ends, dtype=bool)).tolist():
        if ids[i] not in store:
            partition_of.pop(ids[i], None)
    return StepReply(result, engine.stats)


def _drop(engine: Engine, partition_of: dict[str, int], partitions: set[int]) -> int:
    gone = [s for s, p in partition_of.items() if p in partitions]
    for stream in gone:
        del partition_of[stream]
    engine.store.release(gone)
    return len(gone)


def _send_error(conn: Connection, exc: Exception) -> None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # one that does not survive the pipe goes as text, traceback included
        exc = StreamLSTMError(f"engine process: {''.join(traceback.format_exception(exc))}")
    conn.send(("error", exc))


if __name__ == "__main__":
    # Through the module's own name, so replies pickle as consumers.engine_process.*.
    from consumers import engine_process

    engine_process._serve(Connection(int(sys.argv[1])), json.loads(sys.argv[2]))

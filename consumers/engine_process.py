"""The daemon's engine, in a child process of its own, driven from the event loop.

Why not a thread: every torch and NumPy call releases the GIL and takes it
back. Beside an event loop that is busy in Python (decoding, encoding), each
take-back waits for the loop's switch interval, so a step that takes 8 ms
alone took 140 ms beside a busy thread (and 9 ms beside a busy *process*).
For the same reason the parent has no thread at all: the event loop writes
requests to a socket and a reader task resolves the replies, in order.

The child loads the model from a bundle directory (never unpickles a model
file), owns the ``Engine`` and the map of which input partition each stream
last ticked on, and answers requests one at a time, in order. It ignores
SIGINT and SIGTERM (a Ctrl-C reaches the whole process group; the parent
decides when the engine stops) and exits when the parent closes the socket
or dies. Frames are an 8-byte length and a pickle, between this process and
the child it started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streamlstm import Bundle, Engine, EngineStats, StepResult
from streamlstm.consumers.isolation import step_isolated
from streamlstm.errors import StreamLSTMError

__all__ = ["EngineClient", "EngineProcess", "StepReply", "StepRequest"]

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")


@dataclass(frozen=True, eq=False)
class StepRequest:
    """One ``Engine.step`` call (see its arguments) and each tick's input partition."""

    stream_ids: list[str]
    features: npt.NDArray[np.float64]
    resets: Sequence[bool]
    ends: Sequence[bool]
    timestamps: npt.NDArray[np.float64]
    offsets: Sequence[int]
    partitions: Sequence[int]


@dataclass(frozen=True, eq=False)
class StepReply:
    """One step's result, the engine's figures after it, and its compute time (seconds)."""

    result: StepResult
    stats: EngineStats
    seconds: float


class EngineClient(Protocol):
    """What the daemon needs of its engine; ``EngineProcess`` is the real one.

    Requests are answered in the order they are made, so a reply always
    reflects every earlier request.
    """

    stats: EngineStats | None

    @property
    def alive(self) -> bool: ...
    async def start(self) -> EngineStats: ...
    async def step(self, request: StepRequest) -> StepReply: ...
    async def drop_partitions(self, partitions: Sequence[int]) -> int: ...
    async def close(self, timeout_s: float = 10.0) -> None: ...


class EngineProcess:
    """``Engine(bundle, max_streams=..., idle_ttl_s=...)`` in a child process.

    ``await start()`` returns once the child has loaded the model. Requests
    may overlap (the next batch is sent while one steps); the child answers
    them in order. ``close`` is safe to call twice. If the child dies, every
    waiting and later request raises ``StreamLSTMError``.
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
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._error: StreamLSTMError | None = None
        #: The engine's figures as of its last reply (None until started).
        self.stats: EngineStats | None = None

    @property
    def pid(self) -> int:
        """The child's process id (0 before start)."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def alive(self) -> bool:
        """Started, not closed, and the child has not exited."""
        return self._proc is not None and self._proc.poll() is None and self._error is None

    async def start(self) -> EngineStats:
        parent, child = socket.socketpair()
        with tempfile.TemporaryDirectory(prefix="streamlstm-engine-") as tmp:
            # The child reads weights from safetensors, as from any bundle directory.
            model_dir = self._bundle.save(Path(tmp) / "model")
            options = json.dumps({**self._options, "model": str(model_dir)})
            with child:
                # A fresh interpreter: not fork (the parent has threads) and not
                # multiprocessing's spawn (it re-runs the caller's main script).
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(child.fileno()), options],
                    pass_fds=[child.fileno()],
                    # The parent's import path, as multiprocessing's spawn passes it on.
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                )
            reader, self._writer = await asyncio.open_unix_connection(sock=parent)
            ready = self._expect()  # the child's first frame, sent unasked once loaded
            self._reader_task = asyncio.create_task(self._read(reader), name="streamlstm-engine")
            try:
                stats = await asyncio.wait_for(ready, self._start_timeout_s)
            except TimeoutError:
                await self.close()
                raise StreamLSTMError(
                    f"engine process did not start within {self._start_timeout_s:.0f} s"
                ) from None
            except BaseException:
                await self.close()
                raise
        assert isinstance(stats, EngineStats)
        self.stats = stats
        return stats

    async def step(self, request: StepRequest) -> StepReply:
        """``Engine.step`` in the child; it also remembers each stream's partition."""
        reply = await self._request(("step", request))
        assert isinstance(reply, StepReply)
        self.stats = reply.stats
        return reply

    async def drop_partitions(self, partitions: Sequence[int]) -> int:
        """Forget every stream whose last tick came from ``partitions``; returns how many."""
        count, self.stats = await self._request(("drop", list(partitions)))
        return int(count)

    async def close(self, timeout_s: float = 10.0) -> None:
        writer, proc = self._writer, self._proc
        self._writer = self._proc = None
        if writer is not None:
            with contextlib.suppress(OSError):  # already gone
                writer.write(_frame(("close",)))
            writer.close()
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("engine process did not exit in %.0f s; killing it", timeout_s)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail(StreamLSTMError("engine process is closed"))

    # -- internals ----------------------------------------------------------

    def _expect(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    async def _request(self, message: tuple[Any, ...]) -> Any:
        if self._error is not None:
            raise self._error
        if self._writer is None:
            raise StreamLSTMError("engine process is not running")
        future = self._expect()
        try:
            self._writer.write(_frame(message))  # in call order, so replies match the queue
            await self._writer.drain()
        except ConnectionError as exc:
            self._fail(self._died(exc))
        return await future

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                status, payload = pickle.loads(await reader.readexactly(size))
                if not self._waiting:
                    logger.error("engine process sent a reply nobody asked for")
                    continue
                future = self._waiting.popleft()
                if future.done():
                    continue  # its caller was cancelled
                if status == "error":
                    future.set_exception(payload)
                else:
                    future.set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail(self._died(exc))

    def _died(self, cause: Exception) -> StreamLSTMError:
        code = self._proc.poll() if self._proc is not None else None
        died = StreamLSTMError(f"engine process exited unexpectedly (exit code {code})")
        died.__cause__ = cause
        return died

    def _fail(self, error: StreamLSTMError) -> None:
        self._error = self._error or error
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(self._error)


def _frame(obj: object) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


# -- the child -------------------------------------------------------------


def _serve(sock: socket.socket, options: dict[str, Any]) -> None:
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
        _send_error(sock, exc)
        return
    partition_of: dict[str, int] = {}
    gc.freeze()  # the model and torch live as long as the process: no full-collection pauses
    sock.sendall(_frame(("ok", engine.stats)))
    while True:
        message = _read_frame(sock)
        if message is None or message[0] == "close":
            return  # closed, or the parent is gone
        try:
            if message[0] == "step":
                reply: Any = _step(engine, partition_of, message[1])
            elif message[0] == "drop":
                reply = (_drop(engine, partition_of, set(message[1])), engine.stats)
            else:
                raise StreamLSTMError(f"engine process: unknown request {message[0]!r}")
        except Exception as exc:
            _send_error(sock, exc)
            continue
        sock.sendall(_frame(("ok", reply)))


def _read_frame(sock: socket.socket) -> Any:
    header = _read_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    body = _read_exactly(sock, _LENGTH.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def _step(engine: Engine, partition_of: dict[str, int], request: StepRequest) -> StepReply:
    ids = request.stream_ids
    start = time.perf_counter()
    result = step_isolated(
        lambda r: engine.step(
            r.stream_ids,
            r.features,
            resets=r.resets,
            ends=r.ends,
            timestamps=r.timestamps,
            offsets=r.offsets,
        ),
        request,
        engine.bundle.config.output_size,
    )
    seconds = time.perf_counter() - start
    if result.accepted.all():
        partition_of.update(zip(ids, request.partitions, strict=True))
    else:  # a rejected tick made no state, so it must not leave a partition behind
        parts = request.partitions
        partition_of.update((ids[i], parts[i]) for i in np.flatnonzero(result.accepted).tolist())
    for eviction in result.evictions:
        partition_of.pop(eviction.stream_id, None)
    store = engine.store
    for i in np.flatnonzero(np.asarray(request.ends, dtype=bool)).tolist():
        if ids[i] not in store:
            partition_of.pop(ids[i], None)
    return StepReply(result, engine.stats, seconds)


def _drop(engine: Engine, partition_of: dict[str, int], partitions: set[int]) -> int:
    gone = [s for s, p in partition_of.items() if p in partitions]
    for stream in gone:
        del partition_of[stream]
    engine.store.release(gone)
    return len(gone)


def _send_error(sock: socket.socket, exc: Exception) -> None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # one that does not survive the trip goes as text, traceback included
        exc = StreamLSTMError(f"engine process: {''.join(traceback.format_exception(exc))}")
    sock.sendall(_frame(("error", exc)))


if __name__ == "__main__":
    # Through the module's own name, so replies pickle as streamlstm.consumers.engine_process.*.
    from streamlstm.consumers import engine_process

    engine_process._serve(socket.socket(fileno=int(sys.argv[1])), json.loads(sys.argv[2]))

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
or dies. The messages, one dataclass per request and per reply, and their
frames are ``engine.protocol``'s, which both sides import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from streamlstm import Bundle, EngineStats
from streamlstm.consumers.engine.protocol import (
    FRAME_LENGTH,
    READ_REPLIES,
    Change,
    ChangesReply,
    Checkpointed,
    CheckpointedReply,
    Close,
    Drop,
    DropReply,
    ErrorReply,
    LocalReply,
    LocalRestore,
    OpenLocal,
    Read,
    ReadReply,
    Reply,
    Request,
    Reserve,
    ReserveReply,
    RestoreReply,
    RestoreReport,
    StartReply,
    Step,
    StepReply,
    StepRequest,
    SwapModel,
    SwapReply,
    TakeChanges,
    frame,
)
from streamlstm.consumers.engine.spool import Spool
from streamlstm.consumers.settings import ServeConfig
from streamlstm.errors import StreamLSTMError

__all__ = [
    "EngineClient",
    "EngineFactory",
    "ProcessClient",
    "StepReply",
    "StepRequest",
    "default_engine",
]

logger = logging.getLogger(__name__)

#: What the child runs (``python -m``): the engine's side of the socket.
_CHILD_MODULE = "streamlstm.consumers.engine.child"
#: How long ``close`` gives a killed child to exit.
_KILLED_EXIT_S = 5.0


_R = TypeVar("_R", bound=Reply)


class EngineClient(Protocol):
    """What the daemon needs of its engine; ``ProcessClient`` is the real one.

    Requests are answered in the order they are made, so a reply always
    reflects every earlier request.
    """

    stats: EngineStats | None

    @property
    def alive(self) -> bool: ...
    @property
    def pid(self) -> int | None:
        """The engine's own process, or None where it runs in this one."""

    async def start(self) -> EngineStats: ...
    async def step(self, request: StepRequest) -> StepReply: ...
    async def drop_partitions(self, partitions: Sequence[int]) -> int: ...
    async def checkpoint(self) -> list[Change]: ...
    async def read(self, query: Read) -> ReadReply:
        """What is held (a stream, a page of ids, counts), as of every step before."""

    async def swap_model(self, request: SwapModel) -> SwapReply:
        """Serve another bundle from the next step on; raises (and the model served so far
        goes on) where it does not load."""

    async def reserve(self, streams: int) -> None:
        """Room for ``streams`` more streams, made now: the store grows (and its memory is
        faulted in) while the changelog is read, not after."""

    async def restore(
        self,
        partition: int,
        states: dict[str, bytes],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport: ...
    def spool(self, expected_records: int) -> Spool:
        """Somewhere to put a restore's states as they are read (``restore_spooled``)."""

    async def restore_spooled(
        self,
        partition: int,
        spool: Spool,
        rows: dict[str, int],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        """``restore`` of the states in ``spool``: stream s's is record ``rows[s]``."""

    async def open_local(self, partitions: Sequence[int]) -> LocalReply:
        """Open these partitions' local checkpoints ahead of their restores."""

    async def checkpointed(self, offsets: dict[int, int]) -> CheckpointedReply:
        """The oldest checkpoint taken is durable (changelog offsets after its records)."""

    def kill(self) -> None:
        """Stop the engine at once (an exit that skips ``close``)."""

    async def close(self, timeout_s: float = 10.0) -> None: ...


class ProcessClient:
    """``Engine(bundle, max_streams=..., idle_ttl_s=...)`` in a child process.

    ``await start()`` returns once the child has loaded the model. Requests
    may overlap (the next batch is sent while one steps); the child answers
    them in order. ``close`` is safe to call twice. If the child dies, every
    waiting and later request raises ``StreamLSTMError``. ``changelog=False``
    (memory state) keeps no tombstones of ended streams for checkpoints.
    ``state_dir`` gives the engine a cold tier there (``ColdConfig``), its stores
    bounded by ``max_disk_streams`` together; with ``local_checkpoint_topic``
    (the changelog topic) also local checkpoints of that changelog
    (``local_checkpoints.py``), a released partition's kept ``state_cleanup_delay_s``.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_streams: int,
        idle_ttl_s: float | None,
        threads: int = 1,
        changelog: bool = True,
        start_timeout_s: float = 120.0,
        drift_window_ticks: int = 10_000,
        quality: bool = True,
        worst_interval_s: float = 10.0,
        history_ticks: int = 0,
        shadow: Bundle | None = None,
        state_dir: str | None = None,
        max_disk_streams: int = 10_000_000,
        local_checkpoint_topic: str | None = None,
        state_cleanup_delay_s: float = 600.0,
    ) -> None:
        self._bundle = bundle
        self._shadow = shadow
        self._options = {
            "max_streams": max_streams,
            "idle_ttl_s": idle_ttl_s,
            "threads": threads,
            "changelog": changelog,
            "drift_window_ticks": drift_window_ticks,
            "quality": quality,
            "worst_interval_s": worst_interval_s,
            "history_ticks": history_ticks,
            "state_dir": state_dir,
            "max_disk_streams": max_disk_streams,
            "local_checkpoint_topic": local_checkpoint_topic,
            "state_cleanup_delay_s": state_cleanup_delay_s,
        }
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
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
        with contextlib.ExitStack() as cleanup:
            options = {**self._options, **self._model_options(cleanup)}
            with child:
                # A fresh interpreter: not fork (the parent has threads) and not
                # multiprocessing's spawn (it re-runs the caller's main script).
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", _CHILD_MODULE, str(child.fileno()), json.dumps(options)],
                    pass_fds=[child.fileno()],
                    # The parent's import path, as multiprocessing's spawn passes it on.
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                )
            reader, self._writer = await asyncio.open_unix_connection(sock=parent)
            ready = self._expect()  # the child's first frame, sent unasked once loaded
            self._reader_task = asyncio.create_task(self._read(reader), name="streamlstm-engine")
            try:
                started = await asyncio.wait_for(ready, self._start_timeout_s)
            except TimeoutError:
                await self.close()
                raise StreamLSTMError(
                    f"engine process did not start within {self._start_timeout_s:.0f} s"
                ) from None
            except BaseException:
                await self.close()
                raise
        if not isinstance(started, StartReply):
            raise StreamLSTMError(f"engine process: {started!r} where StartReply was due")
        self.stats = started.stats
        return started.stats

    def _model_options(self, cleanup: contextlib.ExitStack) -> dict[str, str]:
        """Where the child loads the model (and the shadow's): the bundle's own directory,
        checked there against this bundle's id (the files may change after they were
        read), or a copy in a temporary directory (``cleanup`` removes it) for a bundle
        made in memory."""
        options = _where(self._bundle, "model", cleanup)
        if self._shadow is not None:
            options |= _where(self._shadow, "shadow_model", cleanup)
        return options

    async def step(self, request: StepRequest) -> StepReply:
        """``Engine.step`` in the child; it also remembers each stream's partition."""
        reply = await self._request(Step.of(request), StepReply)
        self.stats = reply.stats
        return reply

    async def drop_partitions(self, partitions: Sequence[int]) -> int:
        """Forget every stream whose last tick came from ``partitions``; returns how many."""
        reply = await self._request(Drop(tuple(partitions)), DropReply)
        self.stats = reply.stats
        return reply.count

    async def checkpoint(self) -> list[Change]:
        """States changed since the last checkpoint, as of every step asked for before it
        (None for a stream's state: a tombstone)."""
        return (await self._request(TakeChanges(), ChangesReply)).changes

    async def read(self, query: Read) -> ReadReply:
        """A read, answered in its turn among the steps (see ``engine.protocol``)."""
        return await self._request(query, READ_REPLIES[type(query)])

    async def swap_model(self, request: SwapModel) -> SwapReply:
        """``SwapModel`` in the child, in its turn; a restarted child would load it."""
        reply = await self._request(request, SwapReply)
        self.stats = reply.stats
        return reply

    async def reserve(self, streams: int) -> None:
        """Make room for ``streams`` more streams now."""
        self.stats = (await self._request(Reserve(streams), ReserveReply)).stats

    async def restore(
        self,
        partition: int,
        states: dict[str, bytes],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        """Load one changelog partition's states."""
        spool = Spool(len(states))
        try:
            spool.add(list(states.values()))
            rows = dict(zip(states, range(len(states)), strict=True))
            return await self.restore_spooled(partition, spool, rows, policy, local)
        finally:
            await spool.close()

    def spool(self, expected_records: int) -> Spool:
        """Somewhere to put states as they are read."""
        return Spool(expected_records)

    async def restore_spooled(
        self,
        partition: int,
        spool: Spool,
        rows: dict[str, int],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        """``restore`` of the states in ``spool``: stream s's is record ``rows[s]``.

        The child maps the file: the states cross no socket and no pickle.
        """
        message = await spool.restore(partition, rows, policy, local)
        reply = await self._request(message, RestoreReply)
        self.stats = reply.stats
        return reply.report

    async def open_local(self, partitions: Sequence[int]) -> LocalReply:
        """``OpenLocal`` in the child (``LocalReply``)."""
        return await self._request(OpenLocal(tuple(partitions)), LocalReply)

    async def checkpointed(self, offsets: dict[int, int]) -> CheckpointedReply:
        """``Checkpointed`` in the child: the oldest pending checkpoint to local disk."""
        return await self._request(Checkpointed(offsets), CheckpointedReply)

    def kill(self) -> None:
        """SIGKILL the child at once (a daemon exiting without its shutdown: a stopped or
        wedged child would not notice the socket closing)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to exit, kill it after ``timeout_s`` (0: at once); never blocks."""
        writer, proc = self._writer, self._proc
        self._writer = self._proc = None
        if writer is not None:
            with contextlib.suppress(OSError):  # already gone
                writer.write(frame(Close()))
            writer.close()
        # Polled from the loop, not waited on in a thread: a wait with no deadline on a
        # child that never exits (stopped, or stuck in the kernel) would hold a worker
        # thread that asyncio.run joins at exit, and the daemon with it.
        if proc is not None and not await _exited(proc, timeout_s):
            if timeout_s > 0:
                logger.warning("engine process did not exit in %.0f s; killing it", timeout_s)
            proc.kill()
            if not await _exited(proc, _KILLED_EXIT_S):
                logger.error("engine process %d did not exit after SIGKILL; leaving it", proc.pid)
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail(StreamLSTMError("engine process is closed"))

    # -- internals ----------------------------------------------------------

    def _expect(self) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    async def _request(self, message: Request, expected: type[_R]) -> _R:
        """Send ``message``; its reply, which must be an ``expected`` (an ``ErrorReply``
        raises the child's error here)."""
        if self._error is not None:
            raise self._error
        if self._writer is None:
            raise StreamLSTMError("engine process is not running")
        future = self._expect()
        try:
            self._writer.write(frame(message))  # in call order, so replies match the queue
            await self._writer.drain()
        except ConnectionError as exc:
            self._fail(self._died(exc))
        reply = await future
        if not isinstance(reply, expected):
            raise StreamLSTMError(f"engine process: {type(reply).__name__} to {message!r}")
        return reply

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = FRAME_LENGTH.unpack(await reader.readexactly(FRAME_LENGTH.size))
                # Our own child, on a socketpair nobody else holds.
                reply: Reply = pickle.loads(await reader.readexactly(size))
                if not self._waiting:
                    logger.error("engine process sent a reply nobody asked for")
                    continue
                future = self._waiting.popleft()
                if future.done():
                    continue  # its caller was cancelled
                if isinstance(reply, ErrorReply):
                    future.set_exception(reply.error)
                else:
                    future.set_result(reply)
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


async def _exited(proc: subprocess.Popen[bytes], timeout_s: float, poll_s: float = 0.02) -> bool:
    """Whether ``proc`` exits (and is reaped) within ``timeout_s``, polled without blocking."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def _where(bundle: Bundle, name: str, cleanup: contextlib.ExitStack) -> dict[str, str]:
    if bundle.source is not None:
        return {name: str(bundle.source), f"{name}_id": bundle.model_id}
    tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="streamlstm-engine-"))
    return {name: str(bundle.save(Path(tmp) / name))}


class EngineFactory(Protocol):
    """``factory(bundle, config, shadow)``: the engine client the server starts and closes,
    serving ``bundle`` (and running ``shadow`` beside it, where given)."""

    def __call__(
        self, bundle: Bundle, config: ServeConfig, shadow: Bundle | None = None
    ) -> EngineClient: ...


def default_engine(
    bundle: Bundle, config: ServeConfig, shadow: Bundle | None = None
) -> EngineClient:
    """The engine in a child process of its own."""
    return ProcessClient(
        bundle,
        max_streams=config.max_streams,
        idle_ttl_s=config.idle_ttl_s,
        threads=config.engine_threads,
        changelog=config.state == "durable",
        drift_window_ticks=config.drift_window_ticks,
        quality=config.quality_metrics == "on",
        worst_interval_s=config.metrics_interval_s,
        history_ticks=config.history_ticks,
        shadow=shadow,
        state_dir=config.state_dir,
        max_disk_streams=config.max_disk_streams,
        local_checkpoint_topic=config.changelog_topic if config.state == "durable" else None,
        state_cleanup_delay_s=config.state_cleanup_delay_s,
    )

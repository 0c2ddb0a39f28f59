"""The messages between the daemon and its engine process, imported by both sides.

One frozen dataclass per request (``Step``, ``TakeChanges``, ``Restore``,
``Reserve``, ``Drop``, ``SwapModel``, ``OpenLocal``, ``Checkpointed``, the
reads ``InspectStream``, ``ListStreams`` and ``CountStreams``, ``Close``)
and one per reply (``StartReply``, ``StepReply``, ``ChangesReply``,
``RestoreReply``, ``ReserveReply``, ``DropReply``, ``SwapReply``,
``LocalReply``, ``CheckpointedReply``, ``StreamReply``,
``PageReply``, ``CountsReply``, ``ErrorReply``). A read is
answered in its turn like any request, so it reflects every step sent before
it, and says which: ``as_of``, each input partition's offset after the last
record of it sent to the engine. The child answers requests one at a time, in the order they
came, with exactly one reply each (``ErrorReply`` for any request that raised);
it sends ``StartReply`` (or ``ErrorReply``) once, unasked, when the model is loaded.

A frame is an 8-byte length and a pickle of one message, on the Unix socket
between the daemon and the child it started (never a file, never from
anyone else). A step travels as a few flat objects (``Step.of``: the ids as
one string, every per-tick field as one array), and its reply holds arrays
too, so pickling either costs no Python object per tick. Evicted streams'
states stay in the child unless a step asks for them (``with_evictions``):
the daemon does not read them.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from streamlstm import EngineStats, StepResult, StreamView
from streamlstm.control import Control

__all__ = [
    "FRAME_LENGTH",
    "READ_REPLIES",
    "Change",
    "ChangesReply",
    "Checkpointed",
    "CheckpointedReply",
    "Close",
    "CountStreams",
    "CountsReply",
    "Drop",
    "DropReply",
    "ErrorReply",
    "InspectStream",
    "ListStreams",
    "LocalReply",
    "LocalRestore",
    "OpenLocal",
    "PageReply",
    "Read",
    "ReadReply",
    "Reply",
    "Request",
    "Reserve",
    "ReserveReply",
    "Restore",
    "RestoreReply",
    "RestoreReport",
    "StartReply",
    "Step",
    "StepReply",
    "StepRequest",
    "StreamReply",
    "SwapModel",
    "SwapReply",
    "TakeChanges",
    "frame",
    "read_frame",
]

#: A frame: this length, then a pickle of one message.
FRAME_LENGTH = struct.Struct("!Q")

Ints = Sequence[int] | npt.NDArray[np.int64]
Bools = Sequence[bool] | npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class StepRequest:
    """One ``Engine.step`` call (see its arguments) and each tick's input partition."""

    stream_ids: list[str]
    features: npt.NDArray[np.float64]
    resets: Bools
    ends: Bools
    timestamps: npt.NDArray[np.float64]
    offsets: Ints
    partitions: Ints
    #: Streams with a record refused before the engine (``Engine.step``'s ``gaps``).
    gaps: Sequence[str] = ()
    #: Controls of streams' state (``Engine.control``), each among the ticks.
    controls: Sequence[Control] = ()
    #: Each input partition's offset after the last record of it in this request's poll
    #: (what reads answered after it reflect: ``as_of``).
    positions: Mapping[int, int] = field(default_factory=dict)


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Step:
    """A ``StepRequest`` flattened for the socket: ``ids`` joined by NUL (which no stream
    id from the wire holds: ``wire`` refuses control characters), or a list where one
    does; every per-tick field one array."""

    ids: str | list[str]
    features: npt.NDArray[np.float64]
    resets: npt.NDArray[np.bool_]
    ends: npt.NDArray[np.bool_]
    timestamps: npt.NDArray[np.float64]
    offsets: npt.NDArray[np.int64]
    partitions: npt.NDArray[np.int64]
    #: Send the evicted streams' states back (``StepResult.evictions``); else left empty.
    with_evictions: bool = False
    gaps: tuple[str, ...] = ()
    controls: tuple[Control, ...] = ()
    positions: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, request: StepRequest, *, with_evictions: bool = False) -> Step:
        ids: str | list[str] = "\0".join(request.stream_ids)
        if ids.count("\0") != max(len(request.stream_ids) - 1, 0) or not request.stream_ids:
            ids = list(request.stream_ids)  # an id with a NUL (never from the wire), or none
        return cls(
            ids,
            np.asarray(request.features),
            np.asarray(request.resets, dtype=bool),
            np.asarray(request.ends, dtype=bool),
            np.asarray(request.timestamps, dtype=np.float64),
            np.asarray(request.offsets, dtype=np.int64),
            np.asarray(request.partitions, dtype=np.int64),
            with_evictions,
            tuple(request.gaps),
            tuple(request.controls),
            tuple(request.positions.items()),
        )

    def request(self) -> StepRequest:
        """The ``StepRequest`` that ``of`` flattened."""
        ids = self.ids.split("\0") if isinstance(self.ids, str) else self.ids
        return StepRequest(
            ids,
            self.features,
            self.resets,
            self.ends,
            self.timestamps,
            self.offsets,
            self.partitions,
            self.gaps,
            self.controls,
            dict(self.positions),
        )


@dataclass(frozen=True)
class TakeChanges:
    """The states changed since the last checkpoint, as of every step asked for before."""


@dataclass(frozen=True)
class LocalRestore:
    """How a restore's read relates to the partition's local checkpoint (``--state-dir``):
    ``tail``: the read began at the offset ``OpenLocal`` gave, so its states go over the
    store's, and ``deleted`` are the keys whose last record read is a tombstone;
    otherwise the read is the whole partition, which replaces the store. ``end``: the
    changelog offset the read stopped at (the store's new offset)."""

    tail: bool
    end: int
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restore:
    """Load one changelog partition's states from the daemon's spool file (``Spool``):
    stream ``ids[i]``'s state is record ``rows[i]``; ``lengths`` are the records' byte
    lengths, in file order (both int64, as bytes). ``local``: with local checkpoints."""

    partition: int
    ids: list[str]
    path: str
    lengths: bytes
    rows: bytes
    policy: str
    local: LocalRestore | None = None


@dataclass(frozen=True)
class OpenLocal:
    """Open these partitions' local checkpoints ahead of their restore (``LocalReply``)."""

    partitions: tuple[int, ...]


@dataclass(frozen=True)
class Checkpointed:
    """The oldest checkpoint taken and not yet confirmed is durable: each partition's
    records are in the changelog before ``offsets[p]``. Written to the local checkpoints."""

    offsets: dict[int, int]


@dataclass(frozen=True)
class Reserve:
    """Make room for ``streams`` more streams now (ahead of a restore)."""

    streams: int


@dataclass(frozen=True)
class Drop:
    """Forget the streams whose last tick came from ``partitions`` (no tombstones)."""

    partitions: tuple[int, ...]


@dataclass(frozen=True)
class SwapModel:
    """Serve the bundle at ``path`` from the next step on (``Engine.swap_model``): loaded
    and checked there (its id must be ``model_id``, what the daemon read of it), each
    held stream's state carried into it, re-warmed or reset (``mode``). A bundle that fails to load
    is refused (``ErrorReply``) and the model served so far goes on."""

    path: str
    model_id: str
    mode: str  # swap_policy.SWAP_MODES: carry, rewarm or reset


@dataclass(frozen=True)
class InspectStream:
    """What the engine holds of one stream (``Engine.inspect``); ``state`` too if asked."""

    stream: str
    include_state: bool = False


@dataclass(frozen=True)
class ListStreams:
    """Up to ``limit`` held streams whose id starts with ``prefix``, from ``cursor`` on
    (``StateStore.page``: each page looks at a bounded number of slots)."""

    prefix: str
    limit: int
    cursor: int = 0


@dataclass(frozen=True)
class CountStreams:
    """How many streams are held per input partition."""


Read = InspectStream | ListStreams | CountStreams


@dataclass(frozen=True)
class Close:
    """Exit after answering everything before."""


Request = (
    Step | TakeChanges | Restore | Reserve | Drop | SwapModel | OpenLocal | Checkpointed | Read
    | Close
)  # fmt: skip


# -- replies -----------------------------------------------------------------


@dataclass(frozen=True)
class StartReply:
    """The model is loaded: the engine's figures at the start."""

    stats: EngineStats


@dataclass(frozen=True, eq=False)
class StepReply:
    """One step's result, the engine's figures after it, and its compute time (seconds);
    ``controls_applied[i]``: whether the request's control i was applied (False: its
    stream's state already reflected it, the skip rule)."""

    result: StepResult
    stats: EngineStats
    seconds: float
    controls_applied: tuple[bool, ...] = ()
    #: The shadow model's answers to the same ticks (``--shadow-model``; None: none runs).
    shadow: StepResult | None = None


class Change(NamedTuple):
    """One stream's change since the last checkpoint: its state, or None (a tombstone)."""

    stream: str
    partition: int
    state: bytes | None


@dataclass(frozen=True)
class ChangesReply:
    changes: list[Change]


@dataclass(frozen=True)
class RestoreReport:
    """What a restore loaded, and what it left out (each counted)."""

    loaded: int
    reset_model_changed: int  # made by another model: the stream starts again
    kept_model_changed: int  # made by another, compatible model, kept (--swap-state)
    over_capacity: int  # past max_streams: the least recently seen were left out
    corrupt: int
    #: Made by another model, loaded from zero state and re-warmed over its ticks.
    rewarmed_model_changed: int = 0
    #: Past max_streams, written to the cold tier (``--state-dir``) instead of left out.
    to_disk: int = 0
    #: States that came from the local checkpoint, not from the changelog's tail.
    from_local: int = 0


@dataclass(frozen=True)
class RestoreReply:
    report: RestoreReport
    stats: EngineStats


@dataclass(frozen=True)
class ReserveReply:
    stats: EngineStats


@dataclass(frozen=True)
class DropReply:
    count: int
    stats: EngineStats


@dataclass(frozen=True)
class StreamReply:
    """``InspectStream``'s answer: the stream, or None where it is not held here."""

    view: StreamView | None
    as_of: dict[int, int]


@dataclass(frozen=True)
class PageReply:
    """``ListStreams``' answer, and the cursor of the next page (-1: none)."""

    streams: list[str]
    cursor: int
    as_of: dict[int, int]


@dataclass(frozen=True)
class CountsReply:
    """``CountStreams``' answer: input partition -> streams held (-1: not known)."""

    streams: dict[int, int]
    as_of: dict[int, int]


@dataclass(frozen=True)
class SwapReply:
    """``SwapModel`` done: the streams held, each now under the new model, and how long
    loading the bundle and moving the states took (seconds). A swap to the shadow's
    model promotes the shadow: its states serve (``from_shadow`` of them)."""

    model_id: str
    streams: int
    seconds: float
    stats: EngineStats
    #: A promotion of the shadow: the streams whose state came from the shadow's.
    from_shadow: int = 0


@dataclass(frozen=True)
class LocalReply:
    """``OpenLocal``'s answer: each partition's local checkpoint offset (the restore reads
    the changelog from there), or why there is none to use (``refused``: a kind, as
    ``LocalCounts.discarded`` counts them; that partition's read is whole)."""

    offsets: dict[int, int]
    refused: dict[int, str]


@dataclass(frozen=True)
class CheckpointedReply:
    """``Checkpointed`` done: the records it queued for the local checkpoints, those
    still to write, and the records written and seconds spent writing since the
    engine started (totals: written between requests, not in this one)."""

    queued: int
    unwritten: int
    written_total: int
    write_seconds_total: float


ReadReply = StreamReply | PageReply | CountsReply

#: Each read's reply.
READ_REPLIES: dict[type[Read], type[ReadReply]] = {
    InspectStream: StreamReply,
    ListStreams: PageReply,
    CountStreams: CountsReply,
}


@dataclass(frozen=True)
class ErrorReply:
    """The request raised ``error`` (one that survives pickling; see ``engine.child``)."""

    error: Exception


Reply = (
    StartReply | StepReply | ChangesReply | RestoreReply | ReserveReply | DropReply | SwapReply
    | LocalReply | CheckpointedReply | ReadReply | ErrorReply
)  # fmt: skip


# -- frames ------------------------------------------------------------------


def frame(message: Request | Reply) -> bytes:
    """One message as it goes on the socket."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_LENGTH.pack(len(payload)) + payload


def read_frame(sock: socket.socket) -> Request | Reply | None:
    """The next message from a blocking socket; None once the other side has closed."""
    header = _read_exactly(sock, FRAME_LENGTH.size)
    if header is None:
        return None
    body = _read_exactly(sock, FRAME_LENGTH.unpack(header)[0])
    # Our own child or parent, on a socketpair nobody else holds.
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

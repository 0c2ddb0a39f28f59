"""``StreamState``: one stream's state detached from the store, and its versioned bytes.

The bytes are what the changelog topic holds (see docs/durability.md,
"Durable state"): little-endian, a magic and a format version first, so a
newer reader takes older states. Version 5: header (magic, version, layers,
step, offset, last_seen), the cell (one byte: 0 LSTM, 1 GRU, 2 RNN), each
layer's size, then per layer ``h`` and, for an LSTM, ``c`` (float32), the
extra per-stream numbers (float64), the input partition, the model's
fingerprint, and the tick history (two u16, K and F, then K x F float32: the
ring of the stream's last K raw ticks, ``--history-ticks``; K is 0 without
one). Versions 1 to 3 have no cell byte and are LSTM states; 1 to 4 have no
history.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.config import CELLS
from streamlstm.errors import StateError

__all__ = ["StateArrays", "StateBlobs", "StreamState", "decode_many", "encode_many"]

_MAGIC = b"SLST"
# 5 appends the tick history; 4 adds the cell byte (a GRU's or RNN's state has no c);
# 3 appends partition and model; 2 the extra columns; 1 to 3 still read, as LSTM states.
_FORMAT_VERSION = 5
_HEADER = struct.Struct("<4sBBqqd")
_HISTORY = struct.Struct("<HH")
#: Versions a restore reads as a table (``decode_many``): with partition and model.
_TABLE_VERSIONS = (3, 4, _FORMAT_VERSION)
_NO_HISTORY = np.zeros((0, 0), np.float32)


def _sizes_at(version: int) -> int:
    """Where the layer sizes start: after the header and (version 4 on) the cell byte."""
    return _HEADER.size + (1 if version >= 4 else 0)


def _cell_code(cell: str) -> int:
    return CELLS.index(cell)


@dataclass(frozen=True, eq=False)
class StreamState:
    """One stream's state, detached from the store.

    ``h[l]`` and ``c[l]`` are float32 ``[H_l]``; ``step`` counts ticks since the
    last reset; ``offset`` is the input offset of the last tick it reflects
    (-1 when unknown); ``last_seen`` is in seconds; ``extra`` holds the
    engine's other per-stream numbers (the anomaly score's running state);
    ``partition`` is the input partition of the ticks it reflects (-1 when
    unknown) and ``model`` the fingerprint of the model that made it (the
    bundle's ``model_id``; empty when unknown). ``cell`` is the model's
    recurrent cell (``ModelConfig.cell``): an LSTM's state has a ``c`` per
    layer, a GRU's or RNN's none (``c == ()``). ``history`` is the ring of the
    stream's last raw ticks, float32 ``[K, F]`` (``[0, 0]`` without one): the
    t-th tick since the last reset (from 1) is row ``(t - 1) % K``, and the
    last ``min(step, K)`` are held (``recent_ticks``); what a re-warm replays.
    """

    h: tuple[npt.NDArray[np.float32], ...]
    c: tuple[npt.NDArray[np.float32], ...]
    step: int
    offset: int = -1
    last_seen: float = math.nan
    extra: tuple[float, ...] = ()
    partition: int = -1
    model: str = ""
    cell: str = "lstm"
    history: npt.NDArray[np.float32] = field(default_factory=lambda: _NO_HISTORY)

    def recent_ticks(self) -> npt.NDArray[np.float32]:
        """The held ticks of ``history`` in order, oldest first: ``[min(step, K), F]``."""
        ticks = self.history.shape[0]
        held = min(self.step, ticks)
        rows: npt.NDArray[np.float32] = self.history[
            np.arange(self.step - held, self.step) % max(ticks, 1)
        ]
        return rows

    def zeroed(self, hidden_sizes: Sequence[int], cell: str) -> StreamState:
        """This state with a zero ``h`` (and ``c``) of another model's cell and sizes, and
        no extra columns: its step count, position, times and ticks kept (a re-warm's)."""
        zeros = tuple(np.zeros(size, np.float32) for size in hidden_sizes)
        c = tuple(z.copy() for z in zeros) if cell == "lstm" else ()
        return replace(self, h=zeros, c=c, extra=(), cell=cell)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise StateError(f"state: cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if len(self.c) != (len(self.h) if self.cell == "lstm" else 0):
            raise StateError(
                f"state: {len(self.h)} h and {len(self.c)} c layers for a "
                f"{self.cell.upper()} (an LSTM keeps one c a layer, a GRU or RNN none)"
            )

    def to_bytes(self) -> bytes:
        parts = [
            _HEADER.pack(
                _MAGIC, _FORMAT_VERSION, len(self.h), self.step, self.offset, self.last_seen
            ),
            struct.pack(f"<B{len(self.h)}I", _cell_code(self.cell), *(h.size for h in self.h)),
        ]
        for layer, h in enumerate(self.h):
            parts.append(np.asarray(h, dtype="<f4").tobytes())
            if self.c:
                parts.append(np.asarray(self.c[layer], dtype="<f4").tobytes())
        parts.append(struct.pack("<I", len(self.extra)))
        parts.append(np.asarray(self.extra, dtype="<f8").tobytes())
        model = self.model.encode()
        parts.append(struct.pack("<iH", self.partition, len(model)))
        parts.append(model)
        parts.append(_HISTORY.pack(*self.history.shape))
        parts.append(np.asarray(self.history, dtype="<f4").tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamState:
        try:
            magic, version, layers, step, offset, last_seen = _HEADER.unpack_from(data, 0)
            if magic != _MAGIC or version not in (1, 2, 3, 4, _FORMAT_VERSION):
                raise StateError(f"state bytes: bad magic or version ({magic!r}, {version})")
            pos, cell = _HEADER.size, "lstm"
            if version >= 4:
                (code,) = struct.unpack_from("<B", data, pos)
                if code >= len(CELLS):
                    raise StateError(f"state bytes: unknown cell {code}")
                pos, cell = pos + 1, CELLS[code]
            keeps_c = cell == "lstm"
            sizes = struct.unpack_from(f"<{layers}I", data, pos)
            pos += 4 * layers
            expected = pos + sum((8 if keeps_c else 4) * s for s in sizes)
            if version >= 2:
                (count,) = struct.unpack_from("<I", data, expected)
                expected += 4 + 8 * count
            partition, model = -1, ""
            if version >= 3:
                partition, size = struct.unpack_from("<iH", data, expected)
                expected += 6
                model = data[expected : expected + size].decode()
                expected += size
            history, ticks, width = _NO_HISTORY, 0, 0
            if version >= 5:
                ticks, width = _HISTORY.unpack_from(data, expected)
                expected += _HISTORY.size
                at, expected = expected, expected + 4 * ticks * width
            if len(data) != expected:
                raise StateError(f"state bytes: expected {expected} bytes, got {len(data)}")
            hs, cs = [], []
            for size in sizes:
                hs.append(np.frombuffer(data, dtype="<f4", count=size, offset=pos).copy())
                pos += 4 * size
                if keeps_c:
                    cs.append(np.frombuffer(data, dtype="<f4", count=size, offset=pos).copy())
                    pos += 4 * size
            extra: tuple[float, ...] = ()
            if version >= 2:
                (count,) = struct.unpack_from("<I", data, pos)
                extra = tuple(
                    np.frombuffer(data, dtype="<f8", count=count, offset=pos + 4).tolist()
                )
            if ticks * width:
                ring = np.frombuffer(data, dtype="<f4", count=ticks * width, offset=at)
                history = ring.reshape(ticks, width).copy()
        except (struct.error, UnicodeDecodeError) as exc:
            raise StateError(f"state bytes: truncated or corrupt ({exc})") from exc
        return cls(
            h=tuple(hs),
            c=tuple(cs),
            step=step,
            offset=offset,
            last_seen=last_seen,
            extra=extra,
            partition=partition,
            model=model,
            cell=cell,
            history=history,
        )


@dataclass(frozen=True, eq=False)
class StateArrays:
    """Many streams' states as columns: row i is stream ``ids[i]``; all of one ``cell``.

    ``h[l]`` and ``c[l]`` are float32 ``[N, H_l]`` (no ``c`` for a GRU or RNN);
    ``extra`` float64 ``[N, E]``; ``history`` float32 ``[N, K, F]``, each stream's
    ring of raw ticks (``StreamState.history``), None without one.
    """

    ids: list[str]
    h: list[npt.NDArray[np.float32]]
    c: list[npt.NDArray[np.float32]]
    step: npt.NDArray[np.int64]
    offset: npt.NDArray[np.int64]
    partition: npt.NDArray[np.int64]
    last_seen: npt.NDArray[np.float64]
    extra: npt.NDArray[np.float64]
    models: list[str]
    cell: str = "lstm"
    history: npt.NDArray[np.float32] | None = None

    def zeroed(
        self, hidden_sizes: Sequence[int], cell: str, *, keep_steps: bool = True
    ) -> StateArrays:
        """These states with zero ``h`` (and ``c``) of another model's cell and sizes, no
        extra columns and (unless ``keep_steps``) step 0; positions, times and tick
        histories kept (what a swap or a restore that does not carry the state loads)."""
        n = len(self.ids)
        zeros = [np.zeros((n, size), np.float32) for size in hidden_sizes]
        return replace(
            self,
            h=zeros,
            c=[z.copy() for z in zeros] if cell == "lstm" else [],
            step=np.array(self.step, dtype=np.int64) if keep_steps else np.zeros(n, np.int64),
            extra=np.zeros((n, 0)),
            cell=cell,
        )

    def take(self, rows: npt.NDArray[np.int64] | Sequence[int]) -> StateArrays:
        """These rows' states (in the order given), tick histories included."""
        index = np.asarray(rows, dtype=np.int64)
        picked = index.tolist()
        return replace(
            self,
            ids=[self.ids[i] for i in picked],
            h=[h[index] for h in self.h],
            c=[c[index] for c in self.c],
            step=self.step[index],
            offset=self.offset[index],
            partition=self.partition[index],
            last_seen=self.last_seen[index],
            extra=self.extra[index],
            models=[self.models[i] for i in picked],
            history=None if self.history is None else self.history[index],
        )

    @classmethod
    def from_states(cls, states: dict[str, StreamState]) -> StateArrays:
        """The states as columns; ``StateError`` where they are of more than one cell."""
        ids = list(states)
        values = [states[s] for s in ids]
        cells = sorted({v.cell for v in values})
        if len(cells) > 1:
            raise StateError(f"states of more than one cell ({', '.join(cells)}) in one restore")
        layers = len(values[0].h) if values else 0
        c_layers = len(values[0].c) if values else 0
        width = max((len(v.extra) for v in values), default=0)
        extra = np.zeros((len(ids), width))
        for i, v in enumerate(values):
            extra[i, : len(v.extra)] = v.extra
        # Rings of several sizes (records from before and after a --history-ticks change):
        # the largest kept, the others' rows NaN (no tick held).
        shape = max((v.history.shape for v in values), default=(0, 0))
        history = np.full((len(ids), *shape), np.nan, np.float32) if shape[0] else None
        if history is not None:
            for i, v in enumerate(values):
                if v.history.shape == shape:
                    history[i] = v.history
        return cls(
            ids=ids,
            h=[np.stack([v.h[k] for v in values]) for k in range(layers)],
            c=[np.stack([v.c[k] for v in values]) for k in range(c_layers)],
            step=np.array([v.step for v in values], dtype=np.int64),
            offset=np.array([v.offset for v in values], dtype=np.int64),
            partition=np.array([v.partition for v in values], dtype=np.int64),
            last_seen=np.array([v.last_seen for v in values], dtype=np.float64),
            extra=extra,
            models=[v.model for v in values],
            cell=cells[0] if cells else "lstm",
            history=history,
        )


@dataclass(frozen=True, eq=False)
class StateBlobs:
    """Many states' bytes in one buffer: stream ``ids[i]``'s are ``data[starts[i]:ends[i]]``.

    What a restore hands the engine: one buffer (a mapped file, not one bytes
    object per stream) that ``decode_many`` reads as a table.
    """

    ids: list[str]
    data: npt.NDArray[np.uint8]
    starts: npt.NDArray[np.int64]
    ends: npt.NDArray[np.int64]

    @classmethod
    def from_dict(cls, blobs: Mapping[str, bytes]) -> StateBlobs:
        values = list(blobs.values())
        lengths = np.fromiter(map(len, values), np.int64, len(values))
        ends = np.cumsum(lengths, dtype=np.int64)
        data = np.frombuffer(b"".join(values), dtype=np.uint8)
        return cls(list(blobs), data, ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.ids)

    def blob(self, i: int) -> bytes:
        return self.data[int(self.starts[i]) : int(self.ends[i])].tobytes()

    def items(self) -> Iterator[tuple[str, bytes]]:
        for i, stream in enumerate(self.ids):
            yield stream, self.blob(i)


def decode_many(blobs: Mapping[str, bytes] | StateBlobs) -> StateArrays:
    """Many states' bytes as columns; one pass of numpy when they share one layout.

    A restore reads a changelog of states that one model wrote, so they share
    their length and layout: the buffer is read as a table, and the columns
    are views of it (no copy, no Python object per stream; ``restore_arrays``
    copies them once, into the store). Anything else is decoded one by one. A
    state that does not decode raises ``StateError`` with its stream id, and so
    do states of several layouts (cells, layer sizes: columns cannot hold them;
    the caller sorts them one by one).
    """
    if not isinstance(blobs, StateBlobs):
        blobs = StateBlobs.from_dict(blobs)
    ids = blobs.ids
    if not ids:
        return StateArrays.from_states({})
    table = _table(blobs)
    if table is None:
        states = {}
        for stream, blob in blobs.items():
            try:
                states[stream] = StreamState.from_bytes(blob)
            except StateError as exc:
                raise StateError(f"stream {stream!r}: {exc}") from exc
        sizes = {tuple(h.size for h in v.h) for v in states.values()}
        if len(sizes) > 1 and len({v.cell for v in states.values()}) == 1:  # cells: below
            raise StateError(f"states of more than one layout: layer sizes {sorted(sizes)}")
        return StateArrays.from_states(states)
    first = blobs.blob(0)
    template = StreamState.from_bytes(first)
    n, size = table.shape

    def column(start: int, dtype: str, count: int) -> npt.NDArray[Any]:
        # A strided view of the table: unaligned rows are fine for numpy, and
        # the store copies each column once, to where it belongs.
        kind = np.dtype(dtype)
        return np.ndarray((n, count), kind, table, start, (size, kind.itemsize))

    pos = _sizes_at(first[4]) + 4 * len(template.h)
    hs, cs = [], []
    for h in template.h:
        hs.append(column(pos, "<f4", h.size))
        pos += 4 * h.size
        if template.c:
            cs.append(column(pos, "<f4", h.size))
            pos += 4 * h.size
    count = len(template.extra)
    ticks, width = template.history.shape
    history = np.ndarray(
        (n, ticks, width), np.dtype("<f4"), table, size - 4 * ticks * width, (size, 4 * width, 4)
    )
    return StateArrays(
        ids=ids,
        h=hs,
        c=cs,
        step=column(6, "<i8", 1)[:, 0],
        offset=column(14, "<i8", 1)[:, 0],
        partition=np.full(n, template.partition, dtype=np.int64),
        last_seen=column(22, "<f8", 1)[:, 0],
        extra=column(pos + 4, "<f8", count) if count else np.zeros((n, 0)),
        models=[template.model] * n,
        cell=template.cell,
        history=history,
    )


def _table(blobs: StateBlobs) -> npt.NDArray[np.uint8] | None:
    """The states as rows of one table (a view where they lie end to end), or None unless
    they share one layout: one length, one version of ``_TABLE_VERSIONS`` (3's are an
    LSTM's), the same cell, layer sizes, extras, partition and model."""
    first = blobs.blob(0)
    try:
        template = StreamState.from_bytes(first)
    except StateError as exc:
        raise StateError(f"stream {blobs.ids[0]!r}: {exc}") from exc
    n, size = len(blobs.ids), len(first)
    if first[4] not in _TABLE_VERSIONS or not (blobs.ends - blobs.starts == size).all():
        return None
    start = int(blobs.starts[0])
    if np.array_equal(blobs.starts, start + size * np.arange(n, dtype=np.int64)):
        table = blobs.data[start : start + n * size].reshape(n, size)
    else:  # others between them (superseded states, tombstoned streams'): one copy
        table = np.lib.stride_tricks.sliding_window_view(blobs.data, size)[blobs.starts]
    layers = len(template.h)
    ring = (_HISTORY.size + 4 * template.history.size) if first[4] >= 5 else 0
    ends = 6 + len(template.model.encode()) + ring  # partition, model, history
    tail = 4 + 8 * len(template.extra) + ends
    for lo, hi in (
        (0, 6),  # magic, version, layer count
        (_HEADER.size, _sizes_at(first[4]) + 4 * layers),  # cell (version 4) and layer sizes
        (size - tail, size - tail + 4),  # extra count
        (size - ends, size - ring + (_HISTORY.size if ring else 0)),  # partition, model, K, F
    ):
        if not (table[:, lo:hi] == table[0, lo:hi]).all():
            return None
    return table


def encode_many(
    *,
    h: list[npt.NDArray[np.float32]],
    c: list[npt.NDArray[np.float32]],
    step: npt.NDArray[np.int64],
    offset: npt.NDArray[np.int64],
    last_seen: npt.NDArray[np.float64],
    extra: npt.NDArray[np.float64],
    partition: npt.NDArray[np.int64],
    model: str,
    cell: str = "lstm",
    history: npt.NDArray[np.float32] | None = None,
) -> list[bytes]:
    """``StreamState(...).to_bytes()`` of N streams at once, byte for byte.

    ``h[l]``/``c[l]`` are ``[N, H_l]`` (``c`` empty for a GRU or RNN), ``extra``
    ``[N, E]``, ``history`` ``[N, K, F]`` (None: none), the rest ``[N]``.
    One packed record array holds every state (a checkpoint of 10k streams
    built one ``StreamState`` at a time cost the engine child ~15% of its
    time); each stream's bytes are then one slice of it.
    """
    n = len(step)
    name = model.encode()
    fields: list[Any] = [
        ("magic", "S4"),
        ("version", "u1"),
        ("layers", "u1"),
        ("step", "<i8"),
        ("offset", "<i8"),
        ("last_seen", "<f8"),
        ("cell", "u1"),
        ("sizes", "<u4", (len(h),)),
    ]
    if len(c) != (len(h) if cell == "lstm" else 0):
        raise StateError(f"state: {len(h)} h and {len(c)} c layers for a {cell.upper()}")
    for layer, hl in enumerate(h):
        fields.append((f"h{layer}", "<f4", (hl.shape[1],)))
        if c:
            fields.append((f"c{layer}", "<f4", (c[layer].shape[1],)))
    fields.append(("count", "<u4"))
    # No field for what has no bytes (no extra columns, no model name).
    if extra.shape[1]:
        fields.append(("extra", "<f8", (extra.shape[1],)))
    fields += [("partition", "<i4"), ("model_size", "<u2")]
    if name:
        fields.append(("model", f"S{len(name)}"))
    ring = history if history is not None else np.zeros((n, 0, 0), np.float32)
    fields += [("ticks", "<u2"), ("width", "<u2")]
    if ring.size:
        fields.append(("history", "<f4", ring.shape[1:]))
    dtype = np.dtype(fields)  # packed: no alignment padding, as struct's "<"
    table = np.zeros(n, dtype=dtype)
    table["magic"] = _MAGIC
    table["version"] = _FORMAT_VERSION
    table["layers"] = len(h)
    table["step"] = step
    table["offset"] = offset
    table["last_seen"] = last_seen
    table["cell"] = _cell_code(cell)
    table["sizes"] = [hl.shape[1] for hl in h]
    for layer, hl in enumerate(h):
        table[f"h{layer}"] = hl
    for layer, cl in enumerate(c):
        table[f"c{layer}"] = cl
    table["count"] = extra.shape[1]
    if extra.shape[1]:
        table["extra"] = extra
    table["partition"] = partition
    table["model_size"] = len(name)
    if name:
        table["model"] = name
    table["ticks"], table["width"] = ring.shape[1:]
    if ring.size:
        table["history"] = ring
    data = table.tobytes()
    size = dtype.itemsize
    return [data[i * size : (i + 1) * size] for i in range(n)]

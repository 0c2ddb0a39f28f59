"""``StreamState``: one stream's state detached from the store, and its versioned bytes.

The bytes are what the changelog topic holds (see docs/durability.md,
"Durable state"): little-endian, a magic and a format version first, so a
newer reader takes older states. Version 3: header (magic, version, layers,
step, offset, last_seen), each layer's size, then ``h`` and ``c`` per layer
(float32), the extra per-stream numbers (float64), the input partition and
the model's fingerprint.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import StateError

__all__ = ["StateArrays", "StateBlobs", "StreamState", "decode_many", "encode_many"]

_MAGIC = b"SLST"
_FORMAT_VERSION = 3  # 3 appends partition and model; 2 the extra columns; 1, 2 still read
_HEADER = struct.Struct("<4sBBqqd")


@dataclass(frozen=True, eq=False)
class StreamState:
    """One stream's state, detached from the store.

    ``h[l]`` and ``c[l]`` are float32 ``[H_l]``; ``step`` counts ticks since the
    last reset; ``offset`` is the input offset of the last tick it reflects
    (-1 when unknown); ``last_seen`` is in seconds; ``extra`` holds the
    engine's other per-stream numbers (the anomaly score's running state);
    ``partition`` is the input partition of the ticks it reflects (-1 when
    unknown) and ``model`` the fingerprint of the model that made it (the
    bundle's ``model_id``; empty when unknown).
    """

    h: tuple[npt.NDArray[np.float32], ...]
    c: tuple[npt.NDArray[np.float32], ...]
    step: int
    offset: int = -1
    last_seen: float = math.nan
    extra: tuple[float, ...] = ()
    partition: int = -1
    model: str = ""

    def to_bytes(self) -> bytes:
        parts = [
            _HEADER.pack(
                _MAGIC, _FORMAT_VERSION, len(self.h), self.step, self.offset, self.last_seen
            ),
            struct.pack(f"<{len(self.h)}I", *(h.size for h in self.h)),
        ]
        for h, c in zip(self.h, self.c, strict=True):
            parts.append(np.asarray(h, dtype="<f4").tobytes())
            parts.append(np.asarray(c, dtype="<f4").tobytes())
        parts.append(struct.pack("<I", len(self.extra)))
        parts.append(np.asarray(self.extra, dtype="<f8").tobytes())
        model = self.model.encode()
        parts.append(struct.pack("<iH", self.partition, len(model)))
        parts.append(model)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamState:
        try:
            magic, version, layers, step, offset, last_seen = _HEADER.unpack_from(data, 0)
            if magic != _MAGIC or version not in (1, 2, _FORMAT_VERSION):
                raise StateError(f"state bytes: bad magic or version ({magic!r}, {version})")
            pos = _HEADER.size
            sizes = struct.unpack_from(f"<{layers}I", data, pos)
            pos += 4 * layers
            expected = pos + sum(8 * s for s in sizes)
            if version >= 2:
                (count,) = struct.unpack_from("<I", data, expected)
                expected += 4 + 8 * count
            partition, model = -1, ""
            if version >= 3:
                partition, size = struct.unpack_from("<iH", data, expected)
                expected += 6
                model = data[expected : expected + size].decode()
                expected += size
            if len(data) != expected:
                raise StateError(f"state bytes: expected {expected} bytes, got {len(data)}")
            hs, cs = [], []
            for size in sizes:
                hs.append(np.frombuffer(data, dtype="<f4", count=size, offset=pos).copy())
                pos += 4 * size
                cs.append(np.frombuffer(data, dtype="<f4", count=size, offset=pos).copy())
                pos += 4 * size
            extra: tuple[float, ...] = ()
            if version >= 2:
                (count,) = struct.unpack_from("<I", data, pos)
                extra = tuple(
                    np.frombuffer(data, dtype="<f8", count=count, offset=pos + 4).tolist()
                )
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
        )


@dataclass(frozen=True, eq=False)
class StateArrays:
    """Many streams' states as columns: row i is stream ``ids[i]``.

    ``h[l]`` and ``c[l]`` are float32 ``[N, H_l]``; ``extra`` float64 ``[N, E]``.
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

    @classmethod
    def from_states(cls, states: dict[str, StreamState]) -> StateArrays:
        ids = list(states)
        values = [states[s] for s in ids]
        layers = len(values[0].h) if values else 0
        width = max((len(v.extra) for v in values), default=0)
        extra = np.zeros((len(ids), width))
        for i, v in enumerate(values):
            extra[i, : len(v.extra)] = v.extra
        return cls(
            ids=ids,
            h=[np.stack([v.h[k] for v in values]) for k in range(layers)],
            c=[np.stack([v.c[k] for v in values]) for k in range(layers)],
            step=np.array([v.step for v in values], dtype=np.int64),
            offset=np.array([v.offset for v in values], dtype=np.int64),
            partition=np.array([v.partition for v in values], dtype=np.int64),
            last_seen=np.array([v.last_seen for v in values], dtype=np.float64),
            extra=extra,
            models=[v.model for v in values],
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
    state that does not decode raises ``StateError`` with its stream id.
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
        return StateArrays.from_states(states)
    template = StreamState.from_bytes(blobs.blob(0))
    n, size = table.shape

    def column(start: int, dtype: str, count: int) -> npt.NDArray[Any]:
        # A strided view of the table: unaligned rows are fine for numpy, and
        # the store copies each column once, to where it belongs.
        kind = np.dtype(dtype)
        return np.ndarray((n, count), kind, table, start, (size, kind.itemsize))

    pos = 30 + 4 * len(template.h)
    hs, cs = [], []
    for h in template.h:
        hs.append(column(pos, "<f4", h.size))
        pos += 4 * h.size
        cs.append(column(pos, "<f4", h.size))
        pos += 4 * h.size
    count = len(template.extra)
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
    )


def _table(blobs: StateBlobs) -> npt.NDArray[np.uint8] | None:
    """The states as rows of one table (a view where they lie end to end), or None unless
    they share one layout: one length, the current version, the same layer sizes,
    extras, partition and model."""
    first = blobs.blob(0)
    try:
        template = StreamState.from_bytes(first)
    except StateError as exc:
        raise StateError(f"stream {blobs.ids[0]!r}: {exc}") from exc
    n, size = len(blobs.ids), len(first)
    if first[4] != _FORMAT_VERSION or not (blobs.ends - blobs.starts == size).all():
        return None
    start = int(blobs.starts[0])
    if np.array_equal(blobs.starts, start + size * np.arange(n, dtype=np.int64)):
        table = blobs.data[start : start + n * size].reshape(n, size)
    else:  # others between them (superseded states, tombstoned streams'): one copy
        table = np.lib.stride_tricks.sliding_window_view(blobs.data, size)[blobs.starts]
    layers = len(template.h)
    ends = 6 + len(template.model.encode())  # partition and model
    tail = 4 + 8 * len(template.extra) + ends
    for lo, hi in (
        (0, 6),  # magic, version, layer count
        (30, 30 + 4 * layers),  # layer sizes
        (size - tail, size - tail + 4),  # extra count
        (size - ends, size),  # partition and model
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
) -> list[bytes]:
    """``StreamState(...).to_bytes()`` of N streams at once, byte for byte.

    ``h[l]``/``c[l]`` are ``[N, H_l]``, ``extra`` ``[N, E]``, the rest ``[N]``.
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
        ("sizes", "<u4", (len(h),)),
    ]
    for layer, (hl, cl) in enumerate(zip(h, c, strict=True)):
        fields += [(f"h{layer}", "<f4", (hl.shape[1],)), (f"c{layer}", "<f4", (cl.shape[1],))]
    fields.append(("count", "<u4"))
    # No field for what has no bytes (no extra columns, no model name).
    if extra.shape[1]:
        fields.append(("extra", "<f8", (extra.shape[1],)))
    fields += [("partition", "<i4"), ("model_size", "<u2")]
    if name:
        fields.append(("model", f"S{len(name)}"))
    dtype = np.dtype(fields)  # packed: no alignment padding, as struct's "<"
    table = np.zeros(n, dtype=dtype)
    table["magic"] = _MAGIC
    table["version"] = _FORMAT_VERSION
    table["layers"] = len(h)
    table["step"] = step
    table["offset"] = offset
    table["last_seen"] = last_seen
    table["sizes"] = [hl.shape[1] for hl in h]
    for layer, (hl, cl) in enumerate(zip(h, c, strict=True)):
        table[f"h{layer}"] = hl
        table[f"c{layer}"] = cl
    table["count"] = extra.shape[1]
    if extra.shape[1]:
        table["extra"] = extra
    table["partition"] = partition
    table["model_size"] = len(name)
    if name:
        table["model"] = name
    data = table.tobytes()
    size = dtype.itemsize
    return [data[i * size : (i + 1) * size] for i in range(n)]

"""``StreamState``: one stream's state detached from the store, and its versioned bytes.

The bytes are what the changelog topic holds (see ../shared/design.md,
"Durable state"): little-endian, a magic and a format version first, so a
newer reader takes older states. Version 3: header (magic, version, layers,
step, offset, last_seen), each layer's size, then ``h`` and ``c`` per layer
(float32), the extra per-stream numbers (float64), the input partition and
the model's fingerprint.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import StateError

__all__ = ["StateArrays", "StreamState", "decode_many"]

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


def decode_many(blobs: dict[str, bytes]) -> StateArrays:
    """Many states' bytes as columns; one pass of numpy when they share one layout.

    A restore reads a changelog of states that one model wrote, so they share
    their length and layout: the bytes are joined and sliced as a table (no
    Python object per stream). Anything else is decoded one by one. A state
    that does not decode raises ``StateError`` with its stream id.
    """
    ids = list(blobs)
    if not ids:
        return StateArrays.from_states({})
    first = blobs[ids[0]]
    try:
        template = StreamState.from_bytes(first)
    except StateError as exc:
        raise StateError(f"stream {ids[0]!r}: {exc}") from exc
    size = len(first)
    layers = len(template.h)
    tail = 4 + 8 * len(template.extra) + 6 + len(template.model.encode())
    uniform = first[4] == _FORMAT_VERSION and all(len(blobs[s]) == size for s in ids)
    if uniform:
        table = np.frombuffer(b"".join(blobs[s] for s in ids), dtype=np.uint8).reshape(-1, size)
        ends = 6 + len(template.model.encode())  # partition and model
        fixed = np.concatenate(
            [
                table[:, :6],  # magic, version, layer count
                table[:, 30 : 30 + 4 * layers],  # layer sizes
                table[:, size - tail : size - tail + 4],  # extra count
                table[:, size - ends :],  # partition and model
            ],
            axis=1,
        )
        uniform = bool((fixed == fixed[0]).all())
    if not uniform:
        states = {}
        for stream in ids:
            try:
                states[stream] = StreamState.from_bytes(blobs[stream])
            except StateError as exc:
                raise StateError(f"stream {stream!r}: {exc}") from exc
        return StateArrays.from_states(states)

    def column(start: int, dtype: str, count: int) -> npt.NDArray[Any]:
        width = np.dtype(dtype).itemsize * count
        return table[:, start : start + width].copy().view(dtype).reshape(len(ids), count)

    pos = 30 + 4 * layers
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
        step=column(6, "<i8", 1)[:, 0].copy(),
        offset=column(14, "<i8", 1)[:, 0].copy(),
        partition=np.full(len(ids), template.partition, dtype=np.int64),
        last_seen=column(22, "<f8", 1)[:, 0].copy(),
        extra=column(pos + 4, "<f8", count) if count else np.zeros((len(ids), 0)),
        models=[template.model] * len(ids),
    )

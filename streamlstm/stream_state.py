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

import numpy as np
import numpy.typing as npt

from streamlstm.errors import StateError

__all__ = ["StreamState"]

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

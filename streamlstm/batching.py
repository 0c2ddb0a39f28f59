"""How one call's ticks are batched: rounds of distinct streams, padded bucket sizes, buffers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from streamlstm.kernels import distinct_held
from streamlstm.model import LayerGroup
from streamlstm.results import I64

__all__ = ["Buffers", "Rounds", "bucket"]


class Rounds:
    """Splits a call's ticks into rounds of distinct streams, in arrival order.

    ``held`` are the ids' slots in the store (-1 if new). When every id is
    held and the slots are distinct, that settles it without hashing the ids
    again (the common case); otherwise the ids themselves are grouped.
    ``distinct``: whether that is so, where the caller knows
    (``StateStore.locate``), else it is found from ``held``.
    """

    def __init__(self, ids: Sequence[str], held: I64, distinct: bool | None = None) -> None:
        n = len(ids)
        if distinct is None or not n:
            distinct = not n or distinct_held(held)
        if not distinct:
            if n and held.min() >= 0:
                # Every id held: its slot names its stream, so no id is hashed again.
                keys = held
            else:
                index: dict[str, int] = {}
                keys = np.array([index.setdefault(s, len(index)) for s in ids], dtype=np.int64)
            # Ticks grouped by stream by a stable sort: a group's rows stay in arrival order.
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            is_start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
            starts = np.flatnonzero(is_start)
            distinct = starts.size == n
        if distinct:
            self.unique: Sequence[str] = ids
            self.inverse = np.arange(n, dtype=np.int64)
            self.round_of: I64 | None = None
            self.first = self.inverse
            self.last = self.inverse
            return
        # Streams numbered by their first tick (groups are in key order).
        by_arrival = np.argsort(order[starts])
        rank = np.empty(starts.size, dtype=np.int64)
        rank[by_arrival] = np.arange(starts.size)
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = rank[np.cumsum(is_start) - 1]
        # Occurrence number of each tick within its stream.
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        round_of = np.empty(n, dtype=np.int64)
        round_of[order] = np.arange(n) - group_start
        ends = np.r_[starts[1:], n] - 1
        self.first = order[starts][by_arrival]
        self.last = order[ends][by_arrival]
        self.unique = [ids[i] for i in self.first.tolist()]
        self.inverse = inverse
        self.round_of = round_of

    def per_stream_max(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The largest of each unique stream's ``values`` (one per tick), by ``unique``."""
        if self.round_of is None:
            return values.copy()
        out = np.full(len(self.unique), -np.inf)
        np.maximum.at(out, self.inverse, values)
        return out

    def rounds(self) -> list[I64 | None]:
        """Row indices of each round; ``[None]`` means one round of every row."""
        if self.round_of is None:
            return [None]
        # Rows sorted by round, stably: each round keeps arrival order.
        order = np.argsort(self.round_of, kind="stable")
        bounds = np.searchsorted(self.round_of[order], np.arange(int(self.round_of.max()) + 2))
        return [order[bounds[r] : bounds[r + 1]] for r in range(bounds.size - 1)]


class Buffers:
    """Persistent step inputs: one allocation per tensor, viewed at each bucket size."""

    def __init__(self, groups: Sequence[LayerGroup], width: int) -> None:
        self._groups = groups
        self._width = width
        self._rows = 0
        self._x = torch.zeros(0)
        self._h: list[torch.Tensor] = []
        self._c: list[torch.Tensor] = []
        self._views: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}

    def view(self, bucket: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``x [bucket, F]`` and per layer group ``h``, ``c`` ``[count, bucket, H]``, contiguous."""
        views = self._views.get(bucket)
        if views is not None:
            return views
        if bucket > self._rows:
            self._rows = bucket
            self._x = torch.zeros(bucket * self._width)
            self._h = [torch.zeros(g.count * bucket * g.hidden_size) for g in self._groups]
            self._c = [torch.zeros(g.count * bucket * g.hidden_size) for g in self._groups]
            self._views.clear()
        shapes = [(g.count, bucket, g.hidden_size) for g in self._groups]
        views = self._views[bucket] = (
            self._x[: bucket * self._width].view(bucket, self._width),
            [t[: math.prod(s)].view(s) for t, s in zip(self._h, shapes, strict=True)],
            [t[: math.prod(s)].view(s) for t, s in zip(self._c, shapes, strict=True)],
        )
        return views


def bucket(batch: int) -> int:
    """Batch sizes rounded up: 8, 16, 32, 64, then multiples of 64, and past 1024 of 1/16 octave.

    Few shapes (oneDNN caches one primitive per shape) and little padding:
    a 700-row batch steps 704 rows, where powers of two made it 1024.
    """
    if batch <= 64:
        return max(8, 1 << (batch - 1).bit_length())
    grain = max(64, 1 << ((batch - 1).bit_length() - 4))
    return -(-batch // grain) * grain

"""How one call's ticks are batched: rounds of distinct streams, padded bucket sizes, buffers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from streamlstm.model import LayerGroup
from streamlstm.results import I64

__all__ = ["Buffers", "Rounds", "bucket", "distinct_held"]


class Rounds:
    """Splits a call's ticks into rounds of distinct streams, in arrival order.

    ``held`` are the ids' slots in the store (-1 if new). When every id is
    held and the slots are distinct, that settles it without hashing the ids
    again (the common case); otherwise the ids themselves are grouped.
    """

    def __init__(self, ids: Sequence[str], held: I64) -> None:
        n = len(ids)
        self.unique: Sequence[str] = ids if distinct_held(held) else list(dict.fromkeys(ids))
        if len(self.unique) == n:
            self.inverse = np.arange(n, dtype=np.int64)
            self.round_of: I64 | None = None
            self.first = self.inverse
            self.last = self.inverse
            return
        index = {s: i for i, s in enumerate(self.unique)}
        inverse = np.array([index[s] for s in ids], dtype=np.int64)
        # Occurrence number of each tick within its stream, by a stable sort.
        order = np.argsort(inverse, kind="stable")
        sorted_inv = inverse[order]
        starts = np.flatnonzero(np.r_[True, sorted_inv[1:] != sorted_inv[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        round_of = np.empty(n, dtype=np.int64)
        round_of[order] = np.arange(n) - group_start
        ends = np.r_[starts[1:], n] - 1
        self.inverse = inverse
        self.round_of = round_of
        self.first = order[starts]
        self.last = order[ends]

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


def distinct_held(held: I64) -> bool:
    """Whether every slot is a held one (not -1) and none repeats."""
    if not held.size or held.min() < 0:
        return False
    ordered = np.sort(held)
    return bool((ordered[1:] != ordered[:-1]).all())


def bucket(batch: int) -> int:
    """Batch sizes rounded up: 8, 16, 32, 64, then multiples of 64, and past 1024 of 1/16 octave.

    Few shapes (oneDNN caches one primitive per shape) and little padding:
    a 700-row batch steps 704 rows, where powers of two made it 1024.
    """
    if batch <= 64:
        return max(8, 1 << (batch - 1).bit_length())
    grain = max(64, 1 << ((batch - 1).bit_length() - 4))
    return -(-batch // grain) * grain

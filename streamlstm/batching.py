"""How one call's ticks are batched: rounds of distinct streams, in arrival order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.kernels import distinct_held
from streamlstm.results import I64

__all__ = ["Rounds", "each_round"]


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


def each_round(rounds: list[I64 | None], slots: I64) -> Iterator[tuple[Any, I64]]:
    """Each round of ``Rounds.rounds()`` as (the selector of its rows, their slots):
    ``slice(None)`` for a call whose ticks are one round, else the rows' indices."""
    for members in rounds:
        sel: Any = slice(None) if members is None else members
        yield sel, slots[sel]

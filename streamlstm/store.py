"""Per-stream recurrent state: pre-allocated arrays, a slot map, LRU and TTL.

Layout: for every recurrent layer ``l`` one ``h`` float32 array of shape
``[capacity, H_l]``, and for an LSTM's layers one ``c`` array as well (a GRU or
RNN keeps no ``c``: ``c`` is an empty list, half the bytes); a stream owns one
row (a *slot*) in all of them. Small
per-slot arrays hold the step count since reset, the input partition and
offset of the last tick applied (the engine skips a tick its state already
reflects), the last time the stream was seen (TTL) and a use counter (LRU);
``changes`` what changed since the last checkpoint.

Capacity doubles on demand up to ``max_streams``; at the bound the least
recently used stream is evicted. Nothing is dropped silently: every eviction
is returned to the caller with the evicted state, and counted by reason.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from streamlstm.changes import Changes
from streamlstm.config import CELLS
from streamlstm.errors import ConfigError, StateError
from streamlstm.kernels import native_available, slot_map
from streamlstm.stream_state import StateArrays, StreamState, decode_many, encode_many

if TYPE_CHECKING:
    from streamlstm.cold_tier import ColdTier, Frozen

__all__ = ["Eviction", "EvictionReason", "StateStore", "StreamState"]

EvictionReason = Literal["lru", "ttl"]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

logger = logging.getLogger(__name__)

_NEVER = np.iinfo(np.int64).max
#: A free slot's partition.
_FREE = -2
#: Slots a listing page looks at between checks of its limit.
_PAGE_CHUNK = 8192
#: Slots one listing page looks at, at most (the admin API's pages): a page with a rare
#: prefix costs about a step of 1024 ticks at any store size (``bench engine``, reads).
MAX_PAGE_SCAN = 32_768


@dataclass(frozen=True, eq=False)
class Eviction:
    """A stream removed from memory, with the state it had."""

    stream_id: str
    reason: EvictionReason
    state: StreamState


class StateStore:
    """In-memory store of every active stream's recurrent state.

    ``cell`` is the model's recurrent cell (``ModelConfig.cell``): an LSTM's
    streams hold ``h`` and ``c`` per layer, a GRU's or RNN's ``h`` alone.
    ``native`` picks the id -> slot map (``kernels.slot_map``): the C one,
    a dict, or the C one where it is built (``None``). Not thread-safe: one
    engine owns one store, and one thread steps it.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int],
        *,
        cell: str = "lstm",
        max_streams: int,
        idle_ttl_s: float | None = None,
        initial_capacity: int = 1024,
        extra_width: int = 0,
        extra_kept: int | None = None,
        answer_width: int = 0,
        history: tuple[int, int] = (0, 0),
        native: bool | None = None,
    ) -> None:
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise ConfigError(f"max_streams: must be a positive integer, got {max_streams!r}")
        if idle_ttl_s is not None and not (
            isinstance(idle_ttl_s, int | float) and math.isfinite(idle_ttl_s) and idle_ttl_s > 0
        ):
            raise ConfigError(f"idle_ttl_s: must be a positive number or None, got {idle_ttl_s!r}")
        if cell not in CELLS:
            raise ConfigError(f"cell: must be one of {', '.join(CELLS)}, got {cell!r}")
        self.hidden_sizes = tuple(hidden_sizes)
        self.cell = cell
        self.max_streams = max_streams
        self.idle_ttl_s = None if idle_ttl_s is None else float(idle_ttl_s)
        cap = max(1, min(initial_capacity, max_streams))
        self.h = [np.zeros((cap, size), dtype=np.float32) for size in self.hidden_sizes]
        #: An LSTM's ``c`` per layer; empty for a GRU or RNN (their state is ``h`` alone).
        self.c = [
            np.zeros((cap, size), dtype=np.float32)
            for size in (self.hidden_sizes if cell == "lstm" else ())
        ]
        self.steps: I64 = np.zeros(cap, dtype=np.int64)
        self.offsets: I64 = np.full(cap, -1, dtype=np.int64)
        #: The input partition of the ticks each slot's state reflects (-1: unknown; a
        #: free slot's is _FREE, so counting by partition needs no mask of held slots).
        self.partitions: I64 = np.full(cap, _FREE, dtype=np.int64)
        self.last_seen: F64 = np.zeros(cap, dtype=np.float64)
        #: Other per-stream numbers the engine keeps (zeroed with the state).
        self.extra = np.zeros((cap, extra_width), dtype=np.float64)
        #: The leading extra columns a restore keeps from a state saved with another
        #: count of them (the anomaly score's); the rest start from zero.
        self.extra_kept = extra_width if extra_kept is None else min(extra_kept, extra_width)
        #: Each stream's last answer (``answer_width`` numbers: the engine's predictions
        #: and score), for inspection only: never checkpointed, NaN until this process
        #: answers the stream (after a restore, too) and after a reset.
        self.last_answer: F64 = np.full((cap, answer_width), np.nan, dtype=np.float64)
        #: ``history`` (K, F): each stream's ring of its last K raw ticks, what a re-warm
        #: replays (``record_ticks``; ``StreamState.history`` says how it is laid out).
        #: NaN marks a row that holds no tick (a state restored without its history):
        #: a tick is never NaN, so a replay skips those rows.
        ticks, width = history
        if ticks < 0 or width < 0 or (ticks and not width) or ticks > 65535 or width > 65535:
            raise ConfigError(f"history: (ticks, width) must be in 0..65535, got {history!r}")
        self.history: npt.NDArray[np.float32] = np.full(
            (cap, ticks, width if ticks else 0), np.nan, dtype=np.float32
        )
        self._last_used: I64 = np.full(cap, _NEVER, dtype=np.int64)
        #: What changed since the last checkpoint (``take_changes``).
        self.changes = Changes(cap)
        self._slot = slot_map(native_available() if native is None else native)
        self._owner: list[str | None] = [None] * cap
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._clock = 0
        self.eviction_counts: Counter[str] = Counter()
        self._init_cold()

    def _init_cold(self) -> None:
        #: The cold tier (None: none): where LRU victims go instead of being dropped.
        self.cold: ColdTier | None = None
        #: The fingerprint the states moved to the cold tier are written with, and the
        #: ones a state read back may carry (the engine's model, and those it carried
        #: states over from); a state of another is refused.
        self.model = ""
        self.accepted_models: frozenset[str] = frozenset({""})
        #: Models whose states read back are re-warmed (a live swap with ``rewarm`` left
        #: them on disk): loaded from zero with their steps and ticks, for the engine to
        #: run this model over (``thaw`` names them), whatever their layout.
        self.rewarm_models: frozenset[str] = frozenset()

    # -- inspection ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self._owner)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._slot

    def slot_of(self, stream_id: str) -> int | None:
        return self._slot.get(stream_id)

    def partition_of(self, stream_id: str) -> int | None:
        """The input partition a held stream's state reflects (-1: unknown; None: not held)."""
        slot = self._slot.get(stream_id)
        return None if slot is None else int(self.partitions[slot])

    def stream_ids(self) -> list[str]:
        return [s for s in self._owner if s is not None]

    def held(self) -> tuple[I64, list[str]]:
        """The slots of every held stream, and their ids (in that order)."""
        slots = np.flatnonzero(self._last_used != _NEVER)
        return slots, [self._owner[i] or "" for i in slots.tolist()]

    def page(self, *, prefix: str, limit: int, cursor: int, max_scan: int) -> tuple[list[str], int]:
        """Up to ``limit`` held streams whose id starts with ``prefix``, looked for among
        at most ``max_scan`` slots from slot ``cursor`` on, and the cursor to go on from
        (-1: no slot left). Slots, not ids, give the order: a held stream keeps its slot,
        so one held throughout a listing is listed exactly once, and each page costs
        O(max_scan) however many streams there are."""
        found: list[str] = []
        slot = max(cursor, 0)
        end = min(slot + max_scan, self.capacity)
        while slot < end:
            stop = min(slot + _PAGE_CHUNK, end)
            owners = enumerate(self._owner[slot:stop], slot)
            hits = [(i, o) for i, o in owners if o is not None and o.startswith(prefix)]
            if len(found) + len(hits) >= limit:
                hits = hits[: limit - len(found)]
                found += [o for _, o in hits]
                stop = hits[-1][0] + 1 if hits else stop
                return found, (stop if stop < self.capacity else -1)
            found += [o for _, o in hits]
            slot = stop
        return found, (slot if slot < self.capacity else -1)

    def partition_counts(self) -> dict[int, int]:
        """How many held streams each input partition's ticks made (-1: unknown)."""
        counts = np.bincount(self.partitions - _FREE)
        return {p + _FREE: int(n) for p, n in enumerate(counts.tolist()) if n and p > 0}

    def streams_in(self, partitions: Collection[int]) -> list[str]:
        """The held streams whose state reflects ticks of these input partitions."""
        held = (self._last_used != _NEVER) & np.isin(self.partitions, [*partitions])
        return self._owners(np.flatnonzero(held).tolist())

    def count_steps(self, slots: I64) -> I64:
        """One more tick applied at each of the distinct ``slots``; their new counts."""
        counted = self.steps[slots] + 1
        self.steps[slots] = counted
        return counted

    def record_ticks(self, slots: I64, steps: I64, x: npt.NDArray[np.float32]) -> None:
        """The raw ticks ``x [n, F]`` just applied at the distinct ``slots``, each its
        stream's ``steps``-th since the last reset, into the history rings (if kept)."""
        ticks = self.history.shape[1]
        if ticks:
            self.history[slots, (steps - 1) % ticks] = x

    def record_step(
        self, slots: I64, *, last_seen: F64, offsets: I64 | None, partitions: I64 | None
    ) -> None:
        """A step's effects on the distinct ``slots`` besides ``h``, ``c`` and the counts:
        when each stream was last seen, the input offset (and partition: -1 for None) its
        state reflects where offsets are known; and each is marked changed for the next
        checkpoint, here, so that no caller can write a state and forget to."""
        self.last_seen[slots] = last_seen
        if offsets is not None:
            self.offsets[slots] = offsets
            self.partitions[slots] = -1 if partitions is None else partitions
        self.changes.changed[slots] = True

    def take_changes(self) -> tuple[list[str], list[int], dict[str, int]]:
        """Since the last call: the held streams whose state changed with their partitions,
        and the removed ones (``changes.tombstones``) with the partition each was in."""
        changed, removed = self.changes.take()
        slots = np.flatnonzero(changed).tolist()
        held = [(i, s) for i in slots if (s := self._owner[i]) is not None]
        return [s for _, s in held], [int(self.partitions[i]) for i, _ in held], removed

    def _owners(self, slots: Sequence[int]) -> list[str]:
        return [s for s in (self._owner[i] for i in slots) if s is not None]

    def raw_bytes_per_stream(self) -> int:
        """Bytes of ``h`` (and an LSTM's ``c``) one stream needs, float32, all layers."""
        return (2 if self.c else 1) * 4 * sum(self.hidden_sizes)

    def memory_bytes(self) -> int:
        """Everything this store holds: state arrays, per-slot arrays, the id map, the ids.

        O(streams) because it sizes every id string; meant for benchmarks.
        """
        total = sum(t.nbytes for t in (*self.h, *self.c, self.history))
        arrays = (self.steps, self.offsets, self.partitions, self.last_seen, self.extra)
        total += self.last_answer.nbytes
        total += sum(a.nbytes for a in (*arrays, self._last_used, self.changes.changed))
        total += sum(sys.getsizeof(x) for x in (self._slot, self._owner, self._free))
        total += sum(sys.getsizeof(s) for s in self._owner if s is not None)
        return total

    # -- the hot path -------------------------------------------------------

    def lookup(self, ids: Sequence[object]) -> I64:
        """The slot of each id, -1 where it is not held (anything not a held string)."""
        return self.locate(ids)[0]

    def locate(self, ids: Sequence[object]) -> tuple[I64, bool]:
        """``lookup(ids)``, and whether every id is held and none repeats."""
        out = np.empty(len(ids), dtype=np.int64)
        distinct = self._slot.lookup(ids, out)
        return out, distinct

    def acquire(
        self,
        ids: Sequence[str],
        times: F64,
        held: I64 | None = None,
        *,
        fill: bool = True,
        protect: I64 | None = None,
    ) -> tuple[I64, list[Eviction]]:
        """Slots for distinct ``ids`` (in order), creating zeroed ones as needed.

        ``times[i]`` (seconds) is when ``ids[i]`` is seen now; a known stream
        idle for more than ``idle_ttl_s`` is evicted (reason ``ttl``) and
        starts again from zero. The slots returned are safe from LRU eviction
        until the next call. ``held`` is ``lookup(ids)`` where the caller has
        it already; it is filled in and returned. ``fill=False`` leaves new
        slots' ``h``, ``c``, steps and extra columns as they are, for a caller
        that writes every one of them (a restore). ``protect``: more slots to keep safe
        from eviction in this call (a step's held streams, while its cold ones load).
        """
        n = len(ids)
        slots = self.lookup(ids) if held is None else held
        evictions: list[Eviction] = []
        fresh = np.flatnonzero(slots < 0)
        if fresh.size:
            is_known = slots >= 0
            known, known_times = slots[is_known], times[is_known]
        else:  # every id held (the common case): no masks
            known, known_times = slots, times
        if self.idle_ttl_s is not None and known.size:
            stale = known[known_times - self.last_seen[known] > self.idle_ttl_s]
            if stale.size:
                evictions += self._capture(stale, "ttl")
                self._zero(stale)
        self._clock += n
        self._last_used[known] = self._clock
        if protect is not None:
            self._last_used[protect] = self._clock
        if fresh.size:
            new_slots = self._allocate(int(fresh.size), evictions, fill=fill)
            for i, slot in zip(fresh.tolist(), new_slots.tolist(), strict=True):
                stream_id = ids[i]
                self._slot[stream_id] = slot
                self._owner[slot] = stream_id
            slots[fresh] = new_slots
            self._last_used[new_slots] = self._clock
        self.last_seen[slots] = times
        return slots, evictions

    def expire(self, now: float) -> list[Eviction]:
        """Evict every stream idle for more than ``idle_ttl_s`` at ``now`` (seconds)."""
        if self.idle_ttl_s is None or not self._slot:
            return []
        occupied = self._last_used != _NEVER
        stale = np.flatnonzero(occupied & (now - self.last_seen > self.idle_ttl_s))
        if not stale.size:
            return []
        evictions = self._capture(stale, "ttl")
        self._remove(stale)
        return evictions

    def zero(self, slots: I64, *, extra: bool = True) -> None:
        """Reset slots to the zero state with step 0 (``reset`` before a tick).

        ``extra=False`` leaves the extra columns for the caller to reset in
        its own order (the engine scores a call's rounds after stepping them).
        """
        self._zero(slots, extra=extra)

    def release(self, ids: Iterable[str]) -> None:
        """Free the slots of ``ids`` (``end`` after a tick); unknown ids are ignored."""
        slots = [self._slot[s] for s in ids if s in self._slot]
        if slots:
            self._remove(np.array(slots, dtype=np.int64))

    # -- snapshot and restore -----------------------------------------------

    def snapshot(self, ids: Iterable[str]) -> dict[str, StreamState]:
        """Copies of the states of those ``ids`` that are present."""
        present = [s for s in ids if s in self._slot]
        if not present:
            return {}
        slots = np.array([self._slot[s] for s in present], dtype=np.int64)
        return dict(zip(present, self._states(slots), strict=True))

    def encode(self, ids: Sequence[str], partitions: Sequence[int], model: str) -> list[bytes]:
        """``snapshot(ids)``'s states as changelog bytes, built at once (``ids`` present)."""
        slots = np.array([self._slot[s] for s in ids], dtype=np.int64)
        return encode_many(
            h=[t[slots] for t in self.h],
            c=[t[slots] for t in self.c],
            step=self.steps[slots],
            offset=self.offsets[slots],
            last_seen=self.last_seen[slots],
            extra=self.extra[slots],
            partition=np.asarray(partitions, dtype=np.int64),
            model=model,
            cell=self.cell,
            history=self.history[slots] if self.history.shape[1] else None,
        )

    def arrays(self) -> StateArrays:
        """Every held stream's state as columns (copies; no object per stream): what a
        model swap carries into the new model's store (``restore_arrays``)."""
        slots, ids = self.held()
        return StateArrays(
            ids=ids,
            h=[t[slots] for t in self.h],
            c=[t[slots] for t in self.c],
            step=self.steps[slots],
            offset=self.offsets[slots],
            partition=self.partitions[slots],
            last_seen=self.last_seen[slots],
            extra=self.extra[slots],
            models=[""] * len(ids),
            cell=self.cell,
            history=self.history[slots],
        )

    def take_over(self, old: StateStore, states: StateArrays) -> None:
        """Hold ``old``'s streams with ``states`` (``old.arrays()``, perhaps changed) as
        their states, and what ``old`` has not checkpointed yet: its changed marks and
        removals (a model swap: the new model's store replaces ``old``)."""
        self.restore_arrays(states)
        slots, _ = old.held()
        changed = np.flatnonzero(old.changes.changed[slots]).tolist()
        self.changes.changed[self.lookup([states.ids[i] for i in changed])] = True
        self.changes.removed = dict(old.changes.removed)
        self.changes.moved = dict(old.changes.moved)
        self.changes.tombstones = old.changes.tombstones
        self.eviction_counts = old.eviction_counts.copy()

    def restore(self, states: Mapping[str, StreamState]) -> list[Eviction]:
        """Load states (replacing any in memory); may evict LRU streams for room."""
        if not states:
            return []
        return self.restore_arrays(StateArrays.from_states(dict(states)))

    def restore_arrays(self, states: StateArrays, *, protect: I64 | None = None) -> list[Eviction]:
        """``restore`` for states as columns (a changelog restore: no object per stream);
        ``protect`` as ``acquire``'s."""
        ids = states.ids
        if not ids:
            return []
        if states.cell != self.cell:
            raise StateError(
                f"states are of a {states.cell.upper()} model, this model's cell is "
                f"{self.cell.upper()}: a state of one cell means nothing to another"
            )
        sizes = tuple(h.shape[1] for h in states.h)
        c_sizes = tuple(c.shape[1] for c in states.c)
        if sizes != self.hidden_sizes or c_sizes != tuple(a.shape[1] for a in self.c):
            raise StateError(
                f"states have layer sizes {list(sizes)}, this model has {list(self.hidden_sizes)}"
            )
        times = np.nan_to_num(states.last_seen.astype(np.float64), nan=0.0)
        saved_ttl, self.idle_ttl_s = self.idle_ttl_s, None  # restoring is not a TTL check
        try:
            # Every column of every slot is written below: no zeros first.
            slots, evictions = self.acquire(ids, times, fill=False, protect=protect)
        finally:
            self.idle_ttl_s = saved_ttl
        # The columns may be strided, unaligned views of a restore's buffer (decode_many).
        for layer in range(len(self.hidden_sizes)):
            self.h[layer][slots] = states.h[layer]
        for layer, c in enumerate(self.c):
            c[slots] = states.c[layer]
        self.steps[slots] = states.step
        self.offsets[slots] = states.offset
        # -1 where a record says less (nothing valid is below it; partition_counts
        # counts from -2, a free slot's).
        self.partitions[slots] = np.maximum(states.partition, -1)
        self.last_answer[slots] = np.nan  # no answer of this process's reflects it
        width, saved = self.extra.shape[1], states.extra.shape[1]
        # The columns are laid out score first, quality after (see ``quality``): a state
        # saved with another count of them (before quality was measured, with it off,
        # or by a model whose quality columns are laid out otherwise) keeps the score's
        # (``extra_kept``) and starts the rest from zero.
        if saved == width:
            self.extra[slots] = states.extra
        else:
            kept = min(saved, self.extra_kept)
            self.extra[slots, :kept] = states.extra[:, :kept]
            self.extra[slots, kept:] = 0.0
        self._restore_history(slots, states)
        return evictions

    def _restore_history(self, slots: I64, states: StateArrays) -> None:
        """The restored states' tick rings: as saved where laid out as this store's, re-laid
        by tick number where only K differs, else none (NaN rows: nothing to replay)."""
        ring, saved = self.history, states.history
        if not ring.shape[1]:
            return
        if saved is not None and saved.shape[1:] == ring.shape[1:]:
            ring[slots] = saved
            return
        ring[slots] = np.nan
        if saved is None or not saved.shape[1] or saved.shape[2] != ring.shape[2]:
            return
        ticks, before = ring.shape[1], saved.shape[1]
        for row, (slot, step) in enumerate(zip(slots.tolist(), states.step.tolist(), strict=True)):
            held = min(step, before, ticks)
            numbers = np.arange(step - held, step)  # the ticks kept, 0-based since the reset
            ring[slot, numbers % ticks] = saved[row, numbers % before]

    def zero_extra_after(self, ids: Sequence[str], first: int) -> None:
        """Zero the extra columns from ``first`` on of those ``ids`` held."""
        slots = self.lookup(ids)
        self.extra[slots[slots >= 0], first:] = 0.0

    # -- internals ----------------------------------------------------------

    def reserve(self, count: int) -> None:
        """Grow now (up to ``max_streams``) so that ``count`` new streams need no growth (a
        no-op where there are free slots): while a restore reads, growing costs it no wait."""
        if len(self._free) < count and self.capacity < self.max_streams:
            target = self.capacity
            while target - len(self._slot) < count and target < self.max_streams:
                target *= 2
            self._grow(min(target, self.max_streams))

    def _allocate(self, count: int, evictions: list[Eviction], *, fill: bool = True) -> I64:
        self.reserve(count)
        shortfall = count - len(self._free)
        if shortfall > 0:
            # Slots touched by this call carry the newest counter, so the
            # partition never picks them while older streams remain.
            evictable = len(self._slot) - int(np.count_nonzero(self._last_used == self._clock))
            if shortfall > evictable:
                raise ConfigError(
                    f"max_streams: one batch needs {count} new streams but only "
                    f"{len(self._free) + evictable} slots can be made free; raise "
                    f"max_streams (now {self.max_streams}) or send smaller batches"
                )
            victims = np.argpartition(self._last_used, shortfall - 1)[:shortfall]
            if self.cold is not None:
                evictions += self._freeze(victims)
            else:
                evictions += self._capture(victims, "lru")
                self._remove(victims)
        # The last ``count`` free slots, in the order ``pop()`` would give them.
        slots = np.array(self._free[len(self._free) - count :][::-1], dtype=np.int64)
        del self._free[len(self._free) - count :]
        if fill:
            self._zero(slots)
        self.offsets[slots] = -1
        self.partitions[slots] = -1
        self.last_answer[slots] = np.nan
        return slots

    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        # One array at a time, so the transient peak is one array's growth,
        # not a second copy of the whole store. Zeros, not empty: the memory is
        # touched here (np.zeros alone maps it lazily), so ``reserve`` ahead of
        # a restore takes its page faults.
        for arrays in (self.h, self.c):
            for i, array in enumerate(arrays):
                grown = np.empty((new_capacity, array.shape[1]), dtype=np.float32)
                grown[:old] = array
                grown[old:] = 0.0
                arrays[i] = grown
                del array, grown
        self.steps = _grow_array(self.steps, new_capacity, 0)
        self.offsets = _grow_array(self.offsets, new_capacity, -1)
        self.partitions = _grow_array(self.partitions, new_capacity, _FREE)
        self.last_seen = _grow_array(self.last_seen, new_capacity, 0.0)
        extra = np.zeros((new_capacity, self.extra.shape[1]), dtype=np.float64)
        extra[:old] = self.extra
        self.extra = extra
        history = np.full((new_capacity, *self.history.shape[1:]), np.nan, dtype=np.float32)
        history[:old] = self.history
        self.history = history
        answers = np.full((new_capacity, self.last_answer.shape[1]), np.nan)
        answers[:old] = self.last_answer
        self.last_answer = answers
        self._last_used = _grow_array(self._last_used, new_capacity, _NEVER)
        self.changes.grow(new_capacity)
        self._owner.extend([None] * (new_capacity - old))
        self._free[:0] = range(new_capacity - 1, old - 1, -1)

    def _zero(self, slots: I64, *, extra: bool = True) -> None:
        for array in (*self.h, *self.c):
            array[slots] = 0.0
        self.steps[slots] = 0
        if extra:
            self.extra[slots] = 0.0
            self.last_answer[slots] = np.nan

    def _remove(self, slots: I64, *, tombstone: bool = True) -> None:
        """Free ``slots``; ``tombstone=False``: their streams live on (in the cold tier),
        their records must stay."""
        for slot in slots.tolist():
            owner = self._owner[slot]
            if owner is not None:
                del self._slot[owner]
                self._owner[slot] = None
                self._free.append(slot)
                if tombstone:
                    self.changes.remove(slot, owner, int(self.partitions[slot]))
                else:
                    self.changes.changed[slot] = False
        self._last_used[slots] = _NEVER
        self.partitions[slots] = _FREE

    # -- the cold tier ---------------------------------------------------------

    def _freeze(self, slots: I64) -> list[Eviction]:
        """Move the streams at ``slots`` (LRU victims) to the cold tier, in one write batch
        per partition; the states its disk bound pushed out, dropped (reason ``lru``)."""
        assert self.cold is not None
        ids = self._owners(slots.tolist())  # victims are held: one owner each
        parts = self.partitions[slots].tolist()
        states = self.encode(ids, parts, self.model)
        changed = self.changes.changed[slots].tolist()
        # A stream held in memory is not on disk in its partition's store (a return takes
        # it from there), so the write needs no read of what it replaces.
        last_seen = self.last_seen[slots].tolist()
        pushed = self.cold.put(ids, parts, states, last_seen, absent=True)
        self._remove(slots, tombstone=False)
        for stream, part, state, was in zip(ids, parts, states, changed, strict=True):
            self.changes.move(stream, part, state, changed=was)
        return self._dropped(pushed, "lru")

    def adopt_cold(self, old: StateStore, mode: str) -> None:
        """Take over ``old``'s cold tier after a live swap: its states go on as carried
        (``carry``), are re-warmed when they return (``rewarm``, where ticks are kept) or
        are refused then, so start from zero (``reset``), as the swap did in memory."""
        self.cold = old.cold
        if mode == "carry":
            self.accepted_models |= old.accepted_models
        elif mode == "rewarm" and self.history.shape[1]:
            self.rewarm_models = (old.accepted_models | old.rewarm_models) - self.accepted_models

    def thaw(
        self, ids: Sequence[str], partitions: Sequence[int], protect: I64
    ) -> tuple[list[Eviction], list[str]]:
        """Read back the states of those of ``ids`` (distinct, not held) that the cold tier
        holds, each from its partition's store (``partitions[i]``), in one batched read
        per partition, into slots; the streams at ``protect`` (held ones of the step in
        progress) stay. A state that is corrupt, of another cell or layout or of a model
        not in ``accepted_models`` is refused: logged, counted, its stream starts from
        zero; one of ``rewarm_models`` is loaded zeroed. Returns what was dropped on
        the way (the disk bound, as room was made) and the streams to re-warm."""
        if self.cold is None or not ids:
            return [], []
        frozen = self.cold.take(ids, partitions)
        if not frozen:
            return [], []
        states, rewarm = self._accepted(frozen)
        try:
            evictions = self.restore_arrays(states, protect=protect) if states.ids else []
        except ConfigError:  # no room for them (a call of more streams than max_streams)
            # Back to disk as they were: the call fails, the states must not go with it.
            by_id = {stream: (partition, state) for stream, partition, state in frozen}
            ids = list(states.ids)
            parts, blobs = [by_id[i][0] for i in ids], [by_id[i][1] for i in ids]
            self.cold.put(ids, parts, blobs, states.last_seen.tolist(), absent=True)
            raise
        back = [i for i, s in enumerate(states.ids) if self.changes.returned(s)]
        if back:
            self.changes.changed[self.lookup([states.ids[i] for i in back])] = True
        if rewarm:  # no longer the changelog's state once re-warmed
            self.changes.changed[self.lookup(rewarm)] = True
        return evictions, rewarm

    def _accepted(self, frozen: list[Frozen]) -> tuple[StateArrays, list[str]]:
        """The states read back that this store takes, as columns (those to re-warm
        zeroed), and the ids to re-warm; the rest refused."""
        blobs = {stream: state for stream, _, state in frozen}
        try:  # the common case: one model wrote them all, one layout: a table
            states: StateArrays | None = decode_many(blobs)
        except StateError:
            states = None
        if states is not None and self._refusal(states, 0) is None and len(set(states.models)) < 2:
            if states.models[0] not in self.rewarm_models:
                return states, []
            zeroed = states.zeroed(self.hidden_sizes, self.cell, keep_steps=True)
            return zeroed, list(states.ids)
        kept: dict[str, StreamState] = {}
        rewarm: list[str] = []
        for stream, partition, state in frozen:
            try:
                one = StateArrays.from_states({stream: StreamState.from_bytes(state)})
                reason = self._refusal(one, 0)
            except StateError as exc:
                reason = str(exc)
            if reason is None:
                kept[stream] = StreamState.from_bytes(state)
                if kept[stream].model in self.rewarm_models:
                    kept[stream] = kept[stream].zeroed(self.hidden_sizes, self.cell)
                    rewarm.append(stream)
                continue
            assert self.cold is not None
            self.cold.refused += 1
            self.changes.returned(stream)
            logger.warning(
                "cold tier: refused the state of stream %r (partition %s): %s; it starts "
                "again from zero",
                stream,
                partition,
                reason,
            )
        return StateArrays.from_states(kept), rewarm

    def _refusal(self, states: StateArrays, row: int) -> str | None:
        """Why row ``row`` of ``states`` is not this store's to load (None: it is)."""
        model = states.models[row]
        if model in self.rewarm_models:
            return None  # any layout: the state is zeroed, only its ticks are used
        if model not in self.accepted_models:
            return f"made by model {model!r}, this engine serves {self.model!r}"
        if states.cell != self.cell:
            return f"a {states.cell.upper()} state, this model is an {self.cell.upper()}"
        sizes = tuple(h.shape[1] for h in states.h)
        if sizes != self.hidden_sizes:
            return f"layer sizes {list(sizes)}, this model's are {list(self.hidden_sizes)}"
        return None

    def expire_cold(self, before: float) -> list[Eviction]:
        """Drop the cold tier's states last seen before ``before`` (seconds; reason ``ttl``)."""
        return [] if self.cold is None else self._dropped(self.cold.expire(before), "ttl")

    def _dropped(self, frozen: list[Frozen], reason: EvictionReason) -> list[Eviction]:
        """States that left the cold tier for good: counted, tombstoned, returned."""
        evictions = []
        for stream, partition, state in frozen:
            self.changes.dropped(stream, partition)
            try:
                evictions.append(Eviction(stream, reason, StreamState.from_bytes(state)))
            except StateError:
                logger.warning("cold tier: dropped stream %r, whose state is corrupt", stream)
        if frozen:  # a Counter keeps a key added with 0
            self.eviction_counts[reason] += len(frozen)
        return evictions

    def _capture(self, slots: I64, reason: EvictionReason) -> list[Eviction]:
        self.eviction_counts[reason] += int(slots.size)
        pairs = zip([self._owner[s] for s in slots.tolist()], self._states(slots), strict=True)
        return [Eviction(owner, reason, state) for owner, state in pairs if owner is not None]

    def _states(self, slots: I64) -> list[StreamState]:
        hs = [t[slots] for t in self.h]
        cs = [t[slots] for t in self.c]
        rings = self.history[slots] if self.history.shape[1] else None
        return [
            StreamState(
                h=tuple(h[i] for h in hs),
                c=tuple(c[i] for c in cs),
                step=int(self.steps[slot]),
                offset=int(self.offsets[slot]),
                last_seen=float(self.last_seen[slot]),
                extra=tuple(self.extra[slot].tolist()),
                partition=int(self.partitions[slot]),
                cell=self.cell,
                **({} if rings is None else {"history": rings[i]}),
            )
            for i, slot in enumerate(slots.tolist())
        ]


_T = TypeVar("_T", bound=np.generic)


def _grow_array(arr: npt.NDArray[_T], size: int, fill: float) -> npt.NDArray[_T]:
    grown = np.full(size, fill, dtype=arr.dtype)
    grown[: arr.size] = arr
    return grown

"""What changed in a state store since the last checkpoint: stepped slots, removed streams."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import numpy.typing as npt

__all__ = ["Changes"]


class Changes:
    """A changed mark per slot, and the partition of each stream removed.

    The store marks the slots the engine steps and reports every stream it
    removes (ended, evicted for room or idleness, released at a revoke); a
    checkpoint takes both. A flag per slot costs a checkpoint a scan of the
    store, where a set of changed ids cost a hash a tick. Removals are kept
    only while ``tombstones`` is set (a store that something checkpoints):
    a memory-state daemon would otherwise keep every ended stream's id.

    A stream moved to the cold tier (``move``) leaves no tombstone: its state
    lives on. Where the changelog does not have that state yet (it changed
    since the last checkpoint), its bytes wait in ``moved`` for the next
    checkpoint, which writes them as it writes a held stream's state.
    """

    def __init__(self, capacity: int) -> None:
        self.changed: npt.NDArray[np.bool_] = np.zeros(capacity, dtype=bool)
        self.removed: dict[str, int] = {}
        #: Streams moved to the cold tier since the last checkpoint whose state the
        #: changelog lacks: stream -> (partition, state bytes).
        self.moved: dict[str, tuple[int, bytes]] = {}
        self.tombstones = False

    def grow(self, capacity: int) -> None:
        self.changed = np.concatenate([self.changed, np.zeros(capacity - self.changed.size, bool)])

    def remove(self, slot: int, stream: str, partition: int) -> None:
        """``stream`` left ``slot``; its record in ``partition`` (if known) must go."""
        self.changed[slot] = False
        if self.tombstones and partition >= 0:
            self.removed[stream] = partition

    def move(self, stream: str, partition: int, state: bytes, *, changed: bool) -> None:
        """``stream`` left memory for the cold tier with ``state``: no tombstone, and its
        state goes with the next checkpoint where the changelog lacks it (``changed``
        since the last one, or a tombstone pending for an earlier life of it)."""
        if not self.tombstones or partition < 0:
            return
        pending = self.removed.pop(stream, None) is not None
        if changed or pending:
            self.moved[stream] = (partition, state)

    def returned(self, stream: str) -> bool:
        """``stream`` is back from the cold tier: True where its state had not reached the
        changelog yet (its slot must be marked changed again)."""
        return self.moved.pop(stream, None) is not None

    def dropped(self, stream: str, partition: int) -> None:
        """``stream``'s state left the cold tier for good (the disk bound, idle expiry):
        its record must go, as an evicted stream's does."""
        self.moved.pop(stream, None)
        if self.tombstones and partition >= 0:
            self.removed[stream] = partition

    def forget_partitions(self, partitions: Collection[int]) -> None:
        """No tombstones for these partitions: they are another consumer's now."""
        self.removed = {s: p for s, p in self.removed.items() if p not in partitions}
        self.moved = {s: m for s, m in self.moved.items() if m[0] not in partitions}

    def take_moved(self) -> dict[str, tuple[int, bytes]]:
        """The moved streams' states the changelog lacks, cleared."""
        moved, self.moved = self.moved, {}
        return moved

    def take(self) -> tuple[npt.NDArray[np.bool_], dict[str, int]]:
        """The changed marks and removals so far, both cleared."""
        changed, self.changed = self.changed, np.zeros_like(self.changed)
        removed, self.removed = self.removed, {}
        return changed, removed

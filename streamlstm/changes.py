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
    """

    def __init__(self, capacity: int) -> None:
        self.changed: npt.NDArray[np.bool_] = np.zeros(capacity, dtype=bool)
        self.removed: dict[str, int] = {}
        self.tombstones = False

    def grow(self, capacity: int) -> None:
        self.changed = np.concatenate([self.changed, np.zeros(capacity - self.changed.size, bool)])

    def remove(self, slot: int, stream: str, partition: int) -> None:
        """``stream`` left ``slot``; its record in ``partition`` (if known) must go."""
        self.changed[slot] = False
        if self.tombstones and partition >= 0:
            self.removed[stream] = partition

    def forget_partitions(self, partitions: Collection[int]) -> None:
        """No tombstones for these partitions: they are another consumer's now."""
        self.removed = {s: p for s, p in self.removed.items() if p not in partitions}

    def take(self) -> tuple[npt.NDArray[np.bool_], dict[str, int]]:
        """The changed marks and removals so far, both cleared."""
        changed, self.changed = self.changed, np.zeros_like(self.changed)
        removed, self.removed = self.removed, {}
        return changed, removed

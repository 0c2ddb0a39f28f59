"""Control of one stream's state, in order with its ticks: ``reset`` and ``delete``.

A control arrives like a tick (keyed by its stream, at an input offset of the
stream's partition) and is applied in offset order with the ticks, so it obeys
the same skip rule (invariant 3): one whose offset the stream's state already
reflects, from the same partition, is skipped (no change), so a replay after a
restore applies it exactly once.

- ``reset`` zeroes the stream's state (``h``, ``c``, its step count and every
  per-stream column) before its next tick, and records the control's offset,
  so the next checkpoint writes the zero state and a replay skips the reset;
- ``delete`` frees the stream: the next checkpoint writes its changelog
  tombstone, and a later tick starts it from zero.

A stream not held has nothing to reset or delete: the control is applied as a
no-op (a replay of it is one too).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from streamlstm.errors import InputError
from streamlstm.store import StateStore

__all__ = ["CONTROL_OPS", "Control", "apply_control"]

#: The operations a control names.
CONTROL_OPS = ("reset", "delete")


class Control(NamedTuple):
    """A control among a call's ticks: ``op`` on ``stream``, read at ``offset`` of input
    ``partition``, applied after the call's first ``before`` ticks."""

    stream: str
    op: str
    partition: int
    offset: int
    before: int


def apply_control(
    store: StateStore, stream: str, op: str, *, offset: int = -1, partition: int = -1
) -> bool:
    """Apply ``op`` to ``stream``'s state; False where the skip rule skipped it."""
    if op not in CONTROL_OPS:
        raise InputError("control", f"must be one of {', '.join(CONTROL_OPS)}, got {op!r}")
    slot = store.slot_of(stream)
    if slot is None:
        return True
    held = store.offsets[slot]
    if offset >= 0 and held >= 0 and store.partitions[slot] == partition and offset <= held:
        return False
    slots = np.array([slot], dtype=np.int64)
    if op == "delete":
        store.release([stream])
        return True
    store.zero(slots)
    store.record_step(
        slots,
        last_seen=store.last_seen[slots],
        offsets=None if offset < 0 else np.array([offset], dtype=np.int64),
        partitions=np.array([partition], dtype=np.int64),
    )
    return True

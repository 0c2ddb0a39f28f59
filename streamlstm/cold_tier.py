"""The cold tier: streams that memory has no room for, kept on local disk per partition.

With a cold tier (``Engine(..., cold=ColdConfig(...))``), a stream the state
store evicts for room (LRU at ``max_streams``) is moved to its input
partition's ``ColdStore`` instead of being dropped, and a stream that ticks
again is read back before its tick is stepped, all of a step's returning
streams in one batched read per partition, and continues exactly. Idle
expiry (TTL) still forgets a stream, from either tier. ``ColdTier`` routes
states to the partitions' stores and keeps the figures; the store does the
rest (``cold_store.py``). docs/cold-tier.md says what the changelog does with
a moved stream.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamlstm.cold_store import ColdStore
from streamlstm.errors import ConfigError
from streamlstm.optional import require_cold

__all__ = ["ColdConfig", "ColdStats", "ColdTier", "Frozen"]

logger = logging.getLogger(__name__)

#: A state in the cold tier: its stream, input partition and state bytes.
Frozen = tuple[str, int, bytes]
#: States one store gives up at a time for the instance's disk bound (between chunks
#: the store whose oldest state was seen longest ago is chosen again).
PUSH_CHUNK = 256


@dataclass(frozen=True, kw_only=True)
class ColdConfig:
    """Where and how much of the cold tier.

    ``directory`` holds one store per input partition (``partition-<p>``; -1 for
    ticks without a partition). ``max_disk_streams`` bounds the states on disk,
    all partitions' stores together: beyond it the states written longest ago are
    dropped (a drop like an eviction without a cold tier: counted, returned,
    tombstoned), taken in chunks from the store whose oldest state was seen
    longest ago. ``keep``:
    open the stores with what they hold (False: start them empty, the
    default, since without local checkpoints the changelog restores those
    streams). ``expire_limit`` caps the states one idle sweep removes per store.
    """

    directory: str | Path
    max_disk_streams: int = 10_000_000
    keep: bool = False
    expire_limit: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_disk_streams", "expire_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if not str(self.directory):
            raise ConfigError("directory: must name a directory")


@dataclass(frozen=True)
class ColdStats:
    """The cold tier's figures (totals since the engine started, but ``streams`` and
    ``disk_bytes``, which are now)."""

    #: States on disk, all partitions; and the bytes their stores take.
    streams: int
    disk_bytes: int
    #: Batched reads (multi-gets), ids looked up in them, and the states found (the
    #: returning streams: ``hits / looked_up`` is the hit rate of streams not in memory).
    reads: int
    looked_up: int
    hits: int
    #: States written (moved out of memory) and write batches.
    writes: int
    write_batches: int
    #: States dropped for the disk bound, expired, and refused on return (corrupt, or of
    #: another model, cell or layout: the stream starts from zero).
    pushed_out: int
    expired: int
    refused: int
    #: Streams per partition on disk.
    partitions: dict[int, int] = field(default_factory=dict)


class ColdTier:
    """One ``ColdStore`` per input partition, opened on first use."""

    def __init__(self, config: ColdConfig) -> None:
        # Both now, not at the first eviction: a missing extra or an unwritable directory
        # is an error at start-up.
        require_cold("the cold tier (--state-dir)")
        try:
            Path(config.directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"directory: cannot create {config.directory}: {exc}") from exc
        self.config = config
        self._stores: dict[int, ColdStore] = {}
        self.refused = 0

    def store(self, partition: int) -> ColdStore:
        """Partition ``partition``'s store (opened now if it is not yet)."""
        store = self._stores.get(partition)
        if store is None:
            store = ColdStore.open(
                self.config.directory,
                partition,
                max_disk_streams=self.config.max_disk_streams,
                keep=self.config.keep,
            )
            self._stores[partition] = store
        return store

    def put(
        self,
        ids: Sequence[str],
        partitions: Sequence[int],
        states: Sequence[bytes],
        last_seen: Sequence[float],
        *,
        absent: bool = False,
    ) -> list[Frozen]:
        """Move these states to their partitions' stores (one write batch each); the
        states the disk bound pushed out. ``absent``: as ``ColdStore.put_many``'s."""
        pushed: list[Frozen] = []
        for partition, rows in _by_partition(partitions).items():
            out = self.store(partition).put_many(
                [ids[i] for i in rows],
                [states[i] for i in rows],
                [_finite(last_seen[i]) for i in rows],
                absent=absent,
            )
            pushed += [(s, partition, v) for s, v in out.items()]
        over = sum(store.count for store in self._stores.values()) - self.config.max_disk_streams
        return pushed + self._push_out(over) if over > 0 else pushed

    def _push_out(self, over: int) -> list[Frozen]:
        """The instance's bound: ``over`` states out, oldest first across the stores: from
        the store whose oldest was seen longest ago, those seen before the next store's
        oldest (at least one, at most ``PUSH_CHUNK`` at a time)."""
        pushed: list[Frozen] = []
        while over > 0:
            heads = sorted(
                (seen, p)
                for p, store in self._stores.items()
                if (seen := store.oldest_seen()) is not None
            )
            if not heads:
                break
            store = self._stores[heads[0][1]]
            limit = min(over, PUSH_CHUNK)
            out = store.push_out(limit, before=heads[1][0] if len(heads) > 1 else None)
            out = out or store.push_out(1)
            pushed += [(s, heads[0][1], v) for s, v in out.items()]
            over -= len(out)
            if not out:
                break
        return pushed

    def take(self, ids: Sequence[str], partitions: Sequence[int]) -> list[Frozen]:
        """The states of those ``ids`` held, removed from disk: one read and one write
        batch per partition (never per stream). A partition with no store yet is not
        opened for it: nothing there to find."""
        found: list[Frozen] = []
        for partition, rows in _by_partition(partitions).items():
            store = self._stores.get(partition)
            if store is None:
                continue
            taken = store.take_many([ids[i] for i in rows])
            found += [(s, partition, v) for s, v in taken.items()]
        return found

    def delete(self, ids: Sequence[str], partitions: Sequence[int]) -> int:
        """Forget these streams' states (where held); how many were."""
        gone = 0
        for partition, rows in _by_partition(partitions).items():
            store = self._stores.get(partition)
            if store is not None:
                gone += store.delete_many([ids[i] for i in rows])
        return gone

    def expire(self, before: float) -> list[Frozen]:
        """The states last seen before ``before`` (seconds), removed from disk."""
        expired: list[Frozen] = []
        for partition, store in self._stores.items():
            out = store.expire(before, limit=self.config.expire_limit)
            expired += [(s, partition, v) for s, v in out.items()]
        return expired

    def drop(self, partitions: Sequence[int]) -> int:
        """Close these partitions' stores and delete what they hold (their streams are
        another consumer's now, restored from the changelog); how many states they held."""
        gone = 0
        for partition in partitions:
            store = self._stores.pop(partition, None)
            if store is not None:
                gone += store.count
                store.close()
                shutil.rmtree(store.path, ignore_errors=True)
        return gone

    def stats(self) -> ColdStats:
        counts = [s.counts for s in self._stores.values()]
        return ColdStats(
            streams=sum(s.count for s in self._stores.values()),
            disk_bytes=sum(s.disk_bytes() for s in self._stores.values()),
            reads=sum(c.reads for c in counts),
            looked_up=sum(c.looked_up for c in counts),
            hits=sum(c.found for c in counts),
            writes=sum(c.written for c in counts),
            write_batches=sum(c.batches for c in counts),
            pushed_out=sum(c.pushed_out for c in counts),
            expired=sum(c.expired for c in counts),
            refused=self.refused,
            partitions={p: s.count for p, s in self._stores.items()},
        )

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


def _by_partition(partitions: Sequence[int]) -> dict[int, list[int]]:
    """Row indices grouped by partition, in order."""
    groups: dict[int, list[int]] = {}
    for i, partition in enumerate(partitions):
        groups.setdefault(int(partition), []).append(i)
    return groups


def _finite(seconds: float) -> float:
    # A state never seen (NaN) sorts as the oldest: the first to go.
    return float(seconds) if math.isfinite(seconds) else -math.inf

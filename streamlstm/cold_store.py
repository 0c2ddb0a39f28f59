"""``ColdStore``: one input partition's cold streams on local disk (RocksDB, ``rocksdict``).

The engine's cold tier (``cold_tier.py``) keeps, per input partition, the
states of the streams that memory had no room for. This module is the store
itself: synchronous, bytes in and bytes out, nothing of the engine.

Layout, in one RocksDB (raw mode: keys and values are bytes as given; never a
pickle):

- ``b"v" + id`` -> an 8-byte big-endian sequence number, then the stream's
  state in its versioned changelog bytes (``StreamState.to_bytes``), which
  name the model and cell that made it, so a reader can refuse another's;
- ``b"o" + seq`` -> ``last_seen`` (float64) then the id: the order the states
  came in, oldest first (the disk LRU: a state in the cold tier is never used
  in place, it leaves when its stream returns, so least recently used is
  least recently written);
- ``b"m"`` -> the count of states and the next sequence number, written in the
  same batch as every change, so they agree with the data after any stop.

Every change is one ``WriteBatch``, written without RocksDB's write-ahead log:
the changelog topic is the durable copy (docs/cold-tier.md).
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamlstm.errors import ConfigError, StateError
from streamlstm.optional import require_cold

__all__ = ["ColdCounts", "ColdStore", "disk_bytes", "rocks_options"]

logger = logging.getLogger(__name__)

_VALUE = b"v"
_ORDER = b"o"
_META = b"m"
_SEQ = struct.Struct(">Q")
_SEEN = struct.Struct("<d")
_COUNTS = struct.Struct("<QQ")
#: RocksDB's block cache: index, filters and the hottest blocks (the states themselves
#: are read once, when their stream returns, so the OS page cache holds the rest).
_BLOCK_CACHE = 64 << 20


@dataclass
class ColdCounts:
    """What a cold store has done since it was opened (mutable running totals)."""

    #: RocksDB MultiGets, every one (a write's check of what it replaces included).
    multi_gets: int = 0
    #: Reads of streams: one per ``get_many``, ``take_many`` or ``delete_many`` call.
    reads: int = 0
    #: Ids looked up, and those found.
    looked_up: int = 0
    found: int = 0
    #: States written, and write batches.
    written: int = 0
    batches: int = 0
    #: States deleted because their stream returned or was deleted.
    deleted: int = 0
    #: States pushed out by the disk LRU bound, and expired (TTL).
    pushed_out: int = 0
    expired: int = 0


def rocks_options(rocksdict: Any, *, block_bytes: int | None = None) -> Any:
    """The options every cold store opens with: raw bytes, bloom filters (most lookups are
    of new streams, which are absent), no compression (float32 state does not compress:
    snappy saved under 1 % on the bench's states). ``block_bytes``: the table's block
    size (RocksDB's default, 4 KiB, suits point reads; a store read whole wants more)."""
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_compression_type(rocksdict.DBCompressionType.none())
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(rocksdict.Cache(_BLOCK_CACHE))
    if block_bytes is not None:
        table.set_block_size(block_bytes)
    options.set_block_based_table_factory(table)
    return options


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (blocks, not apparent sizes)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


class ColdStore:
    """One partition's cold states: ``put_many``, ``get_many``, ``take_many``,
    ``delete_many``, ``expire``, bounded by ``max_disk_streams`` (oldest out first).

    Open one with ``ColdStore.open``. Not thread-safe: one engine owns it. A
    RocksDB directory is locked by the process that opens it, so two engines
    cannot share one.
    """

    def __init__(self, path: Path, db: Any, module: Any, max_disk_streams: int) -> None:
        self.path = path
        self.max_disk_streams = max_disk_streams
        self.counts = ColdCounts()
        self._db = db
        self._rocks = module
        self._write = module.WriteOptions()
        self._write.disable_wal = True  # the changelog is the durable copy
        meta = db.get(_META)
        self._count, self._next = _COUNTS.unpack(meta) if meta is not None else (0, 0)

    @classmethod
    def open(
        cls, directory: str | Path, partition: int, *, max_disk_streams: int, keep: bool = False
    ) -> ColdStore:
        """The store of input ``partition`` under ``directory`` (``partition-<p>``).

        ``keep=False`` starts it empty (what it held is discarded: without local
        checkpoints the changelog restores those streams). Raises ``ConfigError``
        where the directory cannot be opened (locked by another process, not
        writable), ``DependencyError`` without rocksdict (the ``cold`` extra).
        """
        if isinstance(max_disk_streams, bool) or not (
            isinstance(max_disk_streams, int) and max_disk_streams >= 1
        ):
            raise ConfigError(
                f"max_disk_streams: must be a positive integer, got {max_disk_streams!r}"
            )
        rocksdict = require_cold("the cold tier (--state-dir)")
        path = Path(directory) / f"partition-{partition}"
        if not keep and path.exists():
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            db = rocksdict.Rdict(str(path), rocks_options(rocksdict))
        except Exception as exc:  # rocksdict raises plain exceptions (a lock, a permission)
            raise ConfigError(f"state dir: cannot open {path}: {exc}") from exc
        store = cls(path, db, rocksdict, max_disk_streams)
        logger.info("cold store %s open: %s states", path, store.count)
        return store

    @property
    def count(self) -> int:
        """States held."""
        return int(self._count)

    def disk_bytes(self) -> int:
        """The bytes of the store's table files (RocksDB's count: cheap, unlike walking
        the directory; states still in the memtable are not on disk yet)."""
        return int(self._db.property_int_value("rocksdb.total-sst-files-size") or 0)

    # -- reads --------------------------------------------------------------

    def _multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        """One batched read (RocksDB's MultiGet): the one read a step makes."""
        self.counts.multi_gets += 1
        found: list[bytes | None] = self._db.get(keys)
        return found

    def get_many(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The state bytes of those ``ids`` held (others left out), in one read."""
        return {s: v[_SEQ.size :] for s, v in self._lookup(ids).items()}

    def _lookup(self, ids: Sequence[str], *, counted: bool = True) -> dict[str, bytes]:
        """Each held id's stored value (its sequence number and its state); ``counted``:
        a lookup of streams (``looked_up``, ``found``), not of the store's own."""
        if not ids:
            return {}
        values = self._multi_get([_VALUE + s.encode() for s in ids])
        found = {s: v for s, v in zip(ids, values, strict=True) if v is not None}
        if counted:
            self.counts.reads += 1
            self.counts.looked_up += len(ids)
            self.counts.found += len(found)
        return found

    # -- writes -------------------------------------------------------------

    def put_many(
        self,
        ids: Sequence[str],
        states: Sequence[bytes],
        last_seen: Sequence[float],
        *,
        absent: bool = False,
    ) -> dict[str, bytes]:
        """Hold ``states[i]`` (state bytes) for ``ids[i]`` (distinct), replacing any held,
        seen last at ``last_seen[i]`` (seconds); returns the states pushed out to stay
        within ``max_disk_streams``, oldest first (a just-written one among them where
        the bound is smaller than the batch). ``absent``: the caller knows none of
        ``ids`` is held (the engine: a stream in memory is not on disk), which saves
        the read that finds what a write replaces."""
        if not ids:
            return {}
        held = {} if absent else self._lookup(ids, counted=False)
        batch = self._rocks.WriteBatch(raw_mode=True)
        for value in held.values():  # a replaced state's place in the order goes
            batch.delete(_ORDER + value[: _SEQ.size])
        for stream, state, seen in zip(ids, states, last_seen, strict=True):
            seq = _SEQ.pack(self._next)
            self._next += 1
            name = stream.encode()
            batch.put(_VALUE + name, seq + state)
            batch.put(_ORDER + seq, _SEEN.pack(seen) + name)
        self._count += len(ids) - len(held)
        self._commit(batch)
        self.counts.written += len(ids)
        over = self._count - self.max_disk_streams
        return self.push_out(over) if over > 0 else {}

    def push_out(self, count: int, *, before: float | None = None) -> dict[str, bytes]:
        """Drop the ``count`` states written longest ago (a disk bound), stopping at the
        first seen at or after ``before`` where given; returns them."""
        pushed = self._oldest(count, before=before)
        self.counts.pushed_out += len(pushed)
        return pushed

    def oldest_seen(self) -> float | None:
        """When the state written longest ago was last seen (None: none held)."""
        scan = self._db.iter()
        scan.seek(_ORDER)
        seen = None
        if scan.valid() and scan.key().startswith(_ORDER):
            seen = float(_SEEN.unpack_from(scan.value())[0])
        del scan
        return seen

    def take_many(self, ids: Sequence[str]) -> dict[str, bytes]:
        """``get_many`` and ``delete_many`` at once: one read, one write batch (what a
        returning stream costs)."""
        held = self._lookup(ids)
        self._delete(held)
        self.counts.deleted += len(held)
        return {s: v[_SEQ.size :] for s, v in held.items()}

    def delete_many(self, ids: Sequence[str]) -> int:
        """Forget those ``ids`` held; how many were."""
        held = self._lookup(ids)
        self._delete(held)
        self.counts.deleted += len(held)
        return len(held)

    def expire(self, before: float, *, limit: int = 10_000) -> dict[str, bytes]:
        """Forget the states last seen before ``before`` (seconds), oldest written
        first, up to ``limit``; returns them. The scan stops at the first state seen
        later: states are written about in the order their streams were last seen
        (LRU), so one that a stream's own late clock put out of order waits for the
        next scan, or for its stream's return (the engine checks the TTL then too)."""
        expired = self._oldest(limit, before=before)
        self.counts.expired += len(expired)
        return expired

    def _oldest(self, limit: int, *, before: float | None) -> dict[str, bytes]:
        """Remove up to ``limit`` states in written order (stopping at the first seen
        at or after ``before``, if given); returns them."""
        order: list[tuple[bytes, str]] = []
        scan = self._db.iter()
        scan.seek(_ORDER)
        while len(order) < limit and scan.valid():
            key, value = scan.key(), scan.value()
            if not key.startswith(_ORDER):
                break
            if before is not None and _SEEN.unpack_from(value)[0] >= before:
                break
            order.append((key, value[_SEEN.size :].decode()))
            scan.next()
        del scan
        held = self._lookup([name for _, name in order], counted=False)
        scanned = {key for key, _ in order}
        gone = {n: v for n, v in held.items() if _ORDER + v[: _SEQ.size] in scanned}
        # An entry whose state was written again since (by a put wrongly told it was
        # absent, so counted twice) goes alone: the newer state keeps its own place.
        stale = [key for key, name in order if name not in gone]
        self._count -= len(stale)
        self._delete(gone, stale)
        return {s: v[_SEQ.size :] for s, v in gone.items()}

    def _delete(self, held: dict[str, bytes], order: Sequence[bytes] = ()) -> None:
        """Delete the ``held`` states (id -> stored value) and these ``order`` keys."""
        if not held and not order:
            return
        batch = self._rocks.WriteBatch(raw_mode=True)
        for stream, value in held.items():
            batch.delete(_VALUE + stream.encode())
            batch.delete(_ORDER + value[: _SEQ.size])
        for key in order:
            batch.delete(key)
        self._count -= len(held)
        self._commit(batch)

    def _commit(self, batch: Any) -> None:
        batch.put(_META, _COUNTS.pack(self._count, self._next))
        try:
            self._db.write(batch, self._write)
        except Exception as exc:  # a full disk, an I/O error: rocksdict's plain exception
            raise StateError(f"cold store {self.path}: write failed: {exc}") from exc
        self.counts.batches += 1

    def close(self) -> None:
        """Flush the memtable (so a kept store reopens with its data) and close."""
        try:
            self._db.flush()
        finally:
            self._db.close()

"""``CheckpointStore``: one changelog partition's records as of an offset, on local disk.

A local checkpoint is a copy of a changelog partition's compacted content:
every key's last record up to (not including) changelog offset ``offset``,
kept in a RocksDB (``rocksdict``, raw mode: bytes in and bytes out, never a
pickle) beside the cold tier's stores. A restart reads it, then only the
changelog's records from ``offset`` on (the tail), instead of the whole
partition. The daemon writes it after each checkpoint is durable in the
changelog (``consumers/engine/local_checkpoints.py`` says when and why then).

Layout:

- ``b"s" + key`` -> the key's last record value (a stream's state bytes,
  versioned; the changelog's own key, shadow keys included);
- ``b"h"`` -> the header, JSON: the format, the changelog topic, the model
  that wrote the last checkpoint, and ``offset``. A writer puts it in the
  batch of the last records it describes (earlier batches of the same
  checkpoint leave the previous header: their records are in the changelog
  after it, so a reader's tail holds them again). The writes skip RocksDB's
  write-ahead log (the changelog is the durable copy), so a kill -9 loses
  the batches still in the memtable, headers with them, and the store
  reopens as of an older offset; the tail is then longer, never wrong. A
  store being rebuilt has no header until its last batch: a crash mid-way
  leaves one a reader refuses.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamlstm.cold_store import rocks_options
from streamlstm.errors import StateError
from streamlstm.optional import require_cold

__all__ = ["CheckpointStore", "Header"]

logger = logging.getLogger(__name__)

_STATE = b"s"
_HEADER = b"h"
#: The header's format; a store of another format is refused (rebuilt from the changelog).
FORMAT = 1
#: States per write batch when a store is rebuilt from a whole partition.
_REBUILD_BATCH = 20_000
#: Table blocks of 64 KiB, not RocksDB's 4 KiB: a store is read whole, in key order, at
#: a restore (1M states of 2 KiB: 623k records/s against 255k with 4 KiB blocks, on a
#: compacted store here); it is never read by point lookups.
_BLOCK_BYTES = 64 << 10


@dataclass(frozen=True)
class Header:
    """What a local checkpoint is a copy of: ``topic``'s partition up to ``offset``,
    last written while ``model`` was served."""

    topic: str
    model: str
    offset: int

    def to_bytes(self) -> bytes:
        fields = {"format": FORMAT, "topic": self.topic, "model": self.model}
        return json.dumps({**fields, "offset": self.offset}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Header:
        try:
            fields = json.loads(raw)
            if fields["format"] != FORMAT:
                raise StateError(f"header: format {fields['format']!r}, not {FORMAT}")
            header = cls(str(fields["topic"]), str(fields["model"]), int(fields["offset"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"header: does not decode: {exc}") from exc
        if header.offset < 0:
            raise StateError(f"header: offset {header.offset} is negative")
        return header


class CheckpointStore:
    """One partition's local checkpoint. ``open`` it; ``header``, ``records``, ``write``,
    ``rebuild``, ``close``. Not thread-safe; RocksDB locks the directory, so two
    processes cannot share one."""

    def __init__(self, path: Path, db: Any, module: Any) -> None:
        self.path = path
        self._db = db
        self._rocks = module
        self._write = module.WriteOptions()
        self._write.disable_wal = True  # the changelog is the durable copy

    @classmethod
    def open(cls, directory: str | Path, partition: int) -> CheckpointStore:
        """Partition ``partition``'s store under ``directory`` (``checkpoint-<p>``), made
        if missing. Raises ``StateError`` where RocksDB cannot open it (corrupt files, a
        lock, a permission)."""
        rocksdict = require_cold("local checkpoints (--state-dir)")
        path = Path(directory) / f"checkpoint-{partition}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            db = rocksdict.Rdict(str(path), rocks_options(rocksdict, block_bytes=_BLOCK_BYTES))
        except Exception as exc:  # rocksdict raises plain exceptions
            raise StateError(f"local checkpoint {path}: cannot open: {exc}") from exc
        return cls(path, db, rocksdict)

    def header(self) -> Header | None:
        """What the store is a copy of; None for a store never completed. Raises
        ``StateError`` for a header that does not decode."""
        raw = self._call("read", self._db.get, _HEADER)
        return None if raw is None else Header.from_bytes(raw)

    def records(self) -> dict[str, bytes]:
        """Every key's record (keys decoded as the changelog's are: UTF-8, with
        surrogate escapes). Raises ``StateError`` where a block does not read (RocksDB
        checks each block's checksum)."""
        found: dict[str, bytes] = {}
        last = None
        try:
            # Every key from b"s" on is a state (the header, b"h", sorts before them); one
            # bulk scan, not an iterator's three calls a record (1.5-2.5x slower here).
            for key, value in self._db.items(from_key=_STATE):
                found[key[1:].decode("utf-8", "surrogateescape")] = value
                last = key
            end = self._last_key()
        except Exception as exc:
            raise StateError(f"local checkpoint {self.path}: cannot read: {exc}") from exc
        # The bulk scan ends quietly at a block that fails its checksum: a scan that did
        # not reach the store's last key stopped at one.
        if end is not None and end.startswith(_STATE) and end != last:
            raise StateError(f"local checkpoint {self.path}: cannot read: the scan stopped early")
        return found

    def _last_key(self) -> bytes | None:
        """The store's last key (None: empty); raises where its block does not read."""
        scan = self._db.iter()
        scan.seek_to_last()
        end: bytes | None = scan.key() if scan.valid() else None
        scan.status()  # raises where the seek stopped at an error
        del scan  # before the store can close: an open iterator pins it
        return end

    def write(self, records: Iterable[tuple[str, bytes | None]], header: Header | None) -> int:
        """Apply records (a state, or None: delete the key) and the new header (None:
        the header stays), in one write batch; returns the records written."""
        batch = self._rocks.WriteBatch(raw_mode=True)
        count = 0
        for key, value in records:
            name = _STATE + key.encode("utf-8", "surrogateescape")
            if value is None:
                batch.delete(name)
            else:
                batch.put(name, value)
            count += 1
        if header is not None:
            batch.put(_HEADER, header.to_bytes())
        self._commit(batch)
        return count

    def rebuild(self, records: Iterable[tuple[str, bytes]], header: Header) -> int:
        """Replace everything with ``records`` as of ``header``: the header goes first,
        the states in batches, the new header last (a crash before it leaves a store
        without one, which a reader refuses). The caller passes an empty store
        (``discard``, then ``open``)."""
        self._commit_delete_header()
        count = 0
        batch = self._rocks.WriteBatch(raw_mode=True)
        for key, value in records:
            batch.put(_STATE + key.encode("utf-8", "surrogateescape"), value)
            count += 1
            if count % _REBUILD_BATCH == 0:
                self._commit(batch)
                batch = self._rocks.WriteBatch(raw_mode=True)
        batch.put(_HEADER, header.to_bytes())
        self._commit(batch)
        return count

    def invalidate(self) -> None:
        """Delete the header: the store is refused at its next open (and rebuilt)."""
        self._commit_delete_header()

    def _commit_delete_header(self) -> None:
        batch = self._rocks.WriteBatch(raw_mode=True)
        batch.delete(_HEADER)
        self._commit(batch)

    def _commit(self, batch: Any) -> None:
        self._call("write", self._db.write, batch, self._write)

    def _call(self, what: str, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:  # a full disk, an I/O error: rocksdict's plain exception
            raise StateError(f"local checkpoint {self.path}: {what} failed: {exc}") from exc

    def flush(self) -> None:
        """Write the memtable out: what was written survives a kill -9 from now on."""
        self._call("flush", self._db.flush)

    def close(self) -> None:
        """Flush the memtable (so the store reopens as of its last write) and close."""
        try:
            self._db.flush()
        finally:
            self._db.close()

    @staticmethod
    def discard(directory: str | Path, partition: int) -> None:
        """Delete partition ``partition``'s store (closed) and everything in it."""
        shutil.rmtree(Path(directory) / f"checkpoint-{partition}", ignore_errors=True)

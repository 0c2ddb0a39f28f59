"""Local checkpoints: each changelog partition's records kept on local disk, so that a
restart reads only the changelog's tail.

With a state dir and durable state, the engine child keeps a
``CheckpointStore`` per input partition it holds (``DIR/checkpoint-<p>``): a
copy of the changelog partition's last record per key as of changelog offset
``offset``. When and what is written, in order:

1. **Taken.** A checkpoint's records (``EngineHost.checkpoint``) are kept
   here, pending, grouped by partition, in the order checkpoints are taken.
2. **Durable.** Once the parent has the changelog's acknowledgements for
   them and has committed the input offsets (at-least-once) or the
   partitions' transactions (exactly-once), it says so (``Checkpointed``,
   with the changelog offset after each partition's records). Only then do
   the oldest pending checkpoint's records join what is still to write (a
   key's later record replacing an earlier one): a store never holds a state
   the changelog might not (an aborted transaction's), so a restore that
   reads the store and the changelog after its offset restores what the
   changelog alone would. Checkpoints commit in order (the committer's
   rule), so the oldest pending one is the one confirmed.
   ``write_some`` then writes them in batches of at most ``WRITE_CHUNK``
   records, between requests, each partition's new offset in the batch of
   its last record (rocksdict holds the GIL while it writes, so one batch of
   a whole checkpoint, 10,000 states, would hold the next step up some
   70-130 ms here; chunks bound that to a few ms). Until that last batch the
   store's offset is the previous one, whose tail holds every record of the
   chunks written: a restore from it still equals the changelog's.
3. **Restored.** A newly held partition's store is opened and checked
   (``open``): a store that does not open or read, has no header (never
   completed), or names another changelog topic or another model is
   discarded, and so is one whose offset the parent finds outside the
   changelog (behind its start: records it needed were deleted; past its
   end: another incarnation of the topic). The parent then reads the
   changelog from the offset (a kept store) or from the start (none); the
   restore merges the store's records with the tail (``merged``) and writes
   the tail to the store, or rebuilds the store from the whole partition.
4. **Released.** A partition that moves away has its store closed and kept:
   if it comes back while the store's offset still lies in the changelog, its
   restore reads only the tail (the other owner's records included). A store
   not opened again within ``grace_s`` of its release (or of this process's
   start, for one found on disk) is deleted by ``sweep``.

Pure and synchronous (the engine child calls it between steps); the parent's
side is ``durability/changelog.py``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamlstm.checkpoint_store import CheckpointStore, Header
from streamlstm.consumers.engine.protocol import Change
from streamlstm.errors import StateError
from streamlstm.stream_state import StateBlobs

__all__ = ["LocalCheckpoints", "LocalCounts"]

logger = logging.getLogger(__name__)

_DIRECTORY = re.compile(r"checkpoint-(-?\d+)")
#: Records one ``write_some`` writes at most: about 4 ms of the engine child's time on
#: this machine (rocksdict holds the GIL while it writes, so a thread would not help).
WRITE_CHUNK = 512


@dataclass
class LocalCounts:
    """What the local checkpoints did since the process started (running totals)."""

    #: Records written to the stores (states and deletions), and the seconds it took.
    written: int = 0
    write_seconds: float = 0.0
    #: Stores not used at a restore, by why (``open``'s kinds).
    discarded: dict[str, int] = field(default_factory=dict)
    #: Stores deleted after their grace period.
    expired: int = 0


class LocalCheckpoints:
    """The local checkpoints of the partitions an engine child holds (see the module)."""

    def __init__(
        self,
        directory: str | Path,
        topic: str,
        *,
        grace_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.topic = topic
        self.grace_s = grace_s
        self.counts = LocalCounts()
        self._clock = clock
        self._stores: dict[int, CheckpointStore] = {}
        #: Records of the checkpoints taken and not yet durable, oldest first.
        self._pending: deque[dict[int, list[Change]]] = deque()
        #: Durable records not yet written, per partition (key -> its latest record), and
        #: the header to write with the last of them.
        self._unwritten: dict[int, dict[str, bytes | None]] = {}
        self._target: dict[int, Header] = {}
        #: What ``open`` read of each store, until its partition's restore merges it.
        self._opened: dict[int, dict[str, bytes]] = {}
        #: Stores on disk but closed: when they were released (or found, at start).
        self._released: dict[int, float] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        now = clock()
        for path in self.directory.iterdir():
            match = _DIRECTORY.fullmatch(path.name)
            if match is not None:
                self._released[int(match.group(1))] = now

    # -- restore ------------------------------------------------------------

    def open(self, partition: int, model: str) -> tuple[int | None, str]:
        """Open ``partition``'s store and read it: its offset, or None and why there is
        none to use (a kind, as ``counts.discarded`` counts them; the store is then
        emptied, ready for ``restored``, and the log says more)."""
        self._close(partition)
        self._released.pop(partition, None)
        try:
            store = CheckpointStore.open(self.directory, partition)
            self._stores[partition] = store
            header = store.header()
            if header is None:
                kind, why = "missing", "no local checkpoint (or one never completed)"
            else:
                kind, why = _mismatch(header, self.topic, model)
            if not kind and header is not None:
                self._opened[partition] = store.records()
                return header.offset, ""
        except StateError as exc:
            kind, why = "corrupt", str(exc)
        self.discard(partition, kind, why)
        return None, kind

    def discard(self, partition: int, kind: str, why: str) -> None:
        """Empty ``partition``'s store (the changelog restores the partition whole);
        ``kind`` counts it (``counts.discarded``), ``why`` is logged."""
        self._opened.pop(partition, None)
        store = self._stores.pop(partition, None)
        if store is not None:
            store.close()
        CheckpointStore.discard(self.directory, partition)
        self._stores[partition] = CheckpointStore.open(self.directory, partition)
        self.counts.discarded[kind] = self.counts.discarded.get(kind, 0) + 1
        log = logger.info if kind == "missing" else logger.warning
        log("partition %d: local checkpoint not used (%s): %s", partition, kind, why)

    def merged(self, partition: int, tail: StateBlobs, deleted: Sequence[str]) -> StateBlobs:
        """The store's records (read by ``open``) with the changelog's tail over them: a
        tail state replaces the store's, a key whose last tail record is a tombstone
        (``deleted``) goes."""
        records = self._opened.pop(partition, None)
        if records is None:
            raise StateError(f"partition {partition}: no local checkpoint opened to restore")
        for key in deleted:
            records.pop(key, None)
        records.update(tail.items())
        return StateBlobs.from_dict(records)

    def restored(
        self,
        partition: int,
        states: StateBlobs,
        deleted: Sequence[str],
        *,
        tail: bool,
        end: int,
        model: str,
    ) -> None:
        """A restore of ``partition`` read the changelog to ``end``: ``states`` were the
        tail over the store (``tail``) or the whole partition."""
        store = self._stores.get(partition)
        if store is None:
            return
        header = Header(self.topic, model, end)
        if tail:
            records: Iterable[tuple[str, bytes | None]] = [
                *states.items(),
                *((key, None) for key in deleted),
            ]
            self._timed(store.write, records, header)
        else:
            if partition in self._opened:  # opened, then refused by the parent
                self.discard(partition, "outside_changelog", "its offset is not in the changelog")
                store = self._stores[partition]
            self._timed(store.rebuild, states.items(), header)
        # Now, not when the memtable fills: a restart after a kill -9 then finds the
        # store as of its restore at least (without a write-ahead log, what is not
        # flushed is lost, header and all).
        store.flush()

    # -- checkpoints --------------------------------------------------------

    def taken(self, records: Sequence[Change]) -> None:
        """A checkpoint's records, pending until ``checkpointed`` says they are durable."""
        grouped: dict[int, list[Change]] = {p: [] for p in self._stores}
        for record in records:
            held = grouped.get(record.partition)
            if held is not None:
                held.append(record)
        self._pending.append(grouped)

    def checkpointed(self, offsets: dict[int, int], model: str) -> int:
        """The oldest pending checkpoint is durable, each partition's records in the
        changelog before ``offsets[p]``: they join what is still to write (a later
        record of a key replacing an earlier one), written by ``write_some``, the new
        offset with the last of them. Returns the records queued."""
        if not self._pending:
            logger.warning("a checkpoint confirmed that was not taken: nothing written")
            return 0
        grouped = self._pending.popleft()
        queued = 0
        for partition, records in grouped.items():
            store = self._stores.get(partition)
            if store is None or not records:
                continue
            if partition not in offsets:
                # Its records are not said to be in the changelog: the store can no longer
                # be a copy of it (never seen; a guard, refused at its next open).
                logger.warning("partition %d: checkpoint without offsets", partition)
                self._unwritten.pop(partition, None)
                store.invalidate()
                continue
            self._unwritten.setdefault(partition, {}).update((r.stream, r.state) for r in records)
            self._target[partition] = Header(self.topic, model, offsets[partition])
            queued += len(records)
        self.sweep()
        return queued

    @property
    def unwritten(self) -> int:
        """Records durable in the changelog, not yet in the local checkpoints."""
        return sum(map(len, self._unwritten.values()))

    def write_some(self, limit: int = WRITE_CHUNK) -> int:
        """Write up to ``limit`` of the records still to write, one batch per partition;
        a partition's new offset goes in the batch with its last record. Between
        batches a store holds some of a checkpoint's states under the offset before
        it: a restore from there reads those states' records again in the tail (they
        are in the changelog after that offset), so the result is the changelog's.
        Returns the records written."""
        written = 0
        for partition in list(self._unwritten):
            if written >= limit:
                break
            records = self._unwritten[partition]
            chunk = [records.popitem() for _ in range(min(len(records), limit - written))]
            header = None
            if not records:
                del self._unwritten[partition]
                header = self._target.pop(partition)
            written += self._timed(self._stores[partition].write, chunk, header)
        return written

    def _timed(self, write: Callable[..., int], records: Any, header: Header | None) -> int:
        started = time.perf_counter()
        count = write(records, header)
        self.counts.write_seconds += time.perf_counter() - started
        self.counts.written += count
        return count

    # -- lifecycle ----------------------------------------------------------

    def release(self, partitions: Iterable[int]) -> None:
        """These partitions moved away: their stores closed and kept for ``grace_s``; any
        pending records of theirs are dropped (their restore, if they come back, reads
        what the changelog has after the store's offset)."""
        now = self._clock()
        for partition in partitions:
            if self._close(partition):
                self._released[partition] = now

    def _close(self, partition: int) -> bool:
        for grouped in self._pending:
            grouped.pop(partition, None)
        self._opened.pop(partition, None)
        self._unwritten.pop(partition, None)  # its store stays as of its last offset
        self._target.pop(partition, None)
        store = self._stores.pop(partition, None)
        if store is None:
            return False
        store.close()
        return True

    def sweep(self) -> int:
        """Delete the stores released more than ``grace_s`` ago; how many."""
        now = self._clock()
        old = [p for p, at in self._released.items() if now - at >= self.grace_s]
        for partition in old:
            del self._released[partition]
            CheckpointStore.discard(self.directory, partition)
            logger.info("local checkpoint of partition %d deleted: not held again", partition)
        self.counts.expired += len(old)
        return len(old)

    def write_all(self) -> int:
        """Write everything still to write; the records written."""
        return self.write_some(self.unwritten)

    def close(self, *, drain: bool = True) -> None:
        """Write what is still to write (unless not ``drain``: as a process that dies
        leaves them), then close every store (flushed)."""
        if drain:
            self.write_all()
        for partition in list(self._stores):
            self._close(partition)


def _mismatch(header: Header, topic: str, model: str) -> tuple[str, str]:
    """Why a store with ``header`` cannot serve a restore of ``topic`` by ``model``: a
    kind and the words (("", ""): it can)."""
    if header.topic != topic:
        return "other_changelog", f"a copy of {header.topic}, not {topic}"
    if header.model != model:
        return "other_model", f"written while {header.model} was served, not {model}"
    return "", ""

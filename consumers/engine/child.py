"""The engine's side of the socket: the child process that holds every stream's state.

``python -m streamlstm.consumers.engine.child FD OPTIONS`` (started by
``ProcessClient``) loads the model, then answers requests one at a time, in
the order they came:

- ``step``: ``Engine.step`` (a failing step is taken again tick by tick, see
  ``isolation``); remembers each stream's input partition and which streams
  changed since the last checkpoint.
- ``checkpoint``: the states of the streams changed since the last one, as
  of every step asked for before it (the order of requests makes "as of
  batch k" exact), and a tombstone for each stream that ended or was
  evicted; a stream moved to the cold tier leaves none, and its state is
  written where the changelog lacks it; then forgets the changes.
- ``restore``: bulk-loads states read from the changelog (never marked as
  changed), following the model-change policy and ``max_streams``; with a
  cold tier, those beyond ``max_streams`` go to disk.
- ``drop``: forgets the streams of partitions that moved away (no
  tombstones: their state lives on in the changelog for the new owner), and
  their cold tier's stores; their local checkpoints are closed and kept.
- ``open_local``, ``checkpointed`` (with a state dir and durable state):
  each partition's local checkpoint opened for its restore, and written once
  a checkpoint is durable (``local_checkpoints.py``).
- reads (``InspectStream``, ``ListStreams``, ``CountStreams``): what is
  held, as of the steps asked for before (``as_of``); each is O(1) or looks
  at a bounded number of slots, so it delays the next step by little.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import mmap
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from streamlstm import Bundle, Engine, EngineStats, StepResult
from streamlstm.cold_tier import ColdConfig
from streamlstm.consumers.engine.isolation import concat_results, slice_request, step_isolated
from streamlstm.consumers.engine.local_checkpoints import LocalCheckpoints
from streamlstm.consumers.engine.protocol import (
    Change,
    ChangesReply,
    Checkpointed,
    CheckpointedReply,
    Close,
    CountsReply,
    CountStreams,
    Drop,
    DropReply,
    ErrorReply,
    InspectStream,
    ListStreams,
    LocalReply,
    LocalRestore,
    OpenLocal,
    PageReply,
    Read,
    ReadReply,
    Reply,
    Request,
    Reserve,
    ReserveReply,
    Restore,
    RestoreReply,
    RestoreReport,
    StartReply,
    Step,
    StepReply,
    StepRequest,
    StreamReply,
    SwapModel,
    SwapReply,
    TakeChanges,
    frame,
    read_frame,
)
from streamlstm.consumers.engine.shadow import shadow_key, split_shadow, take_blobs
from streamlstm.consumers.engine.spool import Spool
from streamlstm.errors import BundleError, ConfigError, StateError, StreamLSTMError
from streamlstm.kernels import set_num_threads
from streamlstm.quality import QualityConfig, StreamError
from streamlstm.store import MAX_PAGE_SCAN, StateStore
from streamlstm.stream_state import (
    StateArrays,
    StateBlobs,
    StreamState,
    decode_many,
    encode_many,
)
from streamlstm.swap_policy import same_state_layout, swap_mode

__all__ = ["EngineHost", "InProcessClient", "RestoreReport"]

logger = logging.getLogger(__name__)


#: How many of the worst streams by recent error the daemon logs with each summary.
WORST_STREAMS = 5


@dataclass
class _Counts:
    """A restore's states by what became of them (``RestoreReport``'s counts)."""

    reset: int = 0
    kept: int = 0
    corrupt: int = 0
    rewarmed: int = 0


#: A restore's states sorted: those to load, the counts, the ids of another model's
#: states among them, and those to re-warm once loaded.
_Sorted = tuple[StateArrays, _Counts, list[str], list[str]]

#: A state's cell and layer sizes.
_Layout = tuple[str, tuple[int, ...]]


class EngineHost:
    """An ``Engine`` with the bookkeeping the daemon needs around it.

    Each stream's input partition, whether its state changed since the last
    checkpoint and which streams left the store are kept by the store as it
    goes (``StateStore.changes``), so the bookkeeping here is O(changes), not
    O(ticks). ``changelog=False`` (memory state: nothing is checkpointed)
    keeps no tombstones of removed streams.

    ``shadow``: a second engine (``--shadow-model``) stepped on the same ticks
    after the served one, with the same controls; its answers go back beside
    the served model's (``StepReply.shadow``), its states to the changelog
    under their own keys (``shadow.py``). A shadow that fails is stopped; the
    served model goes on. A swap to the shadow's model promotes it
    (``swap_model``).

    ``local``: the local checkpoints (``--state-dir`` with durable state): each
    checkpoint's records are kept there until the parent says they are durable.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        shadow: Engine | None = None,
        local: LocalCheckpoints | None = None,
        changelog: bool = True,
        worst_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.shadow = shadow
        self.local = local
        for held in (engine, shadow):
            if held is not None:
                held.store.changes.tombstones = changelog
        self._worst_interval_s = worst_interval_s
        self._clock = clock
        self._worst: tuple[StreamError, ...] = ()
        self._worst_at = -math.inf
        #: Each input partition's offset after the last record of it stepped (``as_of``).
        self._as_of: dict[int, int] = {}
        #: Changelog keys to tombstone at the next checkpoint (their partitions): shadow
        #: states no shadow holds any more (after a promotion, or restored without one).
        self._orphans: dict[str, int] = {}

    @property
    def model_id(self) -> str:
        return self.engine.bundle.model_id

    @property
    def stats(self) -> EngineStats:
        """The engine's figures, with its worst streams by recent error as of at most
        ``worst_interval_s`` ago (ranking every held stream is O(streams): not per step),
        and the shadow's id and live quality where one runs."""
        now = self._clock()
        if now - self._worst_at >= self._worst_interval_s:
            self._worst = tuple(self.engine.worst_streams(WORST_STREAMS))
            self._worst_at = now
        stats = replace(self.engine.stats, worst_streams=self._worst)
        if self.shadow is not None:
            shadow = self.shadow
            stats = replace(
                stats, shadow_model=shadow.bundle.model_id, shadow_quality=shadow.quality
            )
        return stats

    @property
    def partition_of(self) -> dict[str, int]:
        """Each held stream's input partition, as the store keeps it (for inspection)."""
        store = self.engine.store
        held = {s: store.partition_of(s) for s in store.stream_ids()}
        return {s: p for s, p in held.items() if p is not None}

    def step(self, request: StepRequest, *, with_evictions: bool = True) -> StepReply:
        """``Engine.step``, with the request's controls applied among its ticks in order
        (then the shadow's, likewise); ``with_evictions=False`` leaves out the evicted
        states (the shadow's are never sent)."""
        start = time.perf_counter()
        self._as_of.update(request.positions)
        result, applied = _stepped(self.engine, request)
        shadow = self._shadow_step(request)
        seconds = time.perf_counter() - start
        if not with_evictions and result.evictions:
            result = replace(result, evictions=[])
        return StepReply(result, self.stats, seconds, applied, shadow)

    def _shadow_step(self, request: StepRequest) -> StepResult | None:
        shadow = self.shadow
        if shadow is None:
            return None
        try:
            result, _ = _stepped(shadow, request)
        except Exception:
            # Whatever breaks the candidate must not touch the served model's answers.
            logger.exception("shadow model %s failed: stopped", shadow.bundle.model_id)
            self.shadow = None
            return None
        return replace(result, evictions=[]) if result.evictions else result

    def drop(self, partitions: set[int]) -> int:
        """Release the streams of revoked ``partitions`` (the served model's and the
        shadow's): their new owner restores them, so they leave no tombstone (nor does
        anything removed from them before). Returns how many the served model held."""
        if self.shadow is not None:
            _release(self.shadow.store, partitions)
        self._orphans = {k: p for k, p in self._orphans.items() if p not in partitions}
        for partition in partitions:
            self._as_of.pop(partition, None)
        if self.local is not None:
            self.local.release(partitions)
        return _release(self.engine.store, partitions)

    def read(self, query: Read) -> ReadReply:
        """A read of what is held, as of every step before it."""
        as_of = dict(self._as_of)
        match query:
            case InspectStream(stream=stream, include_state=include_state):
                return StreamReply(self.engine.inspect(stream, include_state=include_state), as_of)
            case ListStreams(prefix=prefix, limit=limit, cursor=cursor):
                page = self.engine.store.page(
                    prefix=prefix, limit=limit, cursor=cursor, max_scan=MAX_PAGE_SCAN
                )
                return PageReply(*page, as_of)
            case CountStreams():
                return CountsReply(self.engine.store.partition_counts(), as_of)

    def checkpoint(self) -> list[Change]:
        """Every change since the last checkpoint: a state, or None for a tombstone (the
        shadow's under its keys; orphaned shadow keys' tombstones first, so a state
        written again in the same checkpoint stands)."""
        records = [Change(key, partition, None) for key, partition in self._orphans.items()]
        self._orphans.clear()
        records += _changes(self.engine, str)
        if self.shadow is not None:
            records += _changes(self.shadow, shadow_key)
        if self.local is not None:
            self.local.taken(records)
        return records

    def close(self) -> None:
        """At exit: the local checkpoints closed (flushed: a restart finds them as of
        their last write) and the cold tier's stores."""
        if self.local is not None:
            self.local.close()
        self.engine.close()

    def open_local(self, partitions: Sequence[int]) -> LocalReply:
        """Open these partitions' local checkpoints for their restores (``LocalReply``)."""
        local = self.local
        if local is None:
            return LocalReply({}, {p: "off" for p in partitions})
        offsets: dict[int, int] = {}
        refused: dict[int, str] = {}
        for partition in partitions:
            offset, why = local.open(partition, self.model_id)
            if offset is None:
                refused[partition] = why
            else:
                offsets[partition] = offset
        return LocalReply(offsets, refused)

    def checkpointed(self, offsets: dict[int, int]) -> CheckpointedReply:
        """The oldest checkpoint taken is durable: queued for the local checkpoints
        (``write_local`` writes it)."""
        local = self.local
        if local is None:
            return CheckpointedReply(0, 0, 0, 0.0)
        queued = local.checkpointed(offsets, self.model_id)
        counts = local.counts
        return CheckpointedReply(queued, local.unwritten, counts.written, counts.write_seconds)

    def write_local(self, *, everything: bool = False) -> None:
        """Some of what the local checkpoints still have to write (the child, between
        requests), or ``everything`` (in process: each request runs to its end)."""
        if self.local is not None and everything:
            self.local.write_all()
        elif self.local is not None:
            self.local.write_some()

    def reserve(self, streams: int) -> None:
        """Room for ``streams`` more streams, made now (ahead of a restore)."""
        self.engine.store.reserve(streams)

    def swap_model(self, message: SwapModel) -> SwapReply:
        """Load the bundle ``message`` names and serve it from the next step on; raises
        (the model served so far goes on) where it does not load or is not the one the
        daemon read. A carried state's changelog record still names the old model until
        its stream ticks again: a restore decides for it by the same rule
        (``swap_policy``), so it is carried again. A swap to the shadow's model is its
        promotion (``promote``)."""
        started = time.perf_counter()
        if self.shadow is not None and message.model_id == self.shadow.bundle.model_id:
            streams, carried = self.promote(message.mode)
        else:
            bundle = load_checked(message.path, message.model_id)
            streams, carried = self.engine.swap_model(bundle, mode=message.mode), 0
        seconds = time.perf_counter() - started
        return SwapReply(self.model_id, streams, seconds, self.stats, carried)

    def promote(self, mode: str) -> tuple[int, int]:
        """Serve the shadow's engine: every stream it holds goes on from the shadow's own
        state (warmed on the same ticks all along); a stream only the served model held
        gets ``mode`` (carry, rewarm or reset, as a swap). Every state is written under
        its served key at the next checkpoint, and its shadow key tombstoned. Returns
        the streams held and how many came from the shadow."""
        old, new = self.engine, self.shadow
        assert new is not None
        if mode == "carry" and not same_state_layout(old.bundle.config, new.bundle.config):
            raise ConfigError("promote: cannot carry the served model's states into the shadow's")
        slots, held = new.store.held()
        for stream, slot in zip(held, slots.tolist(), strict=True):
            self._orphans[shadow_key(stream)] = int(new.store.partitions[slot])
        if old.store.cold is not None:  # the streams on disk: the promoted engine's now
            new.store.adopt_cold(old.store, mode)
        arrays = old.store.arrays()
        rows = [i for i, stream in enumerate(arrays.ids) if stream not in new.store]
        if rows:
            _load(new, arrays.take(rows), mode)
        new.store.changes.changed[new.store.held()[0]] = True
        self.engine, self.shadow = new, None
        return len(new.store), len(held)

    def _mode(self, engine: Engine, policy: str, made_by: str, layout: _Layout) -> str:
        """What becomes of a state ``made_by`` a model, of ``layout`` (cell, layer sizes)."""
        store = engine.store
        compatible = layout == (store.cell, store.hidden_sizes)
        model_id = engine.bundle.model_id
        mode = swap_mode(policy, made_by=made_by, model_id=model_id, compatible=compatible)
        return "reset" if mode == "rewarm" and not engine.history_ticks else mode

    def restore(
        self,
        partition: int,
        blobs: Mapping[str, bytes] | StateBlobs,
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        """Load one changelog partition's states; see ``RestoreReport`` for what is counted.
        A state another model made goes on, is re-warmed or reset as ``policy`` says
        (``swap_policy.swap_mode``: the rule a live swap follows). Shadow keys restore
        the shadow (``shadow.py``). ``local``: the read is the changelog's tail over the
        partition's local checkpoint (merged here first), or the whole partition (which
        replaces the local checkpoint), and both bring the local checkpoint up to it."""
        if not isinstance(blobs, StateBlobs):
            blobs = StateBlobs.from_dict(blobs)
        read = blobs
        if self.local is not None and local is not None and local.tail:
            blobs = self.local.merged(partition, read, local.deleted)
        served, shadowed = split_shadow(blobs)
        report = self._restore_into(self.engine, partition, served, policy)
        if len(shadowed):
            self._restore_shadowed(partition, shadowed, policy)
        if self.local is not None and local is not None:
            self.local.restored(
                partition, read, local.deleted, tail=local.tail, end=local.end, model=self.model_id
            )
            report = replace(report, from_local=len(blobs) - len(read))
        return report

    def _restore_shadowed(self, partition: int, blobs: StateBlobs, policy: str) -> None:
        """Shadow states: the shadow's (if one runs), or, made by the served model, that
        model's (a promotion not checkpointed before a restart: they win over its own
        records); the rest orphaned. Every one the shadow does not take is tombstoned."""
        serving = self.model_id
        try:
            models = decode_many(blobs).models
        except StateError:
            models = [""] * len(blobs)  # corrupt ones among them: sorted one by one below
        promoted = [i for i, model in enumerate(models) if model == serving]
        rest = [i for i, model in enumerate(models) if model != serving]
        if promoted:
            self._restore_into(self.engine, partition, take_blobs(blobs, promoted), "carry")
            store = self.engine.store
            slots = store.lookup([blobs.ids[i] for i in promoted])
            store.changes.changed[slots[slots >= 0]] = True
        if self.shadow is not None and rest:
            self._restore_into(self.shadow, partition, take_blobs(blobs, rest), policy)
            rest = []
        for i in [*promoted, *rest]:
            self._orphans[shadow_key(blobs.ids[i])] = partition

    def _restore_into(
        self, engine: Engine, partition: int, blobs: StateBlobs, policy: str
    ) -> RestoreReport:
        store = engine.store
        try:  # the common case: one model wrote them all, one layout: decoded as a table
            arrays: StateArrays | None = decode_many(blobs)
        except StateError:
            arrays = None
        if arrays is not None and len(set(arrays.models)) <= 1:
            sorted_ = self._sort_table(engine, arrays, policy)
        else:  # several models (a swap's old and new records), or corrupt: one by one
            sorted_ = self._sort_one_by_one(engine, blobs, policy)
        arrays, counts, foreign, rewarm = sorted_
        if not arrays.ids:
            return RestoreReport(0, counts.reset, counts.kept, 0, counts.corrupt, counts.rewarmed)
        arrays.partition[:] = partition
        whole, arrays = arrays, _most_recent(arrays, store.max_streams - len(store))
        spilled = self._spill(engine, whole, arrays) if store.cold is not None and not rewarm else 0
        over = len(blobs) - counts.corrupt - counts.reset - len(arrays.ids) - spilled
        store.restore_arrays(arrays)
        if foreign:  # another model's forecasts are not this one's to be judged by
            engine.restart_quality(foreign)
        if rewarm:
            engine.rewarm(rewarm)
        return RestoreReport(len(arrays.ids), counts.reset, counts.kept, over, counts.corrupt,
                             counts.rewarmed, spilled)  # fmt: skip

    def _spill(self, engine: Engine, whole: StateArrays, loaded: StateArrays) -> int:
        """A restore's states beyond memory's room (``whole`` less ``loaded``, the least
        recently seen) straight to the cold tier, written by this model as a live carry
        leaves them; how many it keeps (the disk bound may push some out: tombstoned)."""
        store, cold = engine.store, engine.store.cold
        assert cold is not None
        held = set(loaded.ids)
        rows = np.array([i for i, s in enumerate(whole.ids) if s not in held], dtype=np.int64)
        if not rows.size:
            return 0
        rest = whole.take(rows)
        values = encode_many(
            h=rest.h, c=rest.c, step=rest.step, offset=rest.offset, last_seen=rest.last_seen,
            extra=rest.extra, partition=rest.partition, model=engine.bundle.model_id,
            cell=rest.cell,
            history=rest.history if rest.history is not None and rest.history.size else None,
        )  # fmt: skip
        pushed = cold.put(rest.ids, rest.partition.tolist(), values, rest.last_seen.tolist())
        for stream, part, _ in pushed:  # beyond the disk bound too: their records go
            store.changes.dropped(stream, part)
        return int(rows.size) - len(pushed)

    def _sort_table(self, engine: Engine, arrays: StateArrays, policy: str) -> _Sorted:
        """States one model wrote, in one layout: kept, re-warmed or reset together."""
        store = engine.store
        model = arrays.models[0] if arrays.ids else ""
        layout = (arrays.cell, tuple(h.shape[1] for h in arrays.h))
        mode = self._mode(engine, policy, model, layout)
        n = len(arrays.ids)
        if mode == "carry":
            foreign = list(arrays.ids) if model and model != engine.bundle.model_id else []
            return arrays, _Counts(kept=len(foreign)), foreign, []
        if mode == "reset":
            return StateArrays.from_states({}), _Counts(reset=n), [], []
        zeroed = arrays.zeroed(store.hidden_sizes, store.cell)
        return zeroed, _Counts(rewarmed=n), list(arrays.ids), list(arrays.ids)

    def _sort_one_by_one(self, engine: Engine, blobs: StateBlobs, policy: str) -> _Sorted:
        store, model_id = engine.store, engine.bundle.model_id
        states: dict[str, StreamState] = {}
        counts, foreign, rewarm = _Counts(), [], []
        for stream, blob in blobs.items():
            try:
                state = StreamState.from_bytes(blob)
            except StateError:
                counts.corrupt += 1
                continue
            layout = (state.cell, tuple(h.size for h in state.h))
            mode = self._mode(engine, policy, state.model, layout)
            if mode == "reset":
                counts.reset += 1
                continue
            if mode == "rewarm":
                state = state.zeroed(store.hidden_sizes, store.cell)
                counts.rewarmed += 1
                rewarm.append(stream)
            elif state.model and state.model != model_id:
                counts.kept += 1
            if state.model and state.model != model_id:
                foreign.append(stream)
            states[stream] = state
        return StateArrays.from_states(states), counts, foreign, rewarm


def _stepped(engine: Engine, request: StepRequest) -> tuple[StepResult, tuple[bool, ...]]:
    """``engine``'s answers to ``request``, and which of its controls it applied."""
    if request.controls:
        return _with_controls(engine, request)
    return step_isolated(partial(_step, engine), request, engine.bundle.config.output_size), ()


def _step(engine: Engine, r: StepRequest) -> StepResult:
    return engine.step(
        r.stream_ids,
        r.features,
        resets=r.resets,
        ends=r.ends,
        timestamps=r.timestamps,
        offsets=r.offsets,
        partitions=r.partitions,
        gaps=r.gaps,
    )


def _with_controls(engine: Engine, request: StepRequest) -> tuple[StepResult, tuple[bool, ...]]:
    """The ticks stepped in slices between the controls, each control applied at its
    place (``Control.before``): one stream's ticks and controls in offset order."""
    outputs = engine.bundle.config.output_size
    step = partial(_step, engine)
    parts: list[tuple[int, StepResult]] = []
    applied = []
    done, n = 0, len(request.stream_ids)
    for control in [*request.controls, None]:
        until = n if control is None else min(max(control.before, done), n)
        if until > done:
            part = slice_request(request, done, until)
            parts.append((until - done, step_isolated(step, part, outputs)))
            done = until
        if control is not None:
            applied.append(
                engine.control(
                    control.stream, control.op, offset=control.offset, partition=control.partition
                )
            )
    if not parts:
        parts.append((0, step(slice_request(request, 0, 0))))
    return concat_results(parts), tuple(applied)


def _release(store: StateStore, partitions: set[int]) -> int:
    """Forget the store's streams of ``partitions`` (memory and disk); how many it held."""
    gone = store.streams_in(partitions)
    store.release(gone)
    store.changes.forget_partitions(partitions)
    if store.cold is not None:  # their states on disk are the new owner's too
        store.cold.drop(sorted(partitions))
    return len(gone)


def _changes(engine: Engine, key: Callable[[str], str]) -> list[Change]:
    """``engine``'s changed states and tombstones since the last checkpoint, keyed by
    ``key(stream)``."""
    store = engine.store
    live, parts, removed = store.take_changes()
    values = store.encode(live, parts, engine.bundle.model_id) if live else []
    records = [Change(key(s), p, v) for s, p, v in zip(live, parts, values, strict=True)]
    for stream, partition in removed.items():
        # Held again in the same partition: its state (above, if changed) stands.
        if store.partition_of(stream) != partition:
            records.append(Change(key(stream), partition, None))
    # Moved to the cold tier before the changelog had their state: written as a held
    # stream's is (never a tombstone: the state lives on, on disk).
    moved = store.changes.take_moved().items()
    records += [Change(key(s), p, value) for s, (p, value) in moved]
    return records


def _load(engine: Engine, arrays: StateArrays, mode: str) -> None:
    """Another model's states into ``engine``: carried, re-warmed or reset (a swap's rule)."""
    if mode == "rewarm" and not engine.history_ticks:
        mode = "reset"
    if mode != "carry":
        store = engine.store
        arrays = arrays.zeroed(store.hidden_sizes, store.cell, keep_steps=mode == "rewarm")
    engine.store.restore_arrays(arrays)
    engine.restart_quality(arrays.ids)
    if mode == "rewarm":
        engine.rewarm(arrays.ids)


class InProcessClient:
    """An ``EngineClient`` that runs an ``EngineHost`` in this process (tests, embedding).

    The same bookkeeping and answers as the child process, without its
    isolation: each request runs to its end before the next.
    """

    def __init__(self, child: EngineHost) -> None:
        self.child = child
        self.stats: EngineStats | None = None

    @property
    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None  # this process

    async def start(self) -> EngineStats:
        self.stats = self.child.stats
        return self.stats

    async def step(self, request: StepRequest) -> StepReply:
        reply = self.child.step(request)
        self.stats = reply.stats
        return reply

    async def drop_partitions(self, partitions: Sequence[int]) -> int:
        count = self.child.drop(set(partitions))
        self.stats = self.child.stats
        return count

    async def checkpoint(self) -> list[Change]:
        return self.child.checkpoint()

    async def read(self, query: Read) -> ReadReply:
        return self.child.read(query)

    async def swap_model(self, request: SwapModel) -> SwapReply:
        reply = self.child.swap_model(request)
        self.stats = reply.stats
        return reply

    async def reserve(self, streams: int) -> None:
        self.child.reserve(streams)

    async def restore(
        self,
        partition: int,
        states: dict[str, bytes],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        report = self.child.restore(partition, states, policy, local)
        self.stats = self.child.stats
        return report

    def spool(self, expected_records: int) -> Spool:
        return Spool(expected_records)

    async def restore_spooled(
        self,
        partition: int,
        spool: Spool,
        rows: dict[str, int],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        report = restore_spooled(self.child, await spool.restore(partition, rows, policy, local))
        self.stats = self.child.stats
        return report

    async def open_local(self, partitions: Sequence[int]) -> LocalReply:
        return self.child.open_local(partitions)

    async def checkpointed(self, offsets: dict[int, int]) -> CheckpointedReply:
        reply = self.child.checkpointed(offsets)
        self.child.write_local(everything=True)
        return reply

    def kill(self) -> None:
        return None  # nothing of its own to kill

    async def close(self, timeout_s: float = 10.0) -> None:
        return None


def _most_recent(arrays: StateArrays, room: int) -> StateArrays:
    """At most ``room`` states: the most recently seen (a restore over ``max_streams``)."""
    if len(arrays.ids) <= room:
        return arrays
    keep = np.sort(np.argsort(-np.nan_to_num(arrays.last_seen, nan=-np.inf))[: max(room, 0)])
    return arrays.take(keep)


# -- the process -------------------------------------------------------------


def serve(sock: socket.socket, options: dict[str, Any]) -> None:
    """The child's main: load, then answer requests until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_num_threads(int(options["threads"]))
    try:
        child = _host(options)
    except Exception as exc:
        _send_error(sock, exc)
        return
    gc.freeze()  # the model lives as long as the process: no full-collection pauses
    sock.sendall(frame(StartReply(child.stats)))
    try:
        _answer_all(sock, child)
    finally:
        child.close()


def _answer_all(sock: socket.socket, child: EngineHost) -> None:
    while True:
        message = read_frame(sock)
        if message is None or isinstance(message, Close):
            return  # closed, or the parent is gone
        try:
            reply = answer(child, message)
        except Exception as exc:
            _send_error(sock, exc)
            continue
        sock.sendall(frame(reply))
        child.write_local()  # after the reply: the parent goes on meanwhile


def _host(options: dict[str, Any]) -> EngineHost:
    """The engine (and the shadow's, where ``options`` name one) as the options say."""

    def engine(path: str, model_id: str | None, cold: ColdConfig | None) -> Engine:
        return Engine(
            load_checked(path, model_id),
            max_streams=options["max_streams"],
            idle_ttl_s=options["idle_ttl_s"],
            history_ticks=int(options.get("history_ticks", 0)),
            cold=cold,
            quality=QualityConfig(
                enabled=bool(options["quality"]),
                drift_window_ticks=int(options["drift_window_ticks"]),
            ),
        )

    shadow = options.get("shadow_model")
    return EngineHost(
        engine(options["model"], options.get("model_id"), _cold_config(options)),
        # The shadow keeps no cold tier: its states beyond max_streams are evicted.
        shadow=engine(shadow, options.get("shadow_model_id"), None) if shadow else None,
        local=_local_checkpoints(options),
        changelog=bool(options.get("changelog", True)),
        worst_interval_s=float(options["worst_interval_s"]),
    )


def _cold_config(options: dict[str, Any]) -> ColdConfig | None:
    """The cold tier the options ask for (``state_dir``), None without one."""
    directory = options.get("state_dir")
    if not directory:
        return None
    return ColdConfig(directory=directory, max_disk_streams=int(options["max_disk_streams"]))


def _local_checkpoints(options: dict[str, Any]) -> LocalCheckpoints | None:
    """The local checkpoints the options ask for (a state dir, and a changelog topic)."""
    directory, topic = options.get("state_dir"), options.get("local_checkpoint_topic")
    if not directory or not topic:
        return None
    return LocalCheckpoints(directory, topic, grace_s=float(options["state_cleanup_delay_s"]))


def load_checked(path: str, expected: str | None) -> Bundle:
    """The bundle at ``path``, weights and all, checked to be the one the daemon read
    (``expected``: its model id; None: not checked)."""
    bundle = Bundle.load(path)
    if expected is not None and bundle.model_id != expected:
        raise BundleError(
            f"{path}: changed after the daemon read it (now {bundle.model_id}, read as "
            f"{expected}); reload again to serve it"
        )
    return bundle


def answer(child: EngineHost, message: Request | Reply) -> Reply:
    """The reply to one request (raises what the request raised)."""
    match message:
        case Step():
            return child.step(message.request(), with_evictions=message.with_evictions)
        case TakeChanges():
            return ChangesReply(child.checkpoint())
        case Restore():
            report = restore_spooled(child, message)
            return RestoreReply(report, child.stats)
        case Reserve(streams=streams):
            child.reserve(streams)
            return ReserveReply(child.stats)
        case Drop(partitions=partitions):
            count = child.drop(set(partitions))
            return DropReply(count, child.stats)
        case SwapModel():
            return child.swap_model(message)
        case OpenLocal(partitions=partitions):
            return child.open_local(partitions)
        case Checkpointed(offsets=offsets):
            return child.checkpointed(offsets)
        case InspectStream() | ListStreams() | CountStreams():
            return child.read(message)
    raise StreamLSTMError(f"engine process: {type(message).__name__} is not a request")


def restore_spooled(child: EngineHost, message: Restore) -> RestoreReport:
    """``restore`` from the parent's file of states laid end to end (``Spool``), mapped
    (not read); stream ``ids[i]``'s state is record ``rows[i]`` of the file."""
    sizes = np.frombuffer(message.lengths, dtype=np.int64)
    ends = np.cumsum(sizes, dtype=np.int64)
    index = np.frombuffer(message.rows, dtype=np.int64)
    ids, path = message.ids, message.path
    data = np.zeros(0, dtype=np.uint8)
    if ids and ends[-1]:
        with open(path, "rb") as file:
            # Shared and read-only: views of it stay valid once the file is gone, and
            # nothing is copied until the store takes the columns. (Private, the
            # populate copied every page: 0.11 s for 100k states, 0.02 s this way.)
            mapped = mmap.mmap(
                file.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ
            )
        data = np.frombuffer(mapped, dtype=np.uint8)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    blobs = StateBlobs(ids, data, (ends - sizes)[index], ends[index])
    return child.restore(message.partition, blobs, message.policy, message.local)


#: Fault the mapping in at once (one call, not a page fault per 4 KiB read).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _send_error(sock: socket.socket, exc: Exception) -> None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # one that does not survive the trip goes as text, traceback included
        exc = StreamLSTMError(f"engine process: {''.join(traceback.format_exception(exc))}")
    sock.sendall(frame(ErrorReply(exc)))


if __name__ == "__main__":
    # Through the module's own name, so that what it pickles names importable classes.
    from streamlstm.consumers.engine import child as engine_child

    engine_child.serve(socket.socket(fileno=int(sys.argv[1])), json.loads(sys.argv[2]))

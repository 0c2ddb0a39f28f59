"""The engine: many streams' ticks in, one batched recurrent step per round out.

A call to ``Engine.step`` takes N ticks of any number of streams. Ticks are
split into *rounds*: round r holds every stream's (r+1)-th tick of the call, so
a stream's ticks are applied in order while all streams of a round advance
together: one recurrent step of the model and its head over the round's
streams, their state rows (h, and an LSTM's c) updated in place in the store,
through the C kernels (``kernels.NativeStep``) or NumPy
(``numpy_step.NumpyStep``). Rows with bad values are rejected one by one; the
rest proceed. No training framework is imported: torch serves only as the
oracle the tests compare with.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.batching import Rounds, each_round
from streamlstm.bundle import Bundle
from streamlstm.cold_tier import ColdConfig, ColdTier
from streamlstm.control import apply_control
from streamlstm.errors import ConfigError
from streamlstm.event_clock import EventClock
from streamlstm.kernels import NativeStep, native_available
from streamlstm.numpy_step import NumpyStep
from streamlstm.quality import Quality, QualityConfig, QualityReport, StreamError
from streamlstm.results import F32, F64, I64, Bools, EngineStats, Rejection, StepResult
from streamlstm.scoring import Scoring
from streamlstm.store import Eviction, StateStore
from streamlstm.stream_view import StreamView
from streamlstm.swap_policy import SWAP_MODES, same_state_layout
from streamlstm.tick_checks import bool_column, column, validate_ticks

__all__ = ["Engine", "EngineStats", "Rejection", "StepResult"]

#: Streams re-warmed together through all their rounds (``Engine.rewarm``).
_REWARM_BLOCK = 4096

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class _Admitted:
    """A call's ticks that go on to be stepped (``rows`` of the call), what the store
    knows of their streams, and what was left out on the way."""

    rows: I64
    ids: Sequence[str]
    held: I64  # each row's slot, -1 for a stream not held
    distinct: bool | None  # all held and none twice (None: not known)
    x: F32  # every tick's features, rejected ones included
    rejections: list[Rejection]
    skipped: Bools | None


class Engine:
    """Stateful, batched inference over many streams for one bundle.

    ``max_streams`` bounds memory (LRU eviction beyond it); ``idle_ttl_s``
    forgets streams idle for longer. ``native`` picks the C code (recurrent
    step and id -> slot map, ``True``), NumPy and a dict (``False``), or the
    C code where it is built (``None``). ``cold`` adds a cold tier
    (``cold_tier.ColdConfig``; the ``cold`` extra): a stream evicted for room
    is moved to local disk instead of dropped, and read back, with every
    other stream of the step that returns, in one batched read per input
    partition before the step; it continues exactly (``close`` closes it).

    **Clocks.** Idle expiry runs on the engine's clock (``clock_s``), which is
    event time as the streams agree on it, so that one bad timestamp cannot
    age or evict other streams:

    - a tick's time is its timestamp, capped at the wall clock (``clock()``,
      epoch seconds) plus ``max_clock_skew_s``; a tick without one (NaN, or
      ``timestamps=None``) is stamped with the engine's clock;
    - the clock never goes back. It moves at once to the second-latest time
      among distinct streams (of this call, and the lone claim below); to the
      latest when that is no more than ``idle_ttl_s`` ahead of the clock and
      not ahead of the wall clock. A later time that only one stream claims
      waits (the latest such claim is kept) until a second stream confirms it;
    - until the streams first agree on a time, nothing expires and ticks
      without a timestamp are stamped with the wall clock; an engine whose
      ticks have never carried a timestamp runs (and expires) on the wall clock;
    - a stream's own last-seen time never goes back either, and a stream
      whose own tick comes more than ``idle_ttl_s`` after its last one starts
      again from zero (reason ``ttl``), whatever the clock says.

    So a nanosecond or far-future timestamp moves only its own stream's time
    (capped), a replay of old data keeps its own event time, and the daemon
    passes NaN, not the wall clock, for ticks without one.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_streams: int = 1_000_000,
        idle_ttl_s: float | None = None,
        initial_capacity: int = 1024,
        clock: Callable[[], float] = time.time,
        native: bool | None = None,
        max_clock_skew_s: float = 60.0,
        quality: QualityConfig | None = None,
        history_ticks: int = 0,
        cold: ColdConfig | None = None,
    ) -> None:
        if not (
            isinstance(max_clock_skew_s, int | float)
            and not isinstance(max_clock_skew_s, bool)
            and 0 <= max_clock_skew_s < math.inf
        ):
            raise ConfigError(
                f"max_clock_skew_s: must be a non-negative number, got {max_clock_skew_s!r}"
            )
        if native and not native_available():
            raise ConfigError(
                "native: the C kernels are not built (or STREAMLSTM_NATIVE=0); "
                "reinstall with a C compiler, or leave native unset"
            )
        self.bundle = bundle
        spec = bundle.outputs
        self._scoring = Scoring.of(spec)
        scoring_width = self._scoring.width if self._scoring else 0
        use_native = native_available() if native is None else native
        self._quality = Quality.of(
            bundle, quality or QualityConfig(), scoring_width, native=use_native
        )
        self.store = StateStore(
            bundle.config.hidden_sizes,
            cell=bundle.config.cell,
            max_streams=max_streams,
            idle_ttl_s=idle_ttl_s,
            initial_capacity=initial_capacity,
            extra_width=scoring_width + (self._quality.width if self._quality else 0),
            extra_kept=scoring_width,
            answer_width=bundle.config.output_size + 1,
            history=(history_ticks, bundle.config.input_size),
            native=use_native,
        )
        self.store.model = bundle.model_id
        self.store.accepted_models = frozenset({bundle.model_id})
        if cold is not None:
            self.store.cold = ColdTier(cold)
        self._clock = clock
        self._quality_config = quality or QualityConfig()
        self.max_clock_skew_s = float(max_clock_skew_s)
        self._event_time = EventClock(
            clock, max_clock_skew_s=self.max_clock_skew_s, ttl=lambda: self.store.idle_ttl_s
        )
        self._input_size = bundle.config.input_size
        self._swept_at = -math.inf
        self._next_sweep = -math.inf
        self._counts: Counter[str] = Counter()
        self._step: NativeStep | NumpyStep = (
            NativeStep(bundle.weights) if use_native else NumpyStep(bundle.weights)
        )
        self._outputs = bundle.config.output_size

    @property
    def native(self) -> bool:
        """Whether steps go through the C kernels (else through NumPy)."""
        return isinstance(self._step, NativeStep)

    @property
    def clock_s(self) -> float:
        """The time idle expiry runs on, epoch seconds (see the class docstring)."""
        return self._event_time.now_s

    @property
    def quality(self) -> QualityReport | None:
        """The model's live quality figures so far (None: ``QualityConfig(enabled=False)``):
        realized forecast errors against the naive baselines, input drift, anomaly
        rates. Totals only grow; ``later.since(earlier)`` gives a span's figures."""
        return self._quality.report() if self._quality is not None else None

    def control(self, stream: str, op: str, *, offset: int = -1, partition: int = -1) -> bool:
        """Apply a control to one stream's state, in order with its ticks: ``reset``
        zeroes it, ``delete`` frees it (see ``control``). ``offset`` and ``partition``
        are the control's input position, for the skip rule: False where the state
        already reflects it (nothing changed)."""
        if self.store.cold is not None and stream not in self.store:  # in the cold tier?
            part = partition if offset >= 0 else -1
            self._thawed(*self.store.thaw([stream], [part], np.zeros(0, dtype=np.int64)))
        applied = apply_control(self.store, stream, op, offset=offset, partition=partition)
        self._counts[f"control_{op}"] += applied
        return applied

    def swap_model(self, bundle: Bundle, *, mode: str) -> int:
        """Serve ``bundle`` from the next step on; returns how many streams it holds.

        ``mode`` (``SWAP_MODES``) says what each held stream's state becomes:
        ``carry``, it continues as it is (the new model must have the same cell and
        layer sizes); ``rewarm``, the new model run from zero state over the
        stream's held ticks (its last ``history_ticks``, in one batched step a
        round across streams: ``rewarm``); ``reset``, zero state and step 0 (not
        ready until the new model's warm-up). Every stream keeps its input position
        (partition and offset: the skip rule holds across the swap), its last-seen
        time and its tick history, and what the store has not checkpointed yet
        stays marked; with ``carry`` and ``rewarm`` its step count goes on. Live
        quality history (and, but with ``carry``, the anomaly score's) starts
        again. The input width must not change: ticks in flight were made for it.
        Raises ``ConfigError`` (nothing changed) otherwise.
        """
        self._check_swap(bundle, mode)
        if mode == "rewarm" and not self.history_ticks:
            mode = "reset"  # no ticks to replay
        arrays = self.store.arrays()
        if mode != "carry":
            config = bundle.config
            arrays = arrays.zeroed(config.hidden_sizes, config.cell, keep_steps=mode == "rewarm")
        fresh = Engine(
            bundle,
            max_streams=self.store.max_streams,
            idle_ttl_s=self.store.idle_ttl_s,
            initial_capacity=max(len(arrays.ids), 1),
            clock=self._clock,
            native=self.native,
            max_clock_skew_s=self.max_clock_skew_s,
            quality=self._quality_config,
            history_ticks=self.history_ticks,
        )
        fresh.store.take_over(self.store, arrays)
        fresh.store.adopt_cold(self.store, mode)
        fresh.restart_quality(arrays.ids)
        if mode == "rewarm":
            fresh.rewarm(arrays.ids)
        self.bundle, self.store, self._step = fresh.bundle, fresh.store, fresh._step
        self._scoring, self._quality = fresh._scoring, fresh._quality
        self._outputs = fresh._outputs
        self._counts["model_swaps"] += 1
        return len(arrays.ids)

    def _check_swap(self, bundle: Bundle, mode: str) -> None:
        old = self.bundle.config
        if mode not in SWAP_MODES:
            raise ConfigError(f"mode: must be one of {', '.join(SWAP_MODES)}, got {mode!r}")
        if bundle.config.input_size != old.input_size:
            raise ConfigError(
                f"model: the new model takes {bundle.config.input_size} inputs, the served "
                f"one {old.input_size}; a model with other inputs needs a restart"
            )
        if mode == "carry" and not same_state_layout(old, bundle.config):
            raise ConfigError(
                f"model: cannot carry the states of a {old.cell.upper()} of layer sizes "
                f"{list(old.hidden_sizes)} into a {bundle.config.cell.upper()} of "
                f"{list(bundle.config.hidden_sizes)}; swap with rewarm or reset"
            )

    @property
    def history_ticks(self) -> int:
        """How many of each stream's last raw ticks are kept for a re-warm (0: none)."""
        return int(self.store.history.shape[1])

    def rewarm(self, stream_ids: Sequence[str]) -> None:
        """Each of these held streams' state: this model run from its current state (zero,
        as ``swap_model`` and a restore leave it) over the stream's held ticks, oldest
        first; one with none held starts again (step 0). Batched across streams: round r
        steps every stream whose r-th tick from the end of the ring is held
        (right-aligned, so K rounds of one step each)."""
        store, ticks = self.store, self.history_ticks
        slots = store.lookup(stream_ids)
        slots = slots[slots >= 0]
        if not ticks:
            return
        # A block of streams at a time through all K rounds: its state rows stay in cache.
        for start in range(0, slots.size, _REWARM_BLOCK):
            self._rewarm_block(slots[start : start + _REWARM_BLOCK], ticks)

    def _rewarm_block(self, slots: I64, ticks: int) -> None:
        store = self.store
        steps = store.steps[slots]
        first = steps - np.minimum(steps, ticks)  # each stream's oldest held tick, 0-based
        replayed = np.zeros(slots.size, dtype=np.int64)
        for r in range(ticks):
            number = steps - ticks + r
            rows = np.flatnonzero(number >= first)
            x = store.history[slots[rows], number[rows] % ticks]
            held = ~np.isnan(x).any(axis=1)  # NaN: a row that holds no tick
            if held.any():
                self._step(store.h, store.c, slots[rows[held]], self.bundle.scale_inputs(x[held]))
                replayed[rows[held]] += 1
        store.steps[slots[replayed == 0]] = 0  # nothing to replay: a reset
        store.changes.changed[slots] = True

    def restart_quality(self, stream_ids: Sequence[str]) -> None:
        """Start these streams' live quality history again (their forecasts so far
        are another model's: a state kept across a model change)."""
        if self._quality is not None:
            self.store.zero_extra_after(stream_ids, self.store.extra_kept)

    def worst_streams(self, k: int = 5) -> list[StreamError]:
        """The ``k`` held streams with the largest recent absolute error (the first
        tracked horizon's, exponentially weighted over each stream's own last ticks),
        worst first: which streams to look at, which no Prometheus label may name.
        Empty where the model's forecasts are not judged (``quality``)."""
        errors = self._quality.errors if self._quality is not None else None
        if errors is None or k < 1:
            return []
        slots, ids = self.store.held()
        steps = self.store.steps[slots]
        recent = errors.recent(self.store.extra, slots, steps)
        judged = np.flatnonzero(~np.isnan(recent[:, 0]))
        if judged.size > k:
            judged = judged[np.argpartition(-recent[judged, 0], k - 1)[:k]]
        judged = judged[np.argsort(-recent[judged, 0], kind="stable")]
        return [
            StreamError(ids[i], float(recent[i, 0]), float(recent[i, 1]), int(steps[i]))
            for i in judged.tolist()
        ]

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            active_streams=len(self.store),
            capacity=self.store.capacity,
            max_streams=self.store.max_streams,
            ticks=self._counts["ticks"],
            rejected=self._counts["rejected"],
            resets=self._counts["resets"],
            ends=self._counts["ends"],
            evictions=dict(self.store.eviction_counts),
            native=self.native,
            skipped=self._counts["skipped"],
            quality=self.quality,
            cold=None if self.store.cold is None else self.store.cold.stats(),
        )

    def step(
        self,
        stream_ids: Sequence[str],
        features: npt.ArrayLike | Sequence[Sequence[Any]],
        *,
        resets: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
        ends: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
        timestamps: Sequence[float] | npt.NDArray[np.float64] | None = None,
        offsets: Sequence[int] | npt.NDArray[np.int64] | None = None,
        partitions: Sequence[int] | npt.NDArray[np.int64] | None = None,
        gaps: Sequence[str] = (),
    ) -> StepResult:
        """Apply N ticks: ``features [N, F]`` in original units, row i of ``stream_ids[i]``.

        ``resets[i]`` zeroes the stream's state before tick i; ``ends[i]``
        frees it after. ``timestamps`` are event times in epoch milliseconds
        (used for the idle TTL, see the class docstring); NaN marks a tick
        without one, an infinite one is rejected. ``offsets`` the input
        offsets the ticks came from, remembered with the state, and
        ``partitions`` their input partitions (all one partition when None).

        Skip rule (invariant 3): a tick whose offset is not above the offset
        its stream's state already reflects, from the same partition, is
        skipped: no state change, no answer, ``skipped[i]`` set and counted.
        After a restore from a checkpoint that already reflects some of the
        ticks read again, exactly those are skipped.

        ``gaps``: streams that lost a tick somewhere among this call's (refused
        before it came here); with the streams of rejected rows, no forecast of
        theirs made before or during the call is judged against a later truth
        (``quality``).
        """
        n = len(stream_ids)
        resets_a = bool_column("resets", resets, n)
        ends_a = bool_column("ends", ends, n)
        ts = column("timestamps", timestamps, n, np.float64)
        offs = column("offsets", offsets, n, np.int64)
        parts = column("partitions", partitions, n, np.int64)
        thawed = self._thaw(stream_ids, offs, parts) if self.store.cold is not None else []
        admitted = self._admit(stream_ids, features, ts, offs, parts)
        rows = admitted.rows
        if not rows.size:
            self._gaps_without_ticks(gaps, admitted.rejections, stream_ids)
            return self._answer(n, rows, None, admitted.rejections, thawed, admitted.skipped)
        self._counts["ticks"] += int(rows.size)
        order = Rounds(admitted.ids, admitted.held, admitted.distinct)
        times, now = self._event_time.times(ts, rows, order)
        # The streams' own last-seen times before acquire stamps them (see _record).
        held_u = admitted.held[order.first]
        seen_before = (held_u >= 0, self.store.last_seen[held_u])
        slots_u, evictions = self.store.acquire(order.unique, times[order.first], held_u)
        evictions = thawed + evictions
        r_resets, r_ends = resets_a[rows], ends_a[rows]
        self._counts["resets"] += int(r_resets.sum())
        self._counts["ends"] += int(r_ends.sum())
        raw = admitted.x[rows] if rows.size != n else admitted.x
        rounds, slots = order.rounds(), slots_u[order.inverse]
        gapped = self._gaps_before(gaps, admitted.rejections, stream_ids, order, slots_u)
        y, step_out = self._recur(rounds, slots, raw, r_resets, r_ends)
        finished = self.bundle.finish(y, raw)
        scores = flagged = None
        if self._scoring is not None:
            scores, flagged = self._scoring.rounds(
                self.store.extra, rounds, slots, step_out, raw, finished, r_resets, r_ends
            )
        if self._quality is not None:
            self._quality.rounds(
                self.store.extra, rounds, slots, step_out, raw, finished, r_resets, r_ends
            )
            if scores is not None:
                self._quality.scored(scores, flagged)
            if gapped.size:
                self._quality.mark_gaps(self.store.extra, gapped, self.store.steps[gapped])
        self._record(order, slots_u, times, seen_before, offs, parts, rows)
        self._remember(slots_u, order.last, finished, scores)
        if r_ends.any():
            ended = [order.unique[u] for u in np.flatnonzero(r_ends[order.last]).tolist()]
            self.store.release(ended)
        evictions += self._sweep(now)
        return self._answer(
            n, rows, (finished, step_out, scores, flagged), admitted.rejections, evictions,
            admitted.skipped,
        )  # fmt: skip

    def _thaw(
        self, stream_ids: Sequence[str], offs: I64 | None, parts: I64 | None
    ) -> list[Eviction]:
        """Read this call's streams that memory does not hold back from the cold tier,
        before anything looks at their state (the skip rule needs their offsets): one
        batched read per input partition. A stream's partition is its ticks' where the
        store records it (offsets given), else -1, as ``record_step`` keeps it. The
        call's held streams are safe from the evictions that make room."""
        held = self.store.lookup(stream_ids)
        absent = held < 0
        if not absent.any():
            return []
        known = parts if offs is not None and parts is not None else None
        ids: dict[str, int] = {}
        for i in np.flatnonzero(absent).tolist():
            stream = stream_ids[i]
            if isinstance(stream, str) and stream not in ids:
                ids[stream] = -1 if known is None else int(known[i])
        return self._thawed(*self.store.thaw(list(ids), list(ids.values()), held[~absent]))

    def _thawed(self, evictions: list[Eviction], rewarm: list[str]) -> list[Eviction]:
        """After a read back from the cold tier: the states a ``rewarm`` swap left there
        re-warmed now, before their ticks (as the swap re-warmed those in memory)."""
        if rewarm:
            self.restart_quality(rewarm)
            self.rewarm(rewarm)
        return evictions

    def close(self) -> None:
        """Close the cold tier's stores (a no-op without one); the engine is not used after."""
        if self.store.cold is not None:
            self.store.cold.close()

    def _admit(
        self,
        stream_ids: Sequence[str],
        features: npt.ArrayLike | Sequence[Sequence[Any]],
        ts: F64 | None,
        offs: I64 | None,
        parts: I64 | None,
    ) -> _Admitted:
        """The ticks that go on to be stepped: valid ones (the rest are rejected one by
        one) that the skip rule does not skip."""
        held, all_distinct = self.store.locate(stream_ids)
        x, accepted, rejections = validate_ticks(stream_ids, features, ts, held, self._input_size)
        self._counts["rejected"] += len(rejections)
        skipped = self._already_applied(held, offs, parts)
        if skipped is not None:
            accepted &= ~skipped
            self._counts["skipped"] += int(skipped.sum())
        if not rejections and skipped is None:
            rows = np.arange(len(stream_ids))
            return _Admitted(rows, stream_ids, held, all_distinct, x, rejections, skipped)
        rows = np.flatnonzero(accepted)
        ids = [stream_ids[i] for i in rows.tolist()]
        # Rows dropped: repeats may have gone with them (None: Rounds finds out).
        return _Admitted(rows, ids, held[rows], all_distinct or None, x, rejections, skipped)

    def _recur(
        self, rounds: list[I64 | None], slots: I64, raw: F32, resets: Bools, ends: Bools
    ) -> tuple[F32, I64]:
        """The recurrent step and head, round by round (``Rounds.rounds``): each row's
        output ``[rows, O]`` and its stream's step count after it; ``slots`` holds each
        row's slot."""
        scaled = self.bundle.scale_inputs(raw)
        step_out = np.empty(slots.size, dtype=np.int64)
        # The head's outputs: one buffer where there are several rounds.
        y: F32 | None = (
            np.empty((slots.size, self._outputs), dtype=np.float32) if len(rounds) > 1 else None
        )
        any_reset, any_end = bool(resets.any()), bool(ends.any())
        for sel, member_slots in each_round(rounds, slots):
            if any_reset and resets[sel].any():
                self.store.zero(member_slots[resets[sel]], extra=False)
            out = self._step(self.store.h, self.store.c, member_slots, scaled[sel])
            if y is None:
                y = out.copy()  # may be a view of the step's buffer, which the next call reuses
            else:
                y[sel] = out
            step_out[sel] = self.store.count_steps(member_slots)
            self.store.record_ticks(member_slots, step_out[sel], raw[sel])
            if any_end and ends[sel].any():
                self.store.zero(member_slots[ends[sel]], extra=False)
        assert y is not None
        return y, step_out

    def _record(
        self,
        order: Rounds,
        slots_u: I64,
        times: F64,
        seen_before: tuple[Bools, F64],
        offs: I64 | None,
        parts: I64 | None,
        rows: I64,
    ) -> None:
        """What the call did to each stream besides h, c and its count, through the store
        (which marks each changed): when it was last seen, which offset it reflects."""
        was_held, prior = seen_before
        # A stream's own time never goes back: a late tick does not make it look idle.
        latest = order.per_stream_max(times)
        last = order.last
        self.store.record_step(
            slots_u,
            last_seen=np.where(was_held, np.fmax(prior, latest), latest),
            offsets=None if offs is None else offs[rows][last],
            partitions=None if offs is None or parts is None else parts[rows][last],
        )

    def _remember(self, slots_u: I64, last: I64, finished: F32, scores: F64 | None) -> None:
        """Each stream's last answer of the call, for ``inspect``."""
        answers = self.store.last_answer
        answers[slots_u, : self._outputs] = finished[last]
        answers[slots_u, self._outputs] = np.nan if scores is None else scores[last]

    def inspect(self, stream: str, *, include_state: bool = False) -> StreamView | None:
        """What the engine holds of ``stream`` now (None: not held); see ``StreamView``."""
        store = self.store
        slot = store.slot_of(stream)
        if slot is None:
            return None
        steps = int(store.steps[slot])
        answer = store.last_answer[slot]
        predicted = not np.isnan(answer[: self._outputs]).all()
        state = store.snapshot([stream])[stream] if include_state else None
        return StreamView(
            stream=stream,
            partition=int(store.partitions[slot]),
            steps=steps,
            offset=int(store.offsets[slot]),
            last_seen_s=float(store.last_seen[slot]),
            ready=steps > self.bundle.warmup_steps,
            model=self.bundle.model_id,
            prediction=tuple(answer[: self._outputs].tolist()) if predicted else None,
            score=None if np.isnan(answer[self._outputs]) else float(answer[self._outputs]),
            state=state,
        )

    def _gap_ids(
        self, gaps: Sequence[str], rejections: list[Rejection], stream_ids: Sequence[str]
    ) -> set[str]:
        """Streams with a hole among this call's ticks: named, or with a rejected row."""
        if self._quality is None or self._quality.errors is None:
            return set()
        ids = {stream_ids[r.index] for r in rejections}
        return {s for s in (*gaps, *ids) if isinstance(s, str)}

    def _gaps_before(
        self,
        gaps: Sequence[str],
        rejections: list[Rejection],
        stream_ids: Sequence[str],
        order: Rounds,
        slots_u: I64,
    ) -> I64:
        """Mark the streams with a hole in this call before it is stepped: none of this
        call's ticks is paired with a forecast made before them or during the call.
        Returns their slots (held ones), to be marked again once stepped."""
        wanted = self._gap_ids(gaps, rejections, stream_ids)
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        assert self._quality is not None
        ticks = np.bincount(order.inverse, minlength=len(order.unique))
        index = [u for u, s in enumerate(order.unique) if s in wanted]
        stepped = slots_u[index]
        self._quality.mark_gaps(self.store.extra, stepped, self.store.steps[stepped] + ticks[index])
        others = self.store.lookup(sorted(wanted - {order.unique[u] for u in index}))
        return np.concatenate([stepped, others[others >= 0]])

    def _gaps_without_ticks(
        self, gaps: Sequence[str], rejections: list[Rejection], stream_ids: Sequence[str]
    ) -> None:
        """``_gaps_before`` for a call with nothing to step."""
        wanted = self._gap_ids(gaps, rejections, stream_ids)
        if wanted:
            assert self._quality is not None
            slots = self.store.lookup(sorted(wanted))
            slots = slots[slots >= 0]
            self._quality.mark_gaps(self.store.extra, slots, self.store.steps[slots])

    def _already_applied(self, held: I64, offs: I64 | None, parts: I64 | None) -> Bools | None:
        """Ticks whose stream's state already reflects their offset (None: no such tick)."""
        if offs is None:
            return None
        known = held >= 0
        if not known.any():
            return None
        slots = held[known]
        state_offsets = self.store.offsets[slots]
        same = state_offsets >= 0
        if parts is not None:
            same &= self.store.partitions[slots] == parts[known]
        skipped = np.zeros(held.size, dtype=bool)
        skipped[known] = same & (offs[known] <= state_offsets)
        return skipped if skipped.any() else None

    def _answer(
        self,
        n: int,
        rows: I64,
        values: tuple[F32, I64, F64 | None, F64 | None] | None,
        rejections: list[Rejection],
        evictions: list[Eviction],
        skipped: Bools | None = None,
    ) -> StepResult:
        """The result of a call of ``n`` ticks whose accepted ``rows`` gave ``values``."""
        out_size = self.bundle.config.output_size
        if values is not None and rows.size == n:  # nothing rejected: no scatter
            finished, steps, scores, flagged = values
            if scores is None:
                scores = np.full(n, np.nan)
            ready = steps > self.bundle.warmup_steps
            return StepResult(
                finished,
                steps,
                ready,
                np.ones(n, dtype=bool),
                rejections,
                evictions,
                scores,
                threshold=self.bundle.outputs.threshold,
                flags=flagged,
            )
        predictions = np.full((n, out_size), np.nan, dtype=np.float32)
        steps = np.zeros(n, dtype=np.int64)
        all_scores = np.full(n, np.nan)
        all_flags = (
            None if self._scoring is None or self._scoring.flag is None else np.full(n, np.nan)
        )
        accepted = np.zeros(n, dtype=bool)
        accepted[rows] = True
        if values is not None:
            predictions[rows] = values[0]
            steps[rows] = values[1]
            if values[2] is not None:
                all_scores[rows] = values[2]
            if values[3] is not None and all_flags is not None:
                all_flags[rows] = values[3]
        ready = steps > self.bundle.warmup_steps
        return StepResult(
            predictions,
            steps,
            ready,
            accepted,
            rejections,
            evictions,
            all_scores,
            np.zeros(0, dtype=bool) if skipped is None else skipped,
            threshold=self.bundle.outputs.threshold,
            flags=all_flags,
        )

    # -- internals ----------------------------------------------------------

    def _sweep(self, now: float) -> list[Eviction]:
        ttl = self.store.idle_ttl_s
        if ttl is None or now != now:
            return []
        # The clock can drop once, when the first timestamps replace the wall clock.
        if self._swept_at <= now < self._next_sweep:
            return []
        # Sweeping is O(capacity); a few times per TTL keeps memory bounded.
        self._swept_at = now
        self._next_sweep = now + ttl / 4
        return self.store.expire(now) + self.store.expire_cold(now - ttl)

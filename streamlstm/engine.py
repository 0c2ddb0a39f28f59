"""The engine: many streams' ticks in, one batched recurrent step per round out.

A call to ``Engine.step`` takes N ticks of any number of streams. Ticks are
split into *rounds*: round r holds every stream's (r+1)-th tick of the call, so
a stream's ticks are applied in order while all streams of a round advance
together: one recurrent step of the model and its head over the round's
streams, their (h, c) rows updated in place in the store, through the C
kernels (``kernels.NativeStep``) or NumPy (``numpy_step.NumpyStep``). Rows
with bad values are rejected one by one; the rest proceed. No training
framework is imported: torch serves only as the oracle the tests compare with.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.batching import Rounds
from streamlstm.bundle import Bundle
from streamlstm.errors import ConfigError
from streamlstm.event_clock import EventClock
from streamlstm.kernels import NativeStep, native_available
from streamlstm.numpy_step import NumpyStep
from streamlstm.results import F32, F64, I64, Bools, EngineStats, Rejection, StepResult
from streamlstm.scoring import Scoring
from streamlstm.state import Eviction, StateStore
from streamlstm.tick_checks import column, flags, validate_ticks

__all__ = ["Engine", "EngineStats", "Rejection", "StepResult"]

logger = logging.getLogger(__name__)


class Engine:
    """Stateful, batched inference over many streams for one bundle.

    ``max_streams`` bounds memory (LRU eviction beyond it); ``idle_ttl_s``
    forgets streams idle for longer. ``native`` picks the C code (recurrent
    step and id -> slot map, ``True``), NumPy and a dict (``False``), or the
    C code where it is built (``None``).

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
        use_native = native_available() if native is None else native
        self.store = StateStore(
            bundle.config.hidden_sizes,
            max_streams=max_streams,
            idle_ttl_s=idle_ttl_s,
            initial_capacity=initial_capacity,
            extra_width=self._scoring.width if self._scoring else 0,
            native=use_native,
        )
        self._clock = clock
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
        """
        n = len(stream_ids)
        resets_a = flags("resets", resets, n)
        ends_a = flags("ends", ends, n)
        ts = column("timestamps", timestamps, n, np.float64)
        offs = column("offsets", offsets, n, np.int64)
        parts = column("partitions", partitions, n, np.int64)
        held, all_distinct = self.store.locate(stream_ids)
        # Whether the accepted ticks' streams are all held and distinct (None: Rounds finds out).
        distinct: bool | None = all_distinct
        x, accepted, rejections = validate_ticks(stream_ids, features, ts, held, self._input_size)
        self._counts["rejected"] += len(rejections)
        skipped = self._already_applied(held, offs, parts)
        if skipped is not None:
            accepted &= ~skipped
            self._counts["skipped"] += int(skipped.sum())
        if rejections or skipped is not None:
            rows = np.flatnonzero(accepted)
            ids: Sequence[str] = [stream_ids[i] for i in rows.tolist()]
            held = held[rows]
            distinct = all_distinct or None  # rows dropped: repeats may have gone with them
        else:
            rows = np.arange(n)
            ids = stream_ids
        if not rows.size:
            return self._answer(n, rows, None, rejections, [], skipped)
        self._counts["ticks"] += int(rows.size)

        order = Rounds(ids, held, distinct)
        times, now = self._event_time.times(ts, rows, order)
        held_u = held[order.first]
        was_held = held_u >= 0  # before acquire fills in the new streams' slots
        prior = self.store.last_seen[held_u]  # meaningful only where was_held
        slots_u, evictions = self.store.acquire(order.unique, times[order.first], held_u)
        slots = slots_u[order.inverse]
        r_resets = resets_a[rows]
        r_ends = ends_a[rows]
        any_reset, any_end = bool(r_resets.any()), bool(r_ends.any())
        if any_reset:
            self._counts["resets"] += int(r_resets.sum())
        if any_end:
            self._counts["ends"] += int(r_ends.sum())

        raw = x[rows] if rows.size != n else x
        scaled = self.bundle.scale_inputs(raw)
        step_out = np.empty(rows.size, dtype=np.int64)
        rounds = order.rounds()
        steps = self.store.steps
        # Each round's outputs: the head's.
        y: F32 | None = (
            np.empty((rows.size, self._outputs), dtype=np.float32) if len(rounds) > 1 else None
        )
        for members in rounds:
            member_slots = slots if members is None else slots[members]
            sel: Any = slice(None) if members is None else members
            if any_reset:
                reset_here = r_resets[sel]
                if reset_here.any():
                    self.store.zero(member_slots[reset_here], extra=False)
            out = self._step(self.store.h, self.store.c, member_slots, scaled[sel])
            if y is None:
                y = out.copy()  # may be a view of the step's buffer, which the next call reuses
            else:
                y[sel] = out
            counted = steps[member_slots] + 1
            steps[member_slots] = counted
            step_out[sel] = counted
            if any_end:
                end_here = r_ends[sel]
                if end_here.any():
                    self.store.zero(member_slots[end_here], extra=False)
        assert y is not None
        finished = self.bundle.finish(y, raw)
        scores = flagged = None
        if self._scoring is not None:
            scores, flagged = self._scoring.rounds(
                self.store.extra, rounds, slots, step_out, raw, finished, r_resets, r_ends
            )

        last = order.last
        # A stream's own time never goes back: a late tick does not make it look idle.
        latest = order.per_stream_max(times)
        self.store.last_seen[slots_u] = np.where(was_held, np.fmax(prior, latest), latest)
        self.store.mark_changed(slots_u)
        if offs is not None:
            self.store.offsets[slots_u] = offs[rows][last]
            self.store.partitions[slots_u] = -1 if parts is None else parts[rows][last]
        if any_end:
            ended = [order.unique[u] for u in np.flatnonzero(r_ends[last]).tolist()]
            if ended:
                self.store.release(ended)
        evictions += self._sweep(now)
        return self._answer(
            n, rows, (finished, step_out, scores, flagged), rejections, evictions, skipped
        )

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
        return self.store.expire(now)

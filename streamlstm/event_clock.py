"""The engine's clock for idle expiry: event time as the streams agree on it.

One bad timestamp must not age or evict other streams, and ticks without
one must not collapse other streams' event time (see ``Engine`` for the
rule in full):

- a tick's time is its timestamp, capped at the wall clock plus
  ``max_clock_skew_s``; a tick without one (NaN) is stamped with this clock;
- the clock never goes back; it moves at once to the second-latest time
  among distinct streams, and to the latest only when that comes from a tick
  of this call, is at most the idle TTL ahead and not ahead of the wall
  clock; a later time only one stream claims waits for a second stream;
- until the streams first agree on a time nothing expires; without any
  timestamps it is the wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from streamlstm.batching import Rounds
from streamlstm.results import I64

__all__ = ["EventClock"]


class EventClock:
    """``times(ts, rows, order)`` per call: each tick's time, and the clock after it."""

    def __init__(
        self,
        wall: Callable[[], float],
        *,
        max_clock_skew_s: float,
        ttl: Callable[[], float | None],
    ) -> None:
        self._clock = wall
        self._max_skew_s = max_clock_skew_s
        self._ttl = ttl
        #: Event time the streams agree on (seconds); -inf until they first do.
        self._event_clock = -math.inf
        #: The latest time only one stream has claimed, waiting for a second one.
        self._claim: tuple[str, float] | None = None
        self._event_seen = False

    @property
    def now_s(self) -> float:
        """The event clock once streams agree on one; the wall clock while no tick
        has carried a timestamp; NaN between the two."""
        if self._event_clock > -math.inf:
            return self._event_clock
        return math.nan if self._event_seen else float(self._clock())

    def times(
        self, ts: npt.NDArray[np.float64] | None, rows: I64, order: Rounds
    ) -> tuple[npt.NDArray[np.float64], float]:
        """Each accepted tick's time (seconds), after moving the clock; and the clock.

        ``rows`` are the accepted ticks (their timestamps are finite, or NaN for none).
        """
        wall = float(self._clock())
        times = np.full(rows.size, np.nan) if ts is None else ts[rows] / 1000.0
        has = ~np.isnan(times)
        if has.any():
            self._event_seen = True
            np.minimum(times, wall + self._max_skew_s, out=times)
            self._advance(order, np.where(has, times, -np.inf), wall)
        if self._event_clock > -math.inf:
            now = self._event_clock
        else:  # no agreed event time (yet): stamp with the wall clock, sweep only on it
            now = math.nan if self._event_seen else wall
        times[~has] = wall if now != now else now
        return times, now

    def _advance(self, order: Rounds, times: npt.NDArray[np.float64], wall: float) -> None:
        """Move the event clock by the rule in the class docstring (``times``: -inf = none)."""
        per_stream = order.per_stream_max(times)
        in_call: dict[str, float] = {}
        for _ in range(2):  # the two latest streams of this call
            i = int(np.argmax(per_stream))
            if per_stream[i] == -math.inf:
                break
            in_call[order.unique[i]] = float(per_stream[i])
            per_stream[i] = -math.inf
        best = dict(in_call)
        if self._claim is not None:
            stream, t = self._claim
            best[stream] = max(t, best.get(stream, -math.inf))
        ranked = sorted(best.items(), key=lambda item: item[1], reverse=True)
        clock = self._event_clock
        if len(ranked) > 1:
            clock = max(clock, ranked[1][1])
        first, t1 = ranked[0]
        ttl = self._ttl()
        span = math.inf if ttl is None else ttl
        # A lone stream moves the clock only with a tick of this call (a waiting
        # claim does not become true because the wall clock has caught up).
        alone_ok = in_call.get(first) == t1 and t1 <= wall
        if alone_ok and clock > -math.inf and t1 - clock <= span:
            clock = max(clock, t1)
            self._claim = None
        elif t1 > clock:
            self._claim = (first, t1)
        else:
            self._claim = None
        self._event_clock = clock

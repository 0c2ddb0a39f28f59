"""``--latency-target-ms``: how many records each poll asks for, from what the daemon measures.

Without a target every poll asks ``getmany`` for ``--max-records``: the
batches that give the most ticks a second, and the longest steps a tick can
wait behind. With one, ``BatchSizer`` picks each poll's ``max_records`` so
that the daemon-added latency (receipt of a poll to the acknowledgement of
its predictions) stays under the target while the load allows, and goes back
to ``--max-records`` when the daemon falls behind.

The model. A tick waits, at worst, behind the step of the poll before its
own (the engine answers in order, and the loop keeps one step running while
it sends the previous one), then its own step, then the encode, send and
acknowledgement of its outputs. With ``b`` seconds of step per record and
``c`` seconds of everything else, a poll of ``n`` records costs about::

    latency(n) = c + STEPS_WAITED * b * n

so the budget allows ``n = (HEADROOM * target - c) / (STEPS_WAITED * b)``.
``b`` comes from each step's duration over its records (the engine's own
figure); ``c`` from each acknowledged poll, as its latency less the model's
step part. Whatever the model leaves out (the parent's encoding, which also
grows with ``n``; waits for the broker) lands in ``c``, measured where the
daemon runs now, so the model is calibrated at its operating point. A step's
fixed cost is in ``b`` (seconds over records): small batches cost more a
record, which the sizing then sees.

Both estimates are asymmetric moving averages, quick to rise and slow to
fall: the target is a tail (p99), so a slow step counts at once and a run of
fast ones only slowly; noise then moves the size a little, never to and fro.

The queue. ``getmany`` returns what the consumer has fetched, up to the size
asked: a poll that comes back full means ticks are waiting, and waiting
ticks count in their end-to-end latency though not in the daemon-added one.
Each full poll doubles the size (up to ``--max-records``: behind, the
largest batches catch up fastest, and a backlog keeps every poll full, so
the size stays there); each poll that is not full takes a share of that
growth back, until the budget's size rules again. Shrinking a step at a
time rather than at once keeps a size that only just caught up from
falling straight back behind; under a load the budget's size cannot keep up
with, the size hovers just above the smallest one that does. The size never
goes below ``FLOOR`` records (a step's fixed cost would dominate) or above
``--max-records``.

Pure and synchronous: no I/O and no clock; the loop passes in what it
measured (``loop.py``).
"""

from __future__ import annotations

__all__ = ["FLOOR", "BatchSizer"]

#: The smallest poll asked for (or ``max_records`` where that is smaller).
FLOOR = 16
#: Steps a tick may wait through: the previous poll's (still running) and its own.
STEPS_WAITED = 2.0
#: The share of the target the model sizes for: the rest is margin for what the
#: envelopes below miss (a preempted step on a shared machine, a collection).
HEADROOM = 0.8
#: Moving-average weights of a measurement above the estimate, and below it: ten to
#: one, so the estimates sit near the top of what they measure (a slow step weighs
#: ten fast ones), and a single measurement moves them by a tenth at most.
RISE = 0.1
FALL = 0.01
#: Each full poll multiplies the size by this.
GROWTH = 2.0
#: Each poll that is not full takes back this share of what full polls grew.
SETTLE = 0.1


def _envelope(estimate: float | None, value: float) -> float:
    """An average that rises quickly and falls slowly (tracks a high percentile)."""
    if estimate is None:
        return value
    weight = RISE if value > estimate else FALL
    return estimate + weight * (value - estimate)


class BatchSizer:
    """The ``max_records`` of the next poll (``limit``), from a latency target in seconds.

    Feed it, in any order, as the measurements come: ``stepped`` per engine
    step, ``acknowledged`` per acknowledged poll, ``polled`` per ``getmany``.
    """

    def __init__(self, target_s: float, max_records: int) -> None:
        if target_s <= 0 or max_records < 1:
            raise ValueError("target_s must be positive and max_records at least 1")
        self.target_s = target_s
        self.ceiling = max_records
        self.floor = min(FLOOR, max_records)
        #: Step seconds per record, and the rest of a poll's latency (seconds); None
        #: until measured.
        self.per_record_s: float | None = None
        self.overhead_s: float | None = None
        #: The size full polls asked for, shrinking as polls come back short of full.
        #: At the ceiling to start with: at start-up the topic usually holds a backlog.
        self._grown = float(max_records)

    @property
    def limit(self) -> int:
        """``max_records`` for the next ``getmany``."""
        return max(self.budget_records(), self._clamp(self._grown))

    def budget_records(self) -> int:
        """The largest poll the model expects to stay within the target (clamped)."""
        if self.per_record_s is None or self.per_record_s <= 0:
            return self.ceiling
        spare = HEADROOM * self.target_s - (self.overhead_s or 0.0)
        return self._clamp(spare / (STEPS_WAITED * self.per_record_s))

    def stepped(self, records: int, seconds: float) -> None:
        """An engine step of ``records`` records took ``seconds``."""
        if records > 0 and seconds > 0:
            self.per_record_s = _envelope(self.per_record_s, seconds / records)

    def acknowledged(self, records: int, latency_s: float) -> None:
        """A poll of ``records`` records was acknowledged ``latency_s`` after its receipt."""
        if records <= 0 or self.per_record_s is None:
            return  # the step part is not known yet: nothing to subtract
        rest = latency_s - STEPS_WAITED * self.per_record_s * records
        self.overhead_s = _envelope(self.overhead_s, max(rest, 0.0))

    def polled(self, returned: int, asked: int) -> None:
        """A ``getmany(max_records=asked)`` returned ``returned`` records."""
        if returned >= asked:
            # Full: ticks are waiting in the consumer. Grow from the size asked.
            self._grown = min(asked * GROWTH, float(self.ceiling))
        else:
            # Caught up. Below the floor it would only stop mattering later.
            self._grown = max(self._grown * (1.0 - SETTLE), float(self.floor))

    def _clamp(self, records: float) -> int:
        return int(min(max(records, self.floor), self.ceiling))

"""``BatchSizer``: the poll size ``--latency-target-ms`` chooses, fed measurements by hand."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm.consumers.batch_sizing import FLOOR, HEADROOM, STEPS_WAITED, BatchSizer

#: A step: a fixed cost and a cost per record (seconds), about the bench model's.
FIXED_S = 0.0005
PER_RECORD_S = 6.5e-6


def _settle(sizer: BatchSizer, polls: int, *, overhead_s: float = 0.002) -> list[int]:
    """``polls`` polls that come back half full, each stepped and acknowledged; the limits."""
    limits = []
    for _ in range(polls):
        asked = sizer.limit
        returned = asked // 2
        sizer.polled(returned, asked)
        step = FIXED_S + PER_RECORD_S * returned
        sizer.stepped(returned, step)
        sizer.acknowledged(returned, overhead_s + STEPS_WAITED * step)
        limits.append(sizer.limit)
    return limits


def test_without_measurements_it_asks_for_max_records() -> None:
    sizer = BatchSizer(0.010, 1024)
    assert sizer.limit == 1024 == sizer.budget_records()
    sizer.polled(3, 1024)  # nothing known of the steps: no reason to shrink
    assert sizer.limit == 1024


def test_it_shrinks_to_what_the_budget_allows() -> None:
    target_s = 0.010
    sizer = BatchSizer(target_s, 1024)
    limits = _settle(sizer, 300)
    # Far below the ceiling, and a poll of that size is modelled within the target.
    n = limits[-1]
    assert FLOOR < n < 600
    assert sizer.per_record_s is not None and sizer.overhead_s is not None
    modelled = sizer.overhead_s + STEPS_WAITED * sizer.per_record_s * n
    assert modelled <= HEADROOM * target_s * 1.01
    # A looser target allows larger polls.
    loose = BatchSizer(2 * target_s, 1024)
    assert _settle(loose, 300)[-1] > n


def test_a_slow_step_counts_at_once_and_fast_ones_slowly() -> None:
    sizer = BatchSizer(0.010, 1024)
    before = _settle(sizer, 300)[-1]
    sizer.stepped(100, (FIXED_S + 100 * PER_RECORD_S) * 10)  # preempted: ten times as slow
    sizer.polled(0, sizer.limit)
    after = sizer.limit
    assert after < 0.6 * before  # the very next poll is smaller
    # Ten ordinary steps undo only a little of it.
    for _ in range(10):
        sizer.stepped(100, FIXED_S + 100 * PER_RECORD_S)
        sizer.polled(0, sizer.limit)
    assert sizer.limit < 0.75 * before


def test_full_polls_grow_it_to_max_records_and_keep_it_there() -> None:
    sizer = BatchSizer(0.010, 1024)
    small = _settle(sizer, 300)[-1]
    sizer.polled(small, small)  # full: ticks are waiting
    assert sizer.limit >= min(2 * small, 1024)
    for _ in range(10):
        sizer.polled(sizer.limit, sizer.limit)
    assert sizer.limit == 1024
    sizer.stepped(1024, FIXED_S + 1024 * PER_RECORD_S)
    sizer.polled(1024, 1024)
    assert sizer.limit == 1024  # behind: the largest batches, whatever the budget says


def test_caught_up_it_settles_back_a_fraction_at_a_time() -> None:
    sizer = BatchSizer(0.010, 1024)
    small = _settle(sizer, 300)[-1]
    for _ in range(10):
        sizer.polled(sizer.limit, sizer.limit)
    assert sizer.limit == 1024
    sizer.polled(10, 1024)
    assert 900 < sizer.limit < 1024  # not straight back down (it would be full again)
    for _ in range(200):
        sizer.polled(10, sizer.limit)
    assert sizer.limit <= small + 1


@pytest.mark.parametrize("max_records", [1024, 8])
def test_never_below_the_floor_nor_above_max_records(max_records: int) -> None:
    slow = BatchSizer(0.001, max_records)
    for _ in range(50):
        slow.stepped(16, 0.1)  # every record alone would blow the target
        slow.acknowledged(16, 5.0)
        slow.polled(1, slow.limit)
    assert slow.limit == min(FLOOR, max_records)
    fast = BatchSizer(10.0, max_records)
    for _ in range(50):
        fast.stepped(max_records, 1e-6)
        fast.acknowledged(max_records, 1e-5)
        fast.polled(1, fast.limit)
        fast.polled(fast.limit, fast.limit)
    assert fast.limit == max_records


def test_stable_under_noisy_steps() -> None:
    rng = np.random.default_rng(0)
    sizer = BatchSizer(0.015, 1024)
    limits = []
    for _ in range(2000):
        asked = sizer.limit
        returned = int(asked * rng.uniform(0.3, 0.9))
        sizer.polled(returned, asked)
        # Step and acknowledgement times each vary by about 30% (lognormal).
        step = (FIXED_S + PER_RECORD_S * returned) * rng.lognormal(0.0, 0.3)
        sizer.stepped(returned, step)
        sizer.acknowledged(returned, 0.002 * rng.lognormal(0.0, 0.3) + STEPS_WAITED * step)
        limits.append(sizer.limit)
    settled = np.array(limits[500:])
    assert settled.min() >= FLOOR and settled.max() < 1024
    low, high = np.percentile(settled, [1, 99])
    assert high <= 1.5 * low, (low, high)
    # Poll to poll it moves by a few percent, never to and fro.
    assert np.percentile(np.abs(np.diff(settled)) / settled[:-1], 99) < 0.1


def _simulate(rate: float, target_s: float, polls: int = 3000) -> tuple[list[int], list[float]]:
    """An engine-bound daemon fed ``rate`` ticks/s: the limits, and the queue after each poll."""
    sizer = BatchSizer(target_s, 1024)
    queue, previous = 0.0, 0.0
    limits, queues = [], []
    for _ in range(polls):
        asked = sizer.limit
        returned = int(min(queue, asked))
        sizer.polled(returned, asked)
        step = FIXED_S + PER_RECORD_S * returned
        if returned:
            sizer.stepped(returned, step)
            sizer.acknowledged(returned, 0.002 + previous + step)  # behind the last step
        previous = step
        # A poll cycle lasts a step: the ticks that arrive meanwhile wait for the next.
        queue += rate * step - returned
        limits.append(asked)
        queues.append(queue)
    return limits, queues


def test_under_a_light_load_it_keeps_to_the_budget() -> None:
    limits, queues = _simulate(rate=60_000, target_s=0.010)
    n = max(limits[500:])
    assert n < 1024
    assert 0.002 + STEPS_WAITED * (FIXED_S + PER_RECORD_S * n) <= 0.010
    assert max(queues[500:]) <= n  # each poll takes what is waiting


def test_under_a_heavier_load_it_keeps_up_with_larger_batches() -> None:
    light, _ = _simulate(rate=60_000, target_s=0.010)
    # 130k ticks/s: more than polls of the budget's size can step (384 a poll: 128k/s), less
    # than polls of max_records (143k/s).
    limits, queues = _simulate(rate=130_000, target_s=0.010)
    assert max(queues) < 3 * 1024  # the queue stays bounded: it keeps up
    # Just above the smallest size that keeps up (420), below the ceiling.
    assert max(light[500:]) < 420 < np.mean(limits[500:]) < 1024


def test_behind_it_polls_max_records() -> None:
    # 150k ticks/s: more than even polls of max_records can step.
    limits, _ = _simulate(rate=150_000, target_s=0.010, polls=1000)
    assert set(limits[20:]) == {1024}

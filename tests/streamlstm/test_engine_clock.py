"""The engine's clock: one bad timestamp cannot age or evict other streams.

The idle TTL runs on event time. A tick's time is capped at the wall clock
plus ``max_clock_skew_s``; a lone stream cannot move the clock past the wall
clock or further than the TTL in one jump (another stream must agree); ticks
without a timestamp are stamped with the engine's clock, not the wall clock.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlstm import Engine
from tests.conftest import BundleFactory

WALL_S = 1_764_000_000.0  # the injected wall clock, seconds
WALL_MS = WALL_S * 1000.0
TTL = 3600.0


class Wall:
    def __init__(self, now: float = WALL_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _x(n: int) -> np.ndarray:
    return np.ones((n, 2), np.float32)


def _engine(make_bundle: BundleFactory, wall: Wall, **kw: object) -> Engine:
    kw.setdefault("idle_ttl_s", TTL)
    return Engine(make_bundle(), max_streams=1000, clock=wall, **kw)  # type: ignore[arg-type]


def _live(engine: Engine, ids: list[str], t_ms: float) -> None:
    out = engine.step(ids, _x(len(ids)), timestamps=[t_ms] * len(ids))
    assert out.accepted.all() and not out.evictions


def _ages(engine: Engine, ids: list[str]) -> dict[str, float]:
    store = engine.store
    return {s: float(store.last_seen[store.slot_of(s)]) for s in ids}


BAD_TS_MS = [
    WALL_MS * 1_000_000,  # nanoseconds
    WALL_MS * 1_000,  # microseconds
    WALL_MS + 86_400_000 * 365,  # a year ahead
    1e300,
]


@pytest.mark.parametrize("bad", BAD_TS_MS)
def test_a_bad_timestamp_neither_evicts_nor_ages_live_streams(
    make_bundle: BundleFactory, bad: float
) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall)
    others = [f"s{i}" for i in range(5)]
    _live(engine, others, WALL_MS - 60_000)  # a minute ago
    clock = engine.clock_s
    seen = _ages(engine, others)
    out = engine.step(["x"], _x(1), timestamps=[bad])
    assert out.accepted.all() and not out.evictions
    assert engine.clock_s == clock  # not moved at all
    assert _ages(engine, others) == seen
    # x's own time is capped at the wall clock plus the skew allowance.
    assert _ages(engine, ["x"])["x"] == WALL_S + engine.max_clock_skew_s
    # An hour and a half later by the wall clock, the others tick on: none had expired.
    wall.now += 5400
    out = engine.step(others, _x(5), timestamps=[WALL_MS + 3_000_000] * 5)
    assert not out.evictions and out.steps.tolist() == [2] * 5


@pytest.mark.parametrize("bad", [*BAD_TS_MS, WALL_MS])  # now is also wrong in a replay
def test_a_bad_timestamp_does_not_evict_a_replay(make_bundle: BundleFactory, bad: float) -> None:
    # Replaying 2023 data in 2025: event time is years behind the wall clock.
    wall = Wall()
    engine = _engine(make_bundle, wall)
    replay_ms = 1_700_000_000_000.0
    others = [f"s{i}" for i in range(5)]
    _live(engine, others, replay_ms)
    out = engine.step(["x"], _x(1), timestamps=[bad])
    assert not out.evictions and engine.clock_s == replay_ms / 1000
    out = engine.step(others, _x(5), timestamps=[replay_ms + 60_000] * 5)
    assert not out.evictions and out.steps.tolist() == [2] * 5
    assert engine.clock_s == replay_ms / 1000 + 60


def test_the_same_bad_stream_again_and_again_does_not_move_the_clock(
    make_bundle: BundleFactory,
) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall)
    _live(engine, ["a", "b"], WALL_MS)
    for _ in range(50):
        wall.now += 1
        out = engine.step(["x"], _x(1), timestamps=[WALL_MS * 1e6])
        assert not out.evictions
    assert engine.clock_s == WALL_S


def test_a_jump_two_streams_agree_on_is_taken(make_bundle: BundleFactory) -> None:
    # A replay that resumes after a long gap: the streams that tick confirm the
    # new time, and the streams that stayed silent expire.
    wall = Wall()
    engine = _engine(make_bundle, wall)
    t0 = 1_700_000_000_000.0
    _live(engine, ["a", "b", "c"], t0)
    later = t0 + 2 * TTL * 1000
    out = engine.step(["a"], _x(1), timestamps=[later])
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("a", "ttl")]  # its own gap
    assert engine.clock_s == t0 / 1000  # a alone: not yet
    out = engine.step(["b"], _x(1), timestamps=[later + 1000])
    assert engine.clock_s == later / 1000 + 1  # confirmed by b
    assert "c" not in engine.store  # c was silent through the gap: swept
    assert ("c", "ttl") in [(e.stream_id, e.reason) for e in out.evictions]


def test_a_lone_stream_moves_the_clock_within_the_ttl(make_bundle: BundleFactory) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall, idle_ttl_s=10)
    _live(engine, ["a", "b"], WALL_MS - 60_000)
    engine.step(["a"], _x(1), timestamps=[WALL_MS - 51_000])
    assert engine.clock_s == WALL_S - 51
    out = engine.step(["a"], _x(1), timestamps=[WALL_MS - 45_000])
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("b", "ttl")]


def test_ticks_without_ts_take_the_engines_clock_not_the_wall(
    make_bundle: BundleFactory,
) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall)
    replay_ms = 1_700_000_000_000.0
    _live(engine, ["a", "b"], replay_ms)
    # A tick without event time, alone in its call, and beside stamped ticks (NaN = none).
    out = engine.step(["n"], _x(1))
    assert not out.evictions and out.accepted.all()
    out = engine.step(["m", "a"], _x(2), timestamps=[math.nan, replay_ms + 1000])
    assert not out.evictions and out.accepted.all()
    assert engine.clock_s == replay_ms / 1000 + 1
    assert _ages(engine, ["n", "m"]) == {"n": replay_ms / 1000, "m": replay_ms / 1000 + 1}
    # The stamped streams keep their state.
    out = engine.step(["a", "b"], _x(2), timestamps=[replay_ms + 2000] * 2)
    assert out.steps.tolist() == [3, 2] and not out.evictions


def test_streams_without_ts_expire_on_event_time_beside_stamped_ones(
    make_bundle: BundleFactory,
) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall, idle_ttl_s=10)
    t0 = 1_700_000_000_000.0
    _live(engine, ["a", "b"], t0)
    engine.step(["n"], _x(1))  # stamped t0
    for k in range(1, 4):
        engine.step(["a", "b"], _x(2), timestamps=[t0 + 5000 * k] * 2)
    assert "n" not in engine.store and engine.stats.evictions == {"ttl": 1}


def test_streams_without_ts_keep_working_with_ttl_on_the_wall_clock(
    make_bundle: BundleFactory,
) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall, idle_ttl_s=10)
    engine.step(["a", "b"], _x(2))
    wall.now += 6
    engine.step(["a"], _x(1), timestamps=[math.nan])
    wall.now += 6  # b idle 12 s, a 6 s
    out = engine.step(["a"], _x(1))
    assert [(e.stream_id, e.reason) for e in out.evictions] == [("b", "ttl")]
    assert out.steps.tolist() == [3]


def test_a_stream_stamped_in_the_past_keeps_its_own_time(make_bundle: BundleFactory) -> None:
    # A late (or seconds-stamped) tick does not make its own stream look idle.
    wall = Wall()
    engine = _engine(make_bundle, wall, idle_ttl_s=10)
    _live(engine, ["a", "b"], WALL_MS - 5000)
    out = engine.step(["a"], _x(1), timestamps=[WALL_S])  # seconds: 1970
    assert not out.evictions and engine.clock_s == WALL_S - 5
    out = engine.step(["a", "b"], _x(2), timestamps=[WALL_MS - 1000] * 2)
    assert not out.evictions and out.steps.tolist() == [3, 2]


def test_infinite_timestamps_are_rejected(make_bundle: BundleFactory) -> None:
    engine = _engine(make_bundle, Wall())
    out = engine.step(["a", "b", "c"], _x(3), timestamps=[math.inf, -math.inf, WALL_MS])
    assert out.accepted.tolist() == [False, False, True]
    assert {r.field for r in out.rejections} == {"ts"}


def test_clock_skew_is_a_parameter(make_bundle: BundleFactory) -> None:
    engine = _engine(make_bundle, Wall(), max_clock_skew_s=5)
    engine.step(["a"], _x(1), timestamps=[WALL_MS + 3_600_000])
    assert _ages(engine, ["a"])["a"] == WALL_S + 5
    with pytest.raises(ValueError, match="max_clock_skew_s"):
        _engine(make_bundle, Wall(), max_clock_skew_s=-1)


def test_one_stream_twice_in_a_call_is_still_one_stream(make_bundle: BundleFactory) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall)
    _live(engine, ["a", "b"], WALL_MS - 60_000)
    out = engine.step(["x", "x"], _x(2), timestamps=[WALL_MS, WALL_MS * 1e6])
    assert out.steps.tolist() == [1, 2] and not out.evictions
    assert engine.clock_s == WALL_S - 60  # x's two ticks are one claim, not two


def test_a_new_streams_time_is_its_own(make_bundle: BundleFactory) -> None:
    wall = Wall()
    engine = Engine(make_bundle(), max_streams=10, idle_ttl_s=TTL, clock=wall, initial_capacity=2)
    _live(engine, ["a", "b"], WALL_MS)  # every slot taken, the last one at WALL_S
    engine.step(["c"], _x(1), timestamps=[WALL_MS - 100_000])
    assert _ages(engine, ["a", "b", "c"]) == {"a": WALL_S, "b": WALL_S, "c": WALL_S - 100}


def test_nothing_expires_before_the_streams_agree_on_a_time(make_bundle: BundleFactory) -> None:
    wall = Wall()
    engine = _engine(make_bundle, wall, idle_ttl_s=10)
    engine.step(["n"], _x(1))  # no timestamp: the wall clock
    out = engine.step(["x"], _x(1), timestamps=[WALL_MS * 1e6])  # one stream's claim
    assert math.isnan(engine.clock_s) and not out.evictions
    wall.now += 100
    out = engine.step(["m"], _x(1))  # stamped with the wall clock, sweeps nothing
    assert not out.evictions and set(engine.store.stream_ids()) == {"n", "x", "m"}
    # Two streams agree on a time: from then on the clock is event time.
    out = engine.step(["a", "b"], _x(2), timestamps=[WALL_MS + 50_000] * 2)
    assert engine.clock_s == WALL_S + 50
    # n idle 50 s on it; x's time was capped at the wall clock + 60 s, m's is the wall's.
    assert {e.stream_id for e in out.evictions} == {"n"}
    out = engine.step(["a", "b"], _x(2), timestamps=[WALL_MS + 58_000] * 2)
    assert not out.evictions and set(engine.store.stream_ids()) == {"x", "m", "a", "b"}

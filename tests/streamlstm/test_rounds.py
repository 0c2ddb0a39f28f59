"""``Rounds``: a call's ticks split into rounds of distinct streams, against a plain-Python
reference, whether the streams are told apart by their slots (all held) or by their ids."""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamlstm.batching import Rounds


def _reference(ids: list[str]) -> tuple[list[str], list[int], list[int], list[int], list[int]]:
    """unique (by first tick), inverse, occurrence number, first and last tick per stream."""
    unique: list[str] = []
    inverse: list[int] = []
    occurrence: list[int] = []
    seen: dict[str, int] = {}
    for stream in ids:
        if stream not in seen:
            seen[stream] = 0
            unique.append(stream)
        inverse.append(unique.index(stream))
        occurrence.append(seen[stream])
        seen[stream] += 1
    first = [ids.index(u) for u in unique]
    last = [len(ids) - 1 - ids[::-1].index(u) for u in unique]
    return unique, inverse, occurrence, first, last


@pytest.mark.parametrize("held", ["all", "some", "none"])
def test_rounds_match_the_reference(held: str) -> None:
    rnd = random.Random(held)
    for _ in range(500):
        kinds = rnd.randint(1, 40)
        ids = [f"s{rnd.randrange(kinds)}" for _ in range(rnd.randint(1, 60))]
        slot_of = dict(
            zip([f"s{i}" for i in range(kinds)], rnd.sample(range(5000), kinds), strict=True)
        )
        if held == "all":
            slots = [slot_of[s] for s in ids]
        elif held == "some":  # the streams of odd number are new
            slots = [-1 if int(s[1:]) % 2 else slot_of[s] for s in ids]
        else:
            slots = [-1] * len(ids)
        order = Rounds(ids, np.array(slots, dtype=np.int64))
        unique, inverse, occurrence, first, last = _reference(ids)
        assert list(order.unique) == unique
        assert order.inverse.tolist() == inverse
        assert order.first.tolist() == first
        assert order.last.tolist() == last
        if order.round_of is None:
            assert max(occurrence) == 0
            assert order.rounds() == [None]
        else:
            assert order.round_of.tolist() == occurrence
            rounds = order.rounds()
            assert len(rounds) == max(occurrence) + 1
            for r, members in enumerate(rounds):
                assert members is not None
                assert members.tolist() == [i for i, o in enumerate(occurrence) if o == r]


def test_a_caller_that_knows_the_slots_are_distinct_skips_the_check() -> None:
    ids = ["a", "b", "c"]
    order = Rounds(ids, np.array([4, 9, 1], dtype=np.int64), distinct=True)
    assert order.round_of is None and list(order.unique) == ids
    values = np.array([3.0, 1.0, 2.0])
    assert order.per_stream_max(values).tolist() == [3.0, 1.0, 2.0]


def test_no_ticks_make_no_rounds() -> None:
    for distinct in (None, False, True):
        order = Rounds([], np.zeros(0, dtype=np.int64), distinct)
        assert list(order.unique) == [] and order.first.size == 0 and order.round_of is None

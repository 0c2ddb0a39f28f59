"""The store's slot maps (C ``SlotMap`` and ``DictSlotMap``) against a plain dict."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from streamlstm.kernels import SlotMapping, slot_map

NOT_HELD: list[object] = [None, 3, 2.5, b"s1", ("s1",), ["s1"], {"s1": 1}, ""]


def _lookup(slots: SlotMapping, ids: list[object]) -> list[int]:
    return _located(slots, ids)[0]


def _located(slots: SlotMapping, ids: list[object]) -> tuple[list[int], bool]:
    out = np.full(len(ids), 12345, dtype=np.int64)
    distinct = slots.lookup(ids, out)
    return out.tolist(), distinct


@pytest.mark.parametrize("native", [True, False], ids=["C", "dict"])
def test_slot_map_agrees_with_a_dict_through_growth_and_deletions(native: bool) -> None:
    slots = slot_map(native)
    reference: dict[str, int] = {}
    rnd = random.Random(7)
    keys = [f"stream-{i}" for i in range(3000)]
    for op in range(60_000):
        key = rnd.choice(keys)
        # Copies of the text, not the same object: the map must compare text.
        probe = "".join(key)
        roll = rnd.random()
        if roll < 0.5:
            value = rnd.randrange(10**9)
            slots[key] = value
            reference[key] = value
        elif roll < 0.8:
            if key in reference:
                del slots[probe]
                del reference[key]
            else:
                with pytest.raises(KeyError):
                    del slots[probe]
        else:
            assert slots.get(probe) == reference.get(key)
            assert (probe in slots) == (key in reference)
        if op % 3000 == 0:
            batch = [rnd.choice(keys) for _ in range(500)]
            ids: list[object] = [*batch, *NOT_HELD, np.str_(batch[0])]
            want = [reference.get(k, -1) for k in batch] + [-1] * len(NOT_HELD)
            want.append(reference.get(batch[0], -1))
            assert _located(slots, ids) == (want, False)  # ids not held
            # Every id held and none twice, in a fresh order each time (so also
            # against the marks an earlier lookup left); then with one repeat.
            held: list[object] = [k for k in dict.fromkeys(batch) if k in reference]
            rnd.shuffle(held)
            assert _located(slots, held) == ([reference[str(k)] for k in held], bool(held))
            if held:
                twice = [*held, "".join(str(rnd.choice(held)))]
                assert _located(slots, twice)[1] is False
            assert len(slots) == len(reference)
    assert sorted((k, slots[k]) for k in reference) == sorted(reference.items())
    assert _lookup(slots, []) == []


def test_c_slot_map_holds_one_reference_per_key_and_releases_it() -> None:
    slots = slot_map(True)
    key = "".join(["held-", "key"])  # a fresh object, not an interned constant
    before = sys.getrefcount(key)
    slots[key] = 1
    slots[key] = 2  # an update takes no second reference
    assert sys.getrefcount(key) == before + 1
    for i in range(1000):  # resizes move the key, they do not copy it
        slots[f"other-{i}"] = i
    assert sys.getrefcount(key) == before + 1
    del slots[key]
    assert sys.getrefcount(key) == before
    assert key not in slots and slots.get(key) is None


def test_c_slot_map_rejects_what_is_not_a_str_key_or_a_slot() -> None:
    slots = slot_map(True)
    with pytest.raises(TypeError, match="keys are str, not int"):
        slots[3] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="values are slots"):
        slots["a"] = -1
    with pytest.raises(ValueError, match="values are slots"):
        slots["a"] = 2**31  # a bucket keeps 32 bits of slot
    slots["a"] = 2**31 - 1
    assert slots["a"] == 2**31 - 1
    slots[np.str_("sub")] = 4  # stored as the plain text
    assert slots["sub"] == 4 and slots.get(np.str_("sub")) == 4
    with pytest.raises(ValueError, match="out must be int64 with one item per id"):
        slots.lookup(["a"], np.empty(2, dtype=np.int64))
    with pytest.raises(ValueError, match="out must be int64 with one item per id"):
        slots.lookup(["a"], np.empty(1, dtype=np.int32))

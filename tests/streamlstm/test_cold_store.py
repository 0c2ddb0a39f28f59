"""The cold store on its own: real RocksDB directories under tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from streamlstm import StreamState
from streamlstm.cold_store import ColdStore
from streamlstm.cold_tier import ColdConfig, ColdTier
from streamlstm.errors import ConfigError, DependencyError


def _state(step: int) -> bytes:
    return StreamState(
        h=(np.full(4, step, np.float32),), c=(np.zeros(4, np.float32),), step=step, model="m"
    ).to_bytes()


def test_put_get_take_delete_and_count(tmp_path: Path) -> None:
    store = ColdStore.open(tmp_path, 3, max_disk_streams=100)
    assert store.path == tmp_path / "partition-3"
    assert store.put_many(["a", "b", "c"], [_state(1), _state(2), _state(3)], [1, 2, 3]) == {}
    assert store.count == 3
    assert store.get_many(["a", "x", "c"]) == {"a": _state(1), "c": _state(3)}
    assert store.take_many(["b", "y"]) == {"b": _state(2)}
    assert store.count == 2 and store.get_many(["b"]) == {}
    assert store.delete_many(["a", "b"]) == 1
    assert store.count == 1
    # Written again: replaced, not counted twice.
    store.put_many(["c"], [_state(7)], [7])
    assert store.count == 1 and store.get_many(["c"]) == {"c": _state(7)}
    store.close()


def test_disk_bound_pushes_out_the_oldest_written(tmp_path: Path) -> None:
    store = ColdStore.open(tmp_path, 0, max_disk_streams=3)
    store.put_many(["a", "b"], [_state(1), _state(2)], [1, 2])
    store.put_many(["c", "d", "e"], [_state(3), _state(4), _state(5)], [3, 4, 5])
    assert store.count == 3
    assert store.get_many(["a", "b", "c", "d", "e"]).keys() == {"c", "d", "e"}
    # c, d and e held: a fourth state pushes out c, the oldest written.
    pushed = store.put_many(["a"], [_state(9)], [9])
    assert pushed == {"c": _state(3)}
    assert store.counts.pushed_out == 3
    store.close()


def test_expire_forgets_states_last_seen_before(tmp_path: Path) -> None:
    store = ColdStore.open(tmp_path, 0, max_disk_streams=100)
    store.put_many(["a", "b", "c"], [_state(1), _state(2), _state(3)], [10.0, 20.0, 30.0])
    assert store.expire(20.0) == {"a": _state(1)}
    assert store.expire(31.0, limit=1) == {"b": _state(2)}
    assert store.count == 1 and store.counts.expired == 2
    store.close()


def test_kept_store_reopens_with_its_states_and_a_fresh_one_starts_empty(tmp_path: Path) -> None:
    store = ColdStore.open(tmp_path, 1, max_disk_streams=10)
    store.put_many(["a", "b"], [_state(1), _state(2)], [1, 2])
    store.close()
    kept = ColdStore.open(tmp_path, 1, max_disk_streams=10, keep=True)
    assert kept.count == 2 and kept.get_many(["b"]) == {"b": _state(2)}
    kept.close()
    fresh = ColdStore.open(tmp_path, 1, max_disk_streams=10)
    assert fresh.count == 0 and fresh.get_many(["a", "b"]) == {}
    fresh.close()


def test_one_directory_one_process(tmp_path: Path) -> None:
    store = ColdStore.open(tmp_path, 0, max_disk_streams=10)
    with pytest.raises(ConfigError, match="cannot open"):
        ColdStore.open(tmp_path, 0, max_disk_streams=10, keep=True)
    store.close()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="max_disk_streams"):
        ColdConfig(directory="x", max_disk_streams=0)
    with pytest.raises(TypeError):
        ColdConfig("x")  # type: ignore[call-arg]  # keyword-only


def test_without_the_extra_the_error_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rocksdict", None)  # import fails as if not installed
    with pytest.raises(DependencyError, match=r"streamlstm\[cold\]"):
        ColdTier(ColdConfig(directory=tmp_path))


def test_a_write_told_absent_that_was_not_keeps_the_newer_state(tmp_path: Path) -> None:
    """The engine's writes skip the read of what they replace: where that was wrong, the
    disk bound still pushes out states oldest first and never the newer copy."""
    store = ColdStore.open(tmp_path, 0, max_disk_streams=2)
    store.put_many(["a", "b"], [_state(1), _state(2)], [1, 2], absent=True)
    store.put_many(["a"], [_state(3)], [3], absent=True)  # wrongly told absent
    pushed = store.put_many(["c"], [_state(4)], [4], absent=True)
    assert pushed == {"b": _state(2)}  # a's first entry goes alone, its newer state stays
    assert store.get_many(["a", "b", "c"]) == {"a": _state(3), "c": _state(4)}

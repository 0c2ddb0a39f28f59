"""A model swap in the engine: carried states continue exactly under the new model (torch's
own modules as the oracle), reset ones start from zero, refusals change nothing, and what
was not checkpointed stays marked; the one rule a swap and a restore share."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm import Engine
from streamlstm.errors import ConfigError
from streamlstm.swap_policy import swap_mode
from tests.conftest import BundleFactory
from tests.streamlstm.oracle import carried_outputs

STREAMS = ["a", "b", "c", "d"]


def _ticks(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    ids = [str(s) for s in rng.choice(STREAMS, n)]
    return ids, rng.normal(size=(n, 2)).astype(np.float32) * 3


def _run(engine: Engine, ids: list[str], x: np.ndarray, batch: int = 7) -> np.ndarray:
    """The engine's answers to the ticks, fed in batches of ``batch``."""
    out = [
        engine.step(ids[i : i + batch], x[i : i + batch]).predictions
        for i in range(0, len(ids), batch)
    ]
    return np.concatenate(out)


def _per_stream(ids: list[str], x: np.ndarray, stream: str) -> np.ndarray:
    return x[[i for i, s in enumerate(ids) if s == stream]]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_carried_state_continues_exactly_under_the_new_model(
    make_bundle: BundleFactory, native: bool, cell: str
) -> None:
    old = make_bundle(scaled=True, seed=1, cell=cell)
    new = make_bundle(scaled=True, seed=2, cell=cell)
    rng = np.random.default_rng(5)
    ids1, x1 = _ticks(rng, 60)
    ids2, x2 = _ticks(rng, 60)
    engine = Engine(old, native=native)
    _run(engine, ids1, x1)
    assert engine.swap_model(new, mode="carry") == len(set(ids1))
    assert engine.bundle is new
    got = _run(engine, ids2, x2)
    for stream in STREAMS:
        mine = [i for i, s in enumerate(ids2) if s == stream]
        want = carried_outputs(
            old, new, _per_stream(ids1, x1, stream), _per_stream(ids2, x2, stream)
        )
        np.testing.assert_allclose(got[mine], want, atol=1e-5)
    steps = engine.inspect("a")
    assert steps is not None and steps.steps == ids1.count("a") + ids2.count("a")


def test_a_reset_swap_starts_every_stream_from_zero_but_keeps_its_position(
    make_bundle: BundleFactory,
) -> None:
    old = make_bundle(seed=1)
    new = make_bundle(seed=2, hidden_sizes=(8,), warmup_steps=3, cell="gru")
    engine = Engine(old)
    engine.step(["a", "b"], np.ones((2, 2)), offsets=[10, 11], partitions=[0, 0])
    assert engine.swap_model(new, mode="reset") == 2
    view = engine.inspect("a")
    assert view is not None and (view.steps, view.offset, view.ready) == (0, 10, False)
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    out = engine.step(["a"] * 5, x, offsets=list(range(12, 17)), partitions=[0] * 5)
    np.testing.assert_allclose(out.predictions, new.predict_sequence(x), atol=1e-5)
    assert out.steps.tolist() == [1, 2, 3, 4, 5]
    # The skip rule still holds across the swap: an offset the state reflects is skipped.
    again = engine.step(["b"], np.ones((1, 2)), offsets=[11], partitions=[0])
    assert again.skipped is not None and again.skipped.tolist() == [True]


def test_a_swap_that_cannot_be_made_changes_nothing(make_bundle: BundleFactory) -> None:
    old = make_bundle(seed=1)
    engine = Engine(old)
    x = np.ones((3, 2), np.float32)
    before = engine.step(["a"] * 3, x).predictions
    with pytest.raises(ConfigError, match="layer sizes"):
        engine.swap_model(make_bundle(seed=2, hidden_sizes=(4,)), mode="carry")
    with pytest.raises(ConfigError, match="into a GRU"):
        engine.swap_model(make_bundle(seed=2, cell="gru"), mode="carry")
    with pytest.raises(ConfigError, match="inputs"):
        engine.swap_model(make_bundle(seed=2, input_size=3), mode="reset")
    assert engine.bundle is old
    np.testing.assert_allclose(
        engine.step(["a"], x[:1]).predictions, old.predict_sequence(np.ones((4, 2)))[3:], atol=1e-5
    )
    assert before.shape == (3, 2)


def test_what_was_not_checkpointed_before_a_swap_is_still_marked(
    make_bundle: BundleFactory,
) -> None:
    engine = Engine(make_bundle(seed=1))
    engine.store.changes.tombstones = True
    engine.step(["a", "b"], np.ones((2, 2)), offsets=[1, 2], partitions=[0, 1])
    engine.store.take_changes()
    engine.step(["b", "c"], np.ones((2, 2)), ends=[False, True], offsets=[3, 4], partitions=[1, 1])
    engine.swap_model(make_bundle(seed=2), mode="carry")
    changed, partitions, removed = engine.store.take_changes()
    assert (changed, partitions, removed) == (["b"], [1], {"c": 1})


def test_the_rule_a_swap_and_a_restore_share() -> None:
    a1, a2, b = "prices@1111", "prices@2222", "volumes@3333"

    def mode(policy: str, made_by: str, to: str, compatible: bool = True) -> str:
        return swap_mode(policy, made_by=made_by, model_id=to, compatible=compatible)

    assert mode("auto", a1, a2) == "carry"  # a retrain: the same name
    assert mode("auto", a1, b) == "rewarm"
    assert mode("auto", a1, a2, compatible=False) == "rewarm"
    assert mode("carry", a1, b) == "carry"
    assert mode("carry", a1, b, compatible=False) == "rewarm"
    assert mode("rewarm", a1, a2) == "rewarm"
    assert mode("reset", a1, a2) == "reset"
    # The same model, or a state that names none (an older record), always goes on.
    assert mode("reset", a1, a1) == "carry"
    assert mode("reset", "", a1) == "carry"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_rewarm_runs_the_new_model_over_each_streams_last_ticks(
    make_bundle: BundleFactory, cell: str
) -> None:
    """After a re-warm swap each stream answers as the new model run from zero state over
    its last K ticks before the swap, then its ticks since (torch's own module)."""
    old = make_bundle(scaled=True, seed=1)
    new = make_bundle(scaled=True, seed=2, cell=cell, hidden_sizes=(8, 4))
    ticks = 5
    rng = np.random.default_rng(9)
    ids1, x1 = _ticks(rng, 40)
    ids1 += ["young"] * 2  # fewer ticks than the ring holds
    x1 = np.concatenate([x1, rng.normal(size=(2, 2)).astype(np.float32)])
    ids2, x2 = _ticks(rng, 40)
    ids2 += ["young"]
    x2 = np.concatenate([x2, rng.normal(size=(1, 2)).astype(np.float32)])
    engine = Engine(old, history_ticks=ticks)
    _run(engine, ids1, x1, batch=9)
    engine.swap_model(new, mode="rewarm")
    got = _run(engine, ids2, x2, batch=9)
    for stream in [*STREAMS, "young"]:
        before = _per_stream(ids1, x1, stream)[-ticks:]
        after = _per_stream(ids2, x2, stream)
        want = new.predict_sequence(np.concatenate([before, after]))[len(before) :]
        mine = [i for i, s in enumerate(ids2) if s == stream]
        np.testing.assert_allclose(got[mine], want, atol=1e-5, err_msg=stream)
        view = engine.inspect(stream)
        assert view is not None and view.steps == ids1.count(stream) + ids2.count(stream)


def test_a_rewarm_without_a_history_is_a_reset(make_bundle: BundleFactory) -> None:
    engine = Engine(make_bundle(seed=1))
    engine.step(["a"] * 3, np.ones((3, 2)))
    engine.swap_model(make_bundle(seed=2), mode="rewarm")
    view = engine.inspect("a")
    assert view is not None and view.steps == 0

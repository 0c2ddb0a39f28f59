"""A shadow model in the engine child, in process: its answers, its changelog keys, its
restore and its promotion, each against the oracle (``predict_sequence``)."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm import Bundle, Engine, StreamState
from streamlstm.consumers.engine.child import EngineHost
from streamlstm.consumers.engine.protocol import Change, SwapModel
from streamlstm.consumers.engine.shadow import SHADOW_PREFIX, shadow_key
from streamlstm.control import Control
from streamlstm.errors import StreamLSTMError
from tests.conftest import BundleFactory
from tests.helpers.engine_requests import step_request

STREAMS = ["a", "b", "c"]


def _models(make_bundle: BundleFactory) -> tuple[Bundle, Bundle]:
    served = make_bundle(input_size=2, output_size=1, hidden_sizes=(8, 6), seed=1)
    shadow = make_bundle(input_size=2, output_size=1, hidden_sizes=(5,), seed=2)
    return served, shadow


def _ticks(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [STREAMS[i] for i in rng.integers(0, len(STREAMS), n)]
    return ids, rng.normal(size=(n, 2)).astype(np.float32)


def _oracle(bundle: Bundle, ids: list[str], x: np.ndarray) -> np.ndarray:
    """Each tick's prediction: ``bundle`` over its stream's ticks so far, from zero state."""
    out = np.zeros((len(ids), 1), np.float32)
    for stream in set(ids):
        rows = [i for i, s in enumerate(ids) if s == stream]
        out[rows] = bundle.predict_sequence(x[rows])
    return out


def _run(
    host: EngineHost, ids: list[str], x: np.ndarray, first: int = 0, chunk: int = 7
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Step the ticks in polls of ``chunk``; the served and the shadow answers."""
    served: list[np.ndarray] = []
    shadow: list[np.ndarray | None] = []
    for start in range(0, len(ids), chunk):
        stop = min(start + chunk, len(ids))
        offsets = range(first + start, first + stop)
        reply = host.step(step_request(ids[start:stop], x[start:stop], offsets, part=2))
        served.append(reply.result.predictions)
        shadow.append(reply.shadow.predictions if reply.shadow is not None else None)
    return served, shadow


def _joined(parts: list[np.ndarray | None]) -> np.ndarray:
    assert all(p is not None for p in parts), "a poll without the shadow's answers"
    return np.concatenate([p for p in parts if p is not None])


def test_the_shadow_answers_the_same_ticks_from_its_own_states(
    make_bundle: BundleFactory,
) -> None:
    served, candidate = _models(make_bundle)
    host = EngineHost(Engine(served), shadow=Engine(candidate))
    ids, x = _ticks(60)
    got, shadow = _run(host, ids, x)
    np.testing.assert_allclose(np.concatenate(got), _oracle(served, ids, x), atol=1e-5)
    np.testing.assert_allclose(_joined(shadow), _oracle(candidate, ids, x), atol=1e-5)
    assert host.stats.shadow_model == candidate.model_id


def test_a_control_resets_the_stream_in_both_models(make_bundle: BundleFactory) -> None:
    served, candidate = _models(make_bundle)
    host = EngineHost(Engine(served), shadow=Engine(candidate))
    x = np.random.default_rng(3).normal(size=(6, 2)).astype(np.float32)
    reset = Control("a", "reset", partition=2, offset=3, before=3)
    offsets = [0, 1, 2, 4, 5, 6]  # the control is the record at offset 3
    reply = host.step(step_request(["a"] * 6, x, offsets, part=2, controls=[reset]))
    assert reply.controls_applied == (True,) and reply.shadow is not None
    for bundle, answers in ((served, reply.result), (candidate, reply.shadow)):
        want = np.concatenate([bundle.predict_sequence(x[:3]), bundle.predict_sequence(x[3:])])
        np.testing.assert_allclose(answers.predictions, want, atol=1e-5)


def _by_key(changes: list[Change]) -> dict[str, bytes | None]:
    return {key: value for key, _, value in changes}


def test_the_shadow_states_are_checkpointed_under_their_own_keys_and_restored_there(
    make_bundle: BundleFactory,
) -> None:
    served, candidate = _models(make_bundle)
    ids, x = _ticks(80, seed=1)
    first = EngineHost(Engine(served), shadow=Engine(candidate))
    _run(first, ids[:40], x[:40])
    records = _by_key(first.checkpoint())
    assert set(records) == {*STREAMS, *map(shadow_key, STREAMS)}
    for stream in STREAMS:
        assert StreamState.from_bytes(records[stream] or b"").model == served.model_id
        state = StreamState.from_bytes(records[shadow_key(stream)] or b"")
        assert state.model == candidate.model_id
    blobs = {k: v for k, v in records.items() if v is not None}
    second = EngineHost(Engine(served), shadow=Engine(candidate))
    report = second.restore(2, blobs, "reset")
    assert (report.loaded, report.reset_model_changed) == (3, 0)
    got, shadow = _run(second, ids[40:], x[40:], first=40)
    np.testing.assert_allclose(np.concatenate(got), _oracle(served, ids, x)[40:], atol=1e-5)
    np.testing.assert_allclose(_joined(shadow), _oracle(candidate, ids, x)[40:], atol=1e-5)


def test_shadow_states_without_a_shadow_are_tombstoned_and_the_served_ones_go_on(
    make_bundle: BundleFactory,
) -> None:
    served, candidate = _models(make_bundle)
    ids, x = _ticks(40, seed=2)
    first = EngineHost(Engine(served), shadow=Engine(candidate))
    _run(first, ids[:20], x[:20])
    blobs = {k: v for k, v in _by_key(first.checkpoint()).items() if v is not None}
    alone = EngineHost(Engine(served))
    assert alone.restore(2, blobs, "reset").loaded == 3
    got, shadow = _run(alone, ids[20:], x[20:], first=20)
    assert shadow == [None] * len(shadow)
    np.testing.assert_allclose(np.concatenate(got), _oracle(served, ids, x)[20:], atol=1e-5)
    records = _by_key(alone.checkpoint())
    assert {k: v for k, v in records.items() if k.startswith(SHADOW_PREFIX)} == {
        shadow_key(s): None for s in STREAMS
    }


@pytest.mark.parametrize("mode", ["reset", "rewarm"])
def test_a_promotion_serves_the_shadow_states_with_no_warm_up(
    make_bundle: BundleFactory, mode: str
) -> None:
    served, candidate = _models(make_bundle)
    ids, x = _ticks(90, seed=4)
    host = EngineHost(Engine(served, history_ticks=8), shadow=Engine(candidate, history_ticks=8))
    # "z" is held by the served model alone (restored from its changelog): the shadow
    # never saw it, so it takes the swap's rule.
    z = np.random.default_rng(9).normal(size=(12, 2)).astype(np.float32)
    writer = EngineHost(Engine(served, history_ticks=8))
    writer.step(step_request(["z"] * 12, z, range(100, 112), part=2))
    host.restore(2, {k: v for k, v in _by_key(writer.checkpoint()).items() if v}, "reset")
    _run(host, ids[:50], x[:50])
    host.checkpoint()
    reply = host.swap_model(SwapModel("unused: the shadow is loaded", candidate.model_id, mode))
    assert (reply.model_id, reply.streams, reply.from_shadow) == (candidate.model_id, 4, 3)
    assert host.shadow is None and host.stats.shadow_model == ""
    # The next checkpoint moves every state to its served key, the shadow's keys go.
    records = _by_key(host.checkpoint())
    assert {k for k, v in records.items() if v is None} == {shadow_key(s) for s in STREAMS}
    for stream in [*STREAMS, "z"]:
        assert StreamState.from_bytes(records[stream] or b"").model == candidate.model_id
    got, shadow = _run(host, ids[50:], x[50:], first=50)
    assert shadow == [None] * len(shadow)
    # Every stream the shadow held goes on from its own state: as if it always served.
    np.testing.assert_allclose(np.concatenate(got), _oracle(candidate, ids, x)[50:], atol=1e-5)
    after = host.step(step_request(["z"], z[:1], [112], part=2)).result.predictions
    history = z[-8:] if mode == "rewarm" else z[:0]
    want = candidate.predict_sequence(np.concatenate([history, z[:1]]))[-1]
    np.testing.assert_allclose(after[0], want, atol=1e-5)


def test_a_promotion_lost_before_its_checkpoint_is_found_in_the_shadow_keys(
    make_bundle: BundleFactory,
) -> None:
    """A crash after the promotion, before the checkpoint that writes the shadow's states
    under the served keys: the restart serves the promoted model, and its states are
    the shadow records it made (not the old model's, which ``reset`` would drop)."""
    served, candidate = _models(make_bundle)
    ids, x = _ticks(60, seed=5)
    before = EngineHost(Engine(served), shadow=Engine(candidate))
    _run(before, ids[:30], x[:30])
    blobs = {k: v for k, v in _by_key(before.checkpoint()).items() if v is not None}
    restarted = EngineHost(Engine(candidate))
    report = restarted.restore(2, blobs, "reset")
    assert report.reset_model_changed == 3  # the old model's records
    got, _ = _run(restarted, ids[30:], x[30:], first=30)
    np.testing.assert_allclose(np.concatenate(got), _oracle(candidate, ids, x)[30:], atol=1e-5)
    records = _by_key(restarted.checkpoint())
    assert {k for k, v in records.items() if v is None} == {shadow_key(s) for s in STREAMS}


class _Broken(Engine):
    def step(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        raise StreamLSTMError("the candidate is broken")


def test_a_failing_shadow_is_stopped_and_the_served_model_goes_on(
    make_bundle: BundleFactory,
) -> None:
    served, candidate = _models(make_bundle)
    host = EngineHost(Engine(served), shadow=_Broken(candidate))
    ids, x = _ticks(20, seed=6)
    got, shadow = _run(host, ids, x)
    assert host.shadow is None and shadow == [None] * len(shadow)
    np.testing.assert_allclose(np.concatenate(got), _oracle(served, ids, x), atol=1e-5)


def test_a_revoked_partition_leaves_both_models_without_tombstones(
    make_bundle: BundleFactory,
) -> None:
    served, candidate = _models(make_bundle)
    host = EngineHost(Engine(served), shadow=Engine(candidate))
    ids, x = _ticks(30, seed=7)
    _run(host, ids, x)
    assert host.drop({2}) == len(STREAMS)
    assert host.shadow is not None and len(host.shadow.store) == len(host.engine.store) == 0
    assert host.checkpoint() == []  # the new owner restores both from the changelog

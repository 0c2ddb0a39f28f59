"""The anomaly score: an EW z-score of the forecast residual, per stream, in tick order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlstm import Bundle, ConfigError, Engine, ModelConfig, OutputSpec, StreamState


def _scored_bundle(horizon: int = 1, span: int = 10) -> Bundle:
    return Bundle.random(
        ModelConfig(input_size=2, hidden_sizes=(8,), head_sizes=(4,)),
        seed=3,
        outputs=OutputSpec(target_feature=1, horizon=horizon, score_span=span),
    )


def _reference(bundle: Bundle, x: np.ndarray, horizon: int, span: int) -> list[float]:
    """Scores of one stream, written out tick by tick from the definition."""
    forecasts = bundle.predict_sequence(x)[:, 0].astype(np.float64)
    alpha = 2 / (span + 1)
    mean = var = 0.0
    count = 0
    out = []
    for t in range(len(x)):
        if t < horizon:
            out.append(math.nan)
            continue
        residual = float(x[t, 1]) - forecasts[t - horizon]
        score = abs(residual - mean) / math.sqrt(var + 1e-12) if count >= 2 else math.nan
        out.append(score)
        if count == 0:
            mean, var = residual, 0.0
        else:
            delta = residual - mean
            mean += alpha * delta
            var = (1 - alpha) * (var + alpha * delta * delta)
        count += 1
    return out


@pytest.mark.parametrize("horizon", [1, 3])
def test_scores_match_the_definition_under_any_batching(horizon: int) -> None:
    bundle = _scored_bundle(horizon)
    rng = np.random.default_rng(horizon)
    streams = {f"s{k}": rng.normal(0, 1, (40, 2)).astype(np.float32) for k in range(4)}
    # A random interleaving that keeps each stream's ticks in order.
    labels = rng.permutation([s for s, x in streams.items() for _ in range(len(x))]).tolist()
    seen = dict.fromkeys(streams, 0)
    order = []
    for s in labels:
        order.append((s, seen[s]))
        seen[s] += 1
    got: dict[str, list[float]] = {s: [math.nan] * len(x) for s, x in streams.items()}
    engine = Engine(bundle)
    position = 0
    while position < len(order):
        cut = order[position : position + int(rng.integers(1, 17))]
        position += len(cut)
        result = engine.step([s for s, _ in cut], np.stack([streams[s][t] for s, t in cut]))
        for (s, t), score in zip(cut, result.scores.tolist(), strict=True):
            got[s][t] = score
    for s, x in streams.items():
        np.testing.assert_allclose(got[s], _reference(bundle, x, horizon, 10), rtol=1e-4, atol=1e-5)


def test_reset_restarts_the_score_and_restore_continues_it() -> None:
    bundle = _scored_bundle()
    x = np.random.default_rng(0).normal(0, 1, (30, 2)).astype(np.float32)
    engine = Engine(bundle)
    first = engine.step(["a"] * 20, x[:20]).scores
    assert np.isnan(first[:3]).all() and np.isfinite(first[3:]).all()
    saved = StreamState.from_bytes(engine.store.snapshot(["a"])["a"].to_bytes())
    rest = engine.step(["a"] * 10, x[20:]).scores
    other = Engine(bundle)
    other.store.restore({"a": saved})
    np.testing.assert_array_equal(other.step(["a"] * 10, x[20:]).scores, rest)
    again = engine.step(["a"] * 5, x[:5], resets=[True, False, False, False, False]).scores
    np.testing.assert_array_equal(again, first[:5])


def test_models_without_a_score_give_nan_and_bad_specs_are_refused() -> None:
    plain = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(8,)), seed=0)
    assert np.isnan(Engine(plain).step(["a", "b"], np.zeros((2, 2))).scores).all()
    with pytest.raises(ConfigError, match="target_feature"):
        OutputSpec(score_span=10)
    with pytest.raises(ConfigError, match="column 5 of 2 inputs"):
        Bundle.random(
            ModelConfig(input_size=2, hidden_sizes=(8,)),
            outputs=OutputSpec(target_feature=5, score_span=10),
        )

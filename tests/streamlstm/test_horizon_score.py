"""The multi-horizon anomaly score: each tick judged by all forecasts made for it,
per stream, in tick order, carried in the state store's extra columns; and the flag."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from streamlstm import Bundle, ConfigError, Engine, ModelConfig, OutputSpec, StreamState
from streamlstm.consumers.codec.wire import UNDEFINED, Undefined, encode_prediction
from streamlstm.quality import QualityConfig
from tests.helpers.scoring import HORIZONS, SCALE, horizon_scored_bundle

#: The score's columns alone (the live quality figures' would follow them).
NO_QUALITY = QualityConfig(enabled=False)


def _reference(
    bundle: Bundle,
    x: np.ndarray,
    span: int,
    first: int = 1,
    stages: int = 1,
    baseline: int | None = None,
) -> list[float]:
    """Scores of one stream, written out tick by tick from the definition: the
    raw score, ``stages`` EW means in a row (more than one: plus the raw score
    weighted ``2 / (span + 1)``), then (with a baseline) divided by
    the plain weighted mean of the smoothed values so far, weights ``(1 - b) ** age``."""
    forecasts = bundle.predict_sequence(x).astype(np.float64)  # [T, H]: t+1 .. t+H
    alpha = 2 / (span / stages + 1)
    means: list[float] = []
    smoothed: list[float] = []
    out = []
    for t in range(len(x)):
        if t < HORIZONS:  # a forecast made H ticks earlier does not exist yet
            out.append(math.nan)
            continue
        errors = [
            ((float(x[t, 1]) - forecasts[t - k, k - 1]) / SCALE[k - 1]) ** 2
            for k in range(first, HORIZONS + 1)
        ]
        value = raw = sum(errors) / len(errors)
        for k in range(stages):
            if len(means) < stages:
                means.append(value)
            else:
                means[k] += alpha * (value - means[k])
            value = means[k]
        if stages > 1:
            value += 2 / (span + 1) * raw
        smoothed.append(value)
        if baseline is not None:
            b = 2 / (baseline + 1)
            weights = [(1 - b) ** age for age in range(len(smoothed))][::-1]
            value /= sum(w * v for w, v in zip(weights, smoothed, strict=True)) / sum(weights)
        out.append(math.sqrt(value))
    return out


@pytest.mark.parametrize(
    ("first", "stages", "baseline"), [(1, 1, None), (3, 1, None), (1, 2, None), (3, 3, 9)]
)
def test_scores_match_the_definition_under_any_batching(
    first: int, stages: int, baseline: int | None
) -> None:
    bundle = horizon_scored_bundle(first=first, stages=stages, baseline=baseline)
    rng = np.random.default_rng(first)
    streams = {f"s{k}": rng.normal(0, 1, (40, 2)).astype(np.float32) for k in range(4)}
    labels = rng.permutation([s for s, x in streams.items() for _ in range(len(x))]).tolist()
    seen = dict.fromkeys(streams, 0)
    order = []
    for s in labels:
        order.append((s, seen[s]))
        seen[s] += 1
    got: dict[str, list[float]] = {s: [math.nan] * len(x) for s, x in streams.items()}
    engine = Engine(bundle, quality=NO_QUALITY)
    # Sums and squares per coming tick, the stages, the count, the baseline.
    assert engine.store.extra.shape[1] == 2 * HORIZONS + stages + 1 + (baseline is not None)
    position = 0
    while position < len(order):
        cut = order[position : position + int(rng.integers(1, 17))]
        position += len(cut)
        result = engine.step([s for s, _ in cut], np.stack([streams[s][t] for s, t in cut]))
        for (s, t), score in zip(cut, result.scores.tolist(), strict=True):
            got[s][t] = score
    for s, x in streams.items():
        np.testing.assert_allclose(
            got[s], _reference(bundle, x, 6, first, stages, baseline), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize(("stages", "baseline"), [(1, None), (2, 7)])
def test_reset_restarts_the_score_and_restore_continues_it(
    stages: int, baseline: int | None
) -> None:
    bundle = horizon_scored_bundle(stages=stages, baseline=baseline)
    x = np.random.default_rng(0).normal(0, 1, (30, 2)).astype(np.float32)
    engine = Engine(bundle)
    first = engine.step(["a"] * 20, x[:20]).scores
    assert np.isnan(first[:HORIZONS]).all() and np.isfinite(first[HORIZONS:]).all()
    saved = StreamState.from_bytes(engine.store.snapshot(["a"])["a"].to_bytes())
    rest = engine.step(["a"] * 10, x[20:]).scores
    other = Engine(bundle)
    other.store.restore({"a": saved})
    np.testing.assert_array_equal(other.step(["a"] * 10, x[20:]).scores, rest)
    again = engine.step(["a"] * 6, x[:6], resets=[True] + [False] * 5).scores
    np.testing.assert_array_equal(again, first[:6])


def test_the_flag_is_the_score_above_the_threshold_and_reaches_the_output() -> None:
    x = np.random.default_rng(2).normal(0, 1, (30, 2)).astype(np.float32)
    scores = Engine(horizon_scored_bundle()).step(["a"] * 30, x).scores
    threshold = float(np.nanmedian(scores))
    result = Engine(horizon_scored_bundle(threshold=threshold)).step(["a"] * 30, x)
    np.testing.assert_array_equal(result.scores, scores)
    expected = [math.nan if math.isnan(s) else float(s > threshold) for s in scores.tolist()]
    np.testing.assert_array_equal(result.anomalies(), expected)
    assert 0 < np.nansum(expected) < np.isfinite(scores).sum()
    assert result.anomaly(0) is UNDEFINED
    flagged = int(np.nanargmax(scores))
    assert result.anomaly(flagged) is True
    assert Engine(horizon_scored_bundle()).step(["a"], x[:1]).anomaly(0) is None

    def encoded(anomaly: bool | Undefined | None) -> dict[str, object]:
        message = encode_prediction(
            stream="a", ts=1, prediction=[1.0], partition=0, offset=0, step=9, ready=True,
            model="m", score=2.5, anomaly=anomaly,
        )  # fmt: skip
        return dict(orjson.loads(message))

    assert list(encoded(True))[-2:] == ["score", "anomaly"]
    assert encoded(False)["anomaly"] is False
    assert encoded(UNDEFINED)["anomaly"] is None
    assert "anomaly" not in encoded(None)


def test_bad_specs_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="score_scale: must be positive"):
        OutputSpec(target_feature=0, score_span=5, score_scale=(1.0, 0.0))
    with pytest.raises(ConfigError, match="score_scale: the multi-horizon score needs"):
        OutputSpec(target_feature=0, score_scale=(1.0, 2.0))
    with pytest.raises(ConfigError, match=r"score_from: must lie in 1 \.\. 2"):
        OutputSpec(target_feature=0, score_span=5, score_scale=(1.0, 2.0), score_from=3)
    with pytest.raises(ConfigError, match="score_stages: must be a positive integer"):
        OutputSpec(target_feature=0, score_span=5, score_scale=(1.0, 2.0), score_stages=0)
    with pytest.raises(ConfigError, match="score_baseline_span: only the multi-horizon score"):
        OutputSpec(target_feature=0, score_span=5, score_baseline_span=50)
    with pytest.raises(ConfigError, match="threshold: a flag needs an anomaly score"):
        OutputSpec(threshold=1.0)
    with pytest.raises(ConfigError, match="score_scale: 4 horizons for 3 outputs"):
        Bundle.random(
            ModelConfig(input_size=2, hidden_sizes=(8,), output_size=3),
            outputs=OutputSpec(target_feature=1, score_span=5, score_scale=SCALE),
        )
    spec = OutputSpec(
        target_feature=1,
        score_span=5,
        score_scale=SCALE,
        threshold=2.0,
        score_stages=2,
        score_baseline_span=40,
    )
    assert OutputSpec.from_dict(orjson.loads(orjson.dumps(spec.to_dict()))) == spec

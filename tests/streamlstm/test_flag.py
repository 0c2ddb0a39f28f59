"""The anomaly flag whose threshold follows each stream: its definition, its state
(reset, snapshot, restore), the engine's flags under any batching, and what it is
for: a stream whose scores drift above the training part's still flags about the
chosen rate of its ticks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlstm import Bundle, ConfigError, Engine, OutputSpec, StreamState
from streamlstm.flag import AdaptiveFlag
from streamlstm.quality import QualityConfig
from tests.helpers.scoring import horizon_scored_bundle
from tests.streamlstm.oracle import threshold_levels

#: The score's columns alone (the live quality figures' would follow them).
NO_QUALITY = QualityConfig(enabled=False)


def test_flags_follow_the_definition() -> None:
    rng = np.random.default_rng(0)
    scores = np.exp(rng.normal(0, 0.4, 3000))
    scores[rng.integers(0, 3000, 40)] = np.nan
    flag = AdaptiveFlag(1.5, 0.05, 0.02, column=0)
    (got,) = flag.replay([scores])
    levels = threshold_levels(scores.tolist(), 1.5, 0.05, 0.02)
    want = [
        math.nan if math.isnan(v) else float(v > t) for v, t in zip(scores, levels, strict=True)
    ]
    # Flags equal wherever the score does not sit on the threshold's last float bits.
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.mean(got[~np.isnan(got)] == np.array(want)[~np.isnan(got)]) > 0.999


def test_a_drifting_stream_flags_about_the_rate_where_a_fixed_threshold_flags_15x() -> None:
    rng = np.random.default_rng(1)
    calm = np.exp(rng.normal(0, 0.2, 20_000))
    threshold = float(np.quantile(calm, 0.99))
    drifted = 1.3 * np.exp(rng.normal(0, 0.2, 40_000))  # the same shape, 30% higher
    scores = np.concatenate([calm, drifted])
    fixed = np.mean(drifted > threshold)
    (adaptive,) = AdaptiveFlag(threshold, 0.01, 0.005, column=0).replay([scores])
    settled = adaptive[30_000:]  # the drifted part, once the threshold has followed it
    assert fixed > 0.1
    assert 0.003 < np.mean(settled) < 0.02
    # Before the drift, never below the fitted threshold: at most the rate.
    assert np.mean(adaptive[:20_000]) <= 0.01


def _bundle(step: float = 0.05) -> Bundle:
    return horizon_scored_bundle(threshold=1.0, stages=2, baseline=30, rate=0.2, step=step)


def test_engine_flags_each_stream_as_its_own_replay_under_any_batching() -> None:
    bundle = _bundle()
    spec = bundle.outputs
    assert spec.threshold is not None and spec.false_alarm_rate is not None
    rng = np.random.default_rng(3)
    # Of several lengths: the replay advances streams of any length together.
    streams = {f"s{k}": rng.normal(0, 1, (45 + 10 * k, 2)).astype(np.float32) for k in range(4)}
    order = rng.permutation([s for s, x in streams.items() for _ in range(len(x))]).tolist()
    engine = Engine(bundle, quality=NO_QUALITY)
    # The score's columns, then the flag's one.
    assert engine.store.extra.shape[1] == 2 * 4 + 2 + 1 + 1 + 1
    seen = dict.fromkeys(streams, 0)
    scores = {s: np.full(len(x), np.nan) for s, x in streams.items()}
    flags = {s: np.full(len(x), np.nan) for s, x in streams.items()}
    position = 0
    while position < len(order):
        cut = order[position : position + int(rng.integers(1, 17))]
        position += len(cut)
        ticks = []
        for s in cut:
            ticks.append((s, seen[s]))
            seen[s] += 1
        result = engine.step(cut, np.stack([streams[s][t] for s, t in ticks]))
        for i, (s, t) in enumerate(ticks):
            scores[s][t] = result.scores[i]
            flags[s][t] = result.anomalies()[i]
            assert result.anomaly(i) is not None
    own = AdaptiveFlag(spec.threshold, spec.false_alarm_rate, spec.threshold_step, 0)
    replayed = own.replay([scores[s] for s in streams])
    for s, again in zip(streams, replayed, strict=True):
        np.testing.assert_array_equal(flags[s], again)
    # With a rate of 0.2 the threshold moves: flags differ from the fixed threshold's.
    fixed = np.concatenate([np.where(np.isnan(v), np.nan, v > 1.0) for v in scores.values()])
    moving = np.concatenate(list(flags.values()))
    assert np.nansum(fixed) > np.nansum(moving) > 0


def test_reset_restarts_the_threshold_and_restore_continues_it() -> None:
    bundle = _bundle()
    x = np.random.default_rng(4).normal(0, 1, (80, 2)).astype(np.float32)
    engine = Engine(bundle, quality=NO_QUALITY)
    first = engine.step(["a"] * 50, x[:50]).anomalies()
    assert engine.store.extra[engine.store.slot_of("a"), -1] > 0  # the threshold rose
    saved = StreamState.from_bytes(engine.store.snapshot(["a"])["a"].to_bytes())
    rest = engine.step(["a"] * 30, x[50:]).anomalies()
    other = Engine(bundle)
    other.store.restore({"a": saved})
    np.testing.assert_array_equal(other.step(["a"] * 30, x[50:]).anomalies(), rest)
    again = engine.step(["a"] * 50, x[:50], resets=[True] + [False] * 49).anomalies()
    np.testing.assert_array_equal(again, first)


def test_bad_adaptive_specs_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="threshold_step: an adaptive flag needs"):
        OutputSpec(target_feature=0, score_span=5, threshold=1.0, threshold_step=0.01)
    with pytest.raises(ConfigError, match="threshold_step: must be 0 or more"):
        OutputSpec(
            target_feature=0,
            score_span=5,
            threshold=1.0,
            false_alarm_rate=0.01,
            threshold_step=-1.0,
        )
    with pytest.raises(ConfigError, match="threshold_step: must be a number"):
        OutputSpec(target_feature=0, score_span=5, threshold_step="fast")  # type: ignore[arg-type]
    spec = _bundle().outputs
    assert OutputSpec.from_dict(spec.to_dict()) == spec

"""Live model quality (``Engine.quality``) against oracles written from the engine's own
answers: each forecast (a ``StepResult`` row) paired by hand with the value its stream
shows ``h`` ticks later, the naive forecasts from the raw inputs, drift from NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamlstm import Affine, Bundle, ConfigError, Engine, ModelConfig, OutputSpec, StreamState
from streamlstm.quality import QualityConfig, QualityReport
from streamlstm.quality.drift import InputDrift
from tests.helpers.scoring import HORIZONS, horizon_scored_bundle

H = 3  # the forecaster's horizon
TARGET = 1  # its target's input column


def _forecaster(**training: object) -> Bundle:
    return Bundle.random(
        ModelConfig(input_size=2, hidden_sizes=(8,), head_sizes=(4,), output_size=1),
        seed=7,
        input_scaler=Affine.from_min_max([-3.0, 0.0], [3.0, 10.0]),
        target_scaler=Affine.from_min_max([0.0], [10.0]),
        outputs=OutputSpec(target_feature=TARGET, horizon=H),
        training=training,
    )


def _streams(rng: np.random.Generator, lengths: list[int]) -> dict[str, np.ndarray]:
    return {
        f"s{k}": np.c_[rng.normal(0, 1, n), 5 + np.cumsum(rng.normal(0, 0.3, n))].astype(np.float32)
        for k, n in enumerate(lengths)
    }


def _feed(
    engine: Engine, streams: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Every stream's ticks interleaved at random, in calls of random size; each tick's
    forecast, by stream and position."""
    order = rng.permutation([s for s, x in streams.items() for _ in range(len(x))]).tolist()
    seen = dict.fromkeys(streams, 0)
    forecasts = {s: np.full(len(x), np.nan, np.float32) for s, x in streams.items()}
    position = 0
    while position < len(order):
        cut = order[position : position + int(rng.integers(1, 40))]
        position += len(cut)
        rows = []
        for s in cut:
            rows.append((s, seen[s]))
            seen[s] += 1
        result = engine.step(cut, np.stack([streams[s][i] for s, i in rows]))
        for (s, i), value in zip(rows, result.predictions[:, 0], strict=True):
            forecasts[s][i] = value
    return forecasts


def _le_counts(errors: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    """Cumulative histogram counts (Prometheus' ``le``) by direct comparison."""
    return [int(np.sum(errors <= b)) for b in bounds] + [errors.size]


def test_realized_errors_are_each_forecast_against_the_value_h_ticks_later() -> None:
    rng = np.random.default_rng(1)
    streams = _streams(rng, [50, 80, 7, 120])
    engine = Engine(_forecaster(), quality=QualityConfig(season=5))
    forecasts = _feed(engine, streams, rng)
    model, persistence, seasonal = [], [], []
    for s, x in streams.items():
        truth = x[:, TARGET].astype(np.float64)
        t = np.arange(len(x) - H)  # forecasts whose truth came
        model.append(np.abs(forecasts[s][t].astype(np.float64) - truth[t + H]))
        persistence.append(np.abs(truth[t] - truth[t + H]))
        late = t[t + H - 5 >= 0]
        seasonal.append(np.abs(truth[late + H - 5] - truth[late + H]))
    report = engine.quality
    assert report is not None
    (q,) = report.horizons
    assert (q.horizon, q.target) == (H, "x1")
    for got, errors in (
        (q.model, np.concatenate(model)),
        (q.baselines["persistence"], np.concatenate(persistence)),
        (q.baselines["seasonal_5"], np.concatenate(seasonal)),
    ):
        assert got.count == errors.size
        assert got.total == pytest.approx(errors.sum(), rel=1e-12)
        assert got.squares == pytest.approx(np.dot(errors, errors), rel=1e-12)
        assert np.cumsum(got.counts).tolist() == _le_counts(errors, got.bounds)
    assert q.model.mean == pytest.approx(np.concatenate(model).mean(), rel=1e-12)


def _segments_oracle(
    x: np.ndarray, forecasts: np.ndarray, accepted: np.ndarray, cuts: list[int]
) -> list[float]:
    """Errors of the pairs (t, t + H) of accepted ticks that no cut separates:
    ``cuts`` are positions at which the stream's history starts again."""
    kept = np.flatnonzero(accepted)
    segment = np.searchsorted(np.array(sorted(cuts)), kept, side="right")
    out = []
    for j in range(len(kept) - H):
        a, b = kept[j], kept[j + H]
        if segment[j] == segment[j + H]:
            out.append(abs(float(forecasts[a]) - float(x[b, TARGET])))
    return out


def test_a_reset_an_end_or_a_refused_tick_never_pairs_a_forecast_with_the_wrong_truth() -> None:
    rng = np.random.default_rng(2)
    x = _streams(rng, [90])["s0"]
    x[30] = np.nan  # refused: a hole in the stream's history
    resets = np.zeros(len(x), bool)
    resets[12] = True
    ends = np.zeros(len(x), bool)
    ends[50] = True  # freed after tick 50: tick 51 starts from zero
    engine = Engine(_forecaster())
    forecasts = np.full(len(x), np.nan, np.float32)
    for i in range(len(x)):
        if i == 70:
            engine.step([], np.zeros((0, 2), np.float32), gaps=["s0"])  # refused upstream
        r = engine.step(["s0"], x[i : i + 1], resets=resets[i : i + 1], ends=ends[i : i + 1])
        forecasts[i] = r.predictions[0, 0]
    accepted = np.isfinite(x).all(axis=1)
    # Starts again at the reset (12), after the hole (31), after the end (51), at 70.
    want = _segments_oracle(x, forecasts, accepted, [12, 31, 51, 70])
    report = engine.quality
    assert report is not None
    got = report.horizons[0].model
    assert got.count == len(want)
    assert got.total == pytest.approx(sum(want), rel=1e-12)


def test_within_a_call_a_hole_invalidates_every_pair_that_could_span_it() -> None:
    """Batched: a refused tick's call judges none of its stream's forecasts made up to
    the call's end against a truth from the call on; all other pairs are judged."""
    rng = np.random.default_rng(3)
    x = _streams(rng, [60])["s0"]
    x[25] = np.nan
    calls = [(0, 20), (20, 30), (30, 60)]  # the hole's call holds positions 20..29
    engine = Engine(_forecaster())
    forecasts = np.concatenate(
        [engine.step(["s0"] * (b - a), x[a:b]).predictions[:, 0] for a, b in calls]
    )
    kept = np.flatnonzero(np.isfinite(x).all(axis=1))
    want = [
        abs(float(forecasts[kept[j]]) - float(x[kept[j + H], TARGET]))
        for j in range(len(kept) - H)
        if not (kept[j] <= 29 and kept[j + H] >= 20)
    ]
    report = engine.quality
    assert report is not None
    assert report.horizons[0].model.count == len(want)
    assert report.horizons[0].model.total == pytest.approx(sum(want), rel=1e-12)


def test_errors_continue_exactly_across_a_snapshot_and_restore() -> None:
    rng = np.random.default_rng(4)
    streams = _streams(rng, [40, 40, 40])
    ids = sorted(streams)
    whole = Engine(_forecaster(), quality=QualityConfig(season=4))
    for i in range(20):
        whole.step(ids, np.stack([streams[s][i] for s in ids]))
    saved = {
        s: StreamState.from_bytes(st.to_bytes()) for s, st in whole.store.snapshot(ids).items()
    }
    middle = whole.quality
    moved = Engine(_forecaster(), quality=QualityConfig(season=4))
    moved.store.restore(saved)
    for i in range(20, 40):
        rows = np.stack([streams[s][i] for s in ids])
        whole.step(ids, rows)
        moved.step(ids, rows)
    assert whole.quality is not None and middle is not None and moved.quality is not None
    after = whole.quality.since(middle)
    for a, b in zip(after.horizons, moved.quality.horizons, strict=True):
        for name in ("persistence", "seasonal_4"):
            assert a.baselines[name].counts == b.baselines[name].counts
            assert a.baselines[name].total == pytest.approx(b.baselines[name].total, rel=1e-12)
        assert a.model.counts == b.model.counts and a.model.count == 3 * 20
        assert a.model.total == pytest.approx(b.model.total, rel=1e-6)


def test_a_multi_horizon_model_is_judged_at_1_and_h() -> None:
    bundle = horizon_scored_bundle(threshold=1.0, rate=0.1)
    rng = np.random.default_rng(5)
    x = _streams(rng, [70])["s0"]
    engine = Engine(bundle)
    out = engine.step(["s0"] * len(x), x).predictions
    report = engine.quality
    assert report is not None
    one, last = report.horizons
    assert (one.horizon, last.horizon) == (1, HORIZONS)
    truth = x[:, 1].astype(np.float64)
    for q, column in ((one, 0), (last, HORIZONS - 1)):
        h = q.horizon
        errors = np.abs(out[: len(x) - h, column].astype(np.float64) - truth[h:])
        assert q.model.count == errors.size
        assert q.model.total == pytest.approx(errors.sum(), rel=1e-12)
    # The score's tally: every defined score, and the flags of those over the threshold.
    scores = engine.step(["s1"] * len(x), x).scores
    report2 = engine.quality
    assert report2 is not None and report2.scores is not None and report.scores is not None
    defined = scores[~np.isnan(scores)]
    assert report2.scores.count - report.scores.count == defined.size
    assert report2.anomalies - report.anomalies == int(np.sum(defined > 1.0))
    assert report2.false_alarm_rate == 0.1


def test_drift_is_the_ew_mean_in_training_sds_batched_or_not() -> None:
    rng = np.random.default_rng(6)
    stats = {"inputs": {"mean": [0.0, 5.0], "std": [1.0, 2.0]}}
    window = 200
    x = np.c_[rng.normal(0, 1, 1200), rng.normal(5, 2, 1200)].astype(np.float32)
    x[600:, 1] += 3 * 2.0  # three training sds up, mid-stream
    batched = Engine(_forecaster(**stats), quality=QualityConfig(drift_window_ticks=window))
    single = Engine(_forecaster(**stats), quality=QualityConfig(drift_window_ticks=window))
    batched.step(["a", "b"] * 300, x[:600])
    for i in range(600):
        single.step(["ab"[i % 2]], x[i : i + 1])
    q1, q2 = batched.quality, single.quality
    assert q1 is not None and q2 is not None
    np.testing.assert_allclose(q1.drift_z, q2.drift_z, rtol=1e-9)
    assert max(abs(z) for z in q1.drift_z) < 1.0  # the training distribution: no drift
    # NumPy's own EW mean (pandas' span convention, adjusted) of the second feature.
    alpha = 2 / (window + 1)
    w = (1 - alpha) ** np.arange(599, -1, -1)
    assert q1.drift_z[1] == pytest.approx((np.dot(w, x[:600, 1]) / w.sum() - 5.0) / 2.0)
    batched.step(["a"] * window, x[600 : 600 + window])
    q3 = batched.quality
    assert q3 is not None
    assert q3.drift_z[1] > 2.0  # one window after the shift: past the alert's line
    assert abs(q3.drift_z[0]) < 1.0
    assert q3.std_ratio[0] == pytest.approx(1.0, abs=0.2)


def test_nothing_is_measured_where_the_model_cannot_be_judged() -> None:
    plain = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(4,), output_size=1))
    report = Engine(plain).quality
    assert report is not None
    assert report.horizons == () and report.features == () and report.scores is None
    off = Engine(_forecaster(), quality=QualityConfig(enabled=False))
    assert off.quality is None and off.stats.quality is None
    assert off.store.extra.shape[1] == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"season": -1}, "season"), ({"drift_window_ticks": 0}, "drift_window_ticks")],
)
def test_bad_quality_configs_are_refused_by_name(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"quality\.{field}"):
        QualityConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_training_statistics_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"training\.inputs"):
        Engine(_forecaster(inputs={"mean": [0.0], "std": [1.0]}))
    with pytest.raises(ConfigError, match="training input statistics"):
        InputDrift([0.0, 1.0], [1.0], 10)


def test_the_report_tells_spans_apart() -> None:
    rng = np.random.default_rng(8)
    x = _streams(rng, [30])["s0"]
    engine = Engine(_forecaster())
    engine.step(["s0"] * 10, x[:10])
    first = engine.quality
    engine.step(["s0"] * 20, x[10:])
    last = engine.quality
    assert isinstance(first, QualityReport) and last is not None
    span = last.since(first)
    assert span.horizons[0].model.count == last.horizons[0].model.count - (10 - H)
    assert math.isnan(first.since(first).horizons[0].model.mean)


def test_the_worst_streams_are_ranked_by_their_own_recent_error() -> None:
    rng = np.random.default_rng(9)
    calm = _streams(rng, [60])["s0"]
    wild = calm.copy()
    wild[:, TARGET] += 50  # far off what the model forecasts
    engine = Engine(_forecaster())
    out = {}
    for name, x in (("calm", calm), ("wild", wild), ("new", calm[:2])):
        out[name] = engine.step([name] * len(x), x).predictions[:, 0]
    worst = engine.worst_streams(5)
    assert [w.stream for w in worst] == ["wild", "calm"]  # "new" has no judged forecast
    assert engine.worst_streams(1) == worst[:1]
    # The recent error is the EW mean (span 100, from the first) of the stream's errors.
    alpha = 2 / 101
    errors = np.abs(out["wild"][: 60 - H].astype(np.float64) - wild[H:, TARGET])
    naive = np.abs(wild[: 60 - H, TARGET].astype(np.float64) - wild[H:, TARGET])
    for series, got in (
        (errors, worst[0].recent_abs_error),
        (naive, worst[0].recent_baseline_abs_error),
    ):
        ew = series[0]
        for e in series[1:]:
            ew += alpha * (e - ew)
        assert got == pytest.approx(ew, rel=1e-9)
    assert worst[0].steps == 60
    assert Engine(Bundle.random(ModelConfig(input_size=1, hidden_sizes=(4,)))).worst_streams() == []


@pytest.mark.parametrize(
    "saved_with",
    [QualityConfig(enabled=False), QualityConfig(season=7)],
    ids=["without-quality-columns", "another-quality-layout"],
)
def test_a_state_saved_with_other_quality_columns_starts_them_at_its_next_tick(
    saved_with: QualityConfig,
) -> None:
    """An older daemon's changelog (or one with the figures off, or laid out for another
    season) holds no forecasts of this layout: the first judged forecast is the first
    one made after the restore."""
    rng = np.random.default_rng(10)
    x = _streams(rng, [50])["s0"]
    old = Engine(_forecaster(), quality=saved_with)
    old.step(["s0"] * 30, x[:30])
    saved = StreamState.from_bytes(old.store.snapshot(["s0"])["s0"].to_bytes())
    new = Engine(_forecaster())
    new.store.restore({"s0": saved})
    out = new.step(["s0"] * 20, x[30:]).predictions[:, 0]
    errors = np.abs(out[: 20 - H].astype(np.float64) - x[30 + H :, TARGET])
    report = new.quality
    assert report is not None
    assert report.horizons[0].model.count == errors.size
    assert report.horizons[0].model.total == pytest.approx(errors.sum(), rel=1e-12)

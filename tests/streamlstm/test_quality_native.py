"""The realized errors' C update (``_quality.c``) against the NumPy one: the same
columns and the same totals, bit for bit, on histories with holes, resets, NaN
truths and forecasts, longer horizons, a season and a multi-horizon model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streamlstm import ConfigError, OutputSpec
from streamlstm.kernels import DISABLE_ENV
from streamlstm.quality import native
from streamlstm.quality.errors import RealizedErrors
from streamlstm.quality.native import QUALITY_PATH_ENV, loaded_path, quality_lib

STREAMS = 40
METRICS = {"train_mae": 0.7, "horizons": {"4": {"train_mae": 1.3}}}


def test_the_c_update_is_built() -> None:
    assert quality_lib() is not None, (
        "streamlstm._quality is not built (or STREAMLSTM_NATIVE=0): "
        "python setup.py build_ext --inplace"
    )
    # `make test-sanitize` sets STREAMLSTM_QUALITY_PATH to its ASan/UBSan build: every
    # test here must run on that build, not on the in-place one.
    path = os.environ.get(QUALITY_PATH_ENV)
    loaded = Path(str(loaded_path())).resolve()
    if path:
        assert loaded == Path(path).resolve()
    else:
        assert loaded.parent == Path(native.__file__).resolve().parent.parent


def _pair(horizon: int, outputs: int, season: int | None) -> list[RealizedErrors]:
    multi = {"score_span": 6, "score_scale": (1.0,) * outputs} if outputs > 1 else {}
    spec = OutputSpec(target_feature=0, horizon=horizon, **multi)  # type: ignore[arg-type]
    return [_errors(spec, outputs, season, native=c) for c in (True, False)]


def _errors(spec: OutputSpec, outputs: int, season: int | None, *, native: bool) -> RealizedErrors:
    return RealizedErrors(
        spec,
        outputs=outputs,
        target="y",
        first_column=3,
        season=season,
        metrics=METRICS,
        native=native,
    )


# An infinite forecast's recent error turns NaN (inf - inf): NumPy warns, C does not.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("horizon", "outputs", "season"),
    [(1, 1, None), (3, 1, None), (1, 1, 5), (2, 1, 7), (1, 4, None), (1, 4, 6)],
)
def test_the_c_and_numpy_updates_agree_bit_for_bit(
    horizon: int, outputs: int, season: int | None
) -> None:
    fast, slow = _pair(horizon, outputs, season)
    assert fast.native and not slow.native
    rng = np.random.default_rng(horizon * 100 + outputs * 10 + (season or 0))
    extra = np.zeros((STREAMS + 5, 3 + fast.width + 2))
    extra[:, :3] = rng.normal(size=(STREAMS + 5, 3))  # another user's columns: left alone
    extra[:, -2:] = rng.normal(size=(STREAMS + 5, 2))
    copy = extra.copy()
    steps = np.zeros(STREAMS + 5, dtype=np.int64)
    for call in range(300):
        slots = rng.permutation(STREAMS + 5)[: int(rng.integers(0, STREAMS))].astype(np.int64)
        _between_calls(rng, (fast, slow), (extra, copy), slots, steps)
        steps[slots] += 1
        values = rng.normal(5.0, 2.0, slots.size).astype(np.float32)
        forecasts = rng.normal(5.0, 2.0, (slots.size, outputs)).astype(np.float32)
        values[rng.random(slots.size) < 0.03] = np.nan
        forecasts[rng.random(forecasts.shape) < 0.03] = np.nan
        forecasts[rng.random(forecasts.shape) < 0.01] = np.inf
        for errors, cols in ((fast, extra), (slow, copy)):
            errors.update(cols, slots, steps[slots], values, forecasts)
        assert extra.tobytes() == copy.tobytes(), f"call {call}"
    assert _totals(fast) == _totals(slow)
    assert fast.report()[0].model.count > 1000


def _between_calls(
    rng: np.random.Generator,
    pair: tuple[RealizedErrors, RealizedErrors],
    arrays: tuple[np.ndarray, np.ndarray],
    slots: np.ndarray,
    steps: np.ndarray,
) -> None:
    """What the engine does to some streams between updates: a reset, a hole."""
    cleared = slots[rng.random(slots.size) < 0.02]
    gapped = slots[rng.random(slots.size) < 0.02]
    for errors, cols in zip(pair, arrays, strict=True):
        errors.clear(cols, cleared)
        errors.mark_gap(cols, gapped, steps[gapped])


def _totals(errors: RealizedErrors) -> list[tuple[int, tuple[int, ...], str, str]]:
    out = []
    for h in errors.report():
        for totals in (h.model, *h.baselines.values()):
            out.append((h.horizon, totals.counts, totals.total.hex(), totals.squares.hex()))
    return out


def test_a_slot_outside_the_store_is_refused_and_nothing_changes() -> None:
    fast, _ = _pair(1, 1, None)
    extra = np.zeros((4, 3 + fast.width))
    steps = np.ones(2, dtype=np.int64)
    values = np.ones(2, dtype=np.float32)
    forecasts = np.ones((2, 1), dtype=np.float32)
    for bad in (4, -1):
        with pytest.raises(IndexError, match="outside the store"):
            fast.update(extra, np.array([0, bad]), steps, values, forecasts)
    assert not extra.any()
    assert fast.report()[0].model.count == 0


def test_numpy_alone_where_native_code_is_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert quality_lib() is None
    assert not _pair(1, 1, None)[0].native


def test_a_build_asked_for_by_path_must_be_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The sanitizer run must not pass on the in-place build because its own was not found.
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_path", None)
    monkeypatch.setenv(QUALITY_PATH_ENV, str(tmp_path / "_quality.so"))
    with pytest.raises(ConfigError, match="no extension module"):
        quality_lib()


def test_an_error_equal_to_a_bound_counts_in_its_bucket() -> None:
    spec = OutputSpec(target_feature=0)
    pair = [
        RealizedErrors(
            spec,
            outputs=1,
            target="y",
            first_column=0,
            season=None,
            metrics={"train_mae": 1.0},
            native=native_,
        )
        for native_ in (True, False)
    ]
    # With a training MAE of 1 the bounds include the powers of two 1/8 .. 16, exact
    # in float32: each forecast below misses its truth (0) by exactly a bound.
    misses = np.array([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, -16.0, 100.0], np.float32)
    slots = np.arange(misses.size)
    for errors in pair:
        extra = np.zeros((misses.size, errors.width))
        zeros = np.zeros(misses.size, np.float32)
        errors.update(extra, slots, np.full(misses.size, 1), zeros, misses[:, None])
        errors.update(extra, slots, np.full(misses.size, 2), zeros, zeros[:, None])
    fast, slow = (errors.report()[0].model for errors in pair)
    assert fast.counts == slow.counts and fast.total == slow.total == 147.875
    le = dict(zip(fast.bounds, np.cumsum(fast.counts[:-1]).tolist(), strict=True))
    assert [le[b] for b in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)] == [1, 2, 3, 4, 5, 6, 7, 9]
    assert fast.counts[-1] == 1  # 100: above every bound

"""The C step over chunks of rows (``sl_step``) against the NumPy step, and its bits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from streamlstm import Bundle, Engine, ModelConfig, kernels
from streamlstm.config import CELLS
from streamlstm.kernels import DISABLE_ENV


@pytest.fixture(autouse=True)
def native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the C step: on whatever the environment says."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)


_MISSING = "no C step here: it needs the C kernels built with scipy-openblas32 (make clean test)"

CONFIGS = [
    ModelConfig(input_size=1),
    ModelConfig(input_size=3, hidden_sizes=(12, 12, 6), head_sizes=(16, 8), output_size=3),
    ModelConfig(input_size=2, hidden_sizes=(7,), head_sizes=(), head_activation="tanh"),
    ModelConfig(input_size=2, hidden_sizes=(20, 9), head_sizes=(5,), head_activation="sigmoid"),
]


@pytest.fixture(params=[0, 32, 256], ids=["whole", "chunk32", "chunk256"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(kernels, "CHUNK_ROWS", request.param)
    yield request.param


def _chunked(bundle: Bundle, **kwargs: object) -> Engine:
    engine = Engine(bundle, native=True, **kwargs)  # type: ignore[arg-type]
    # Built with the package: a silent fallback would leave these tests checking NumPy.
    assert engine.native, _MISSING
    return engine


def _batches(
    rng: np.random.Generator,
    streams: int,
    inputs: int,
    sizes: tuple[int, ...] = (1, 5, 40, 700, 300, 3, 1100),
) -> Iterator[tuple[list[str], npt.NDArray[np.float32]]]:
    """Batches of many sizes; in some, streams tick several times (several rounds)."""
    for size in sizes:
        ids = [f"s{i}" for i in rng.integers(0, streams, size)]
        yield ids, (rng.normal(size=(size, inputs)) * 3).astype(np.float32)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("config", CONFIGS)
def test_chunked_engine_equals_numpy_with_repeats_resets_ends_and_bad_rows(
    config: ModelConfig, chunk: int, cell: str
) -> None:
    config = replace(config, cell=cell)
    bundle = Bundle.random(config, seed=4)
    native = _chunked(bundle)
    plain = Engine(bundle, native=False)
    rng = np.random.default_rng(0)
    for ids, x in _batches(rng, 600, config.input_size):
        x[rng.random(len(ids)) < 0.02] = np.nan  # rejected rows, the rest go on
        resets = rng.random(len(ids)) < 0.05
        ends = rng.random(len(ids)) < 0.05
        got = native.step(ids, x, resets=resets, ends=ends)
        want = plain.step(ids, x, resets=resets, ends=ends)
        np.testing.assert_array_equal(got.accepted, want.accepted)
        np.testing.assert_array_equal(got.steps, want.steps)
        np.testing.assert_allclose(got.predictions, want.predictions, atol=1e-5, rtol=0)
    for layer in range(config.num_layers):
        for held in (native.store, plain.store):
            assert held.stream_ids() == plain.store.stream_ids()
        ids = plain.store.stream_ids()
        slots_n = np.array([native.store.slot_of(s) for s in ids], dtype=np.int64)
        slots_p = np.array([plain.store.slot_of(s) for s in ids], dtype=np.int64)
        np.testing.assert_allclose(
            native.store.h[layer][slots_n], plain.store.h[layer][slots_p], atol=1e-5, rtol=0
        )
        for c_n, c_p in zip(native.store.c, plain.store.c, strict=True):
            np.testing.assert_allclose(c_n[slots_n], c_p[slots_p], atol=1e-5, rtol=1e-6)
    assert len(native.store.c) == (config.num_layers if cell == "lstm" else 0)


@pytest.mark.parametrize("cell", CELLS)
def test_chunked_engine_evicts_as_numpy_does(chunk: int, cell: str) -> None:
    bundle = Bundle.random(replace(CONFIGS[1], cell=cell), seed=2)
    native = _chunked(bundle, max_streams=150)
    plain = Engine(bundle, native=False, max_streams=150)
    rng = np.random.default_rng(3)
    for ids, x in _batches(rng, 400, 3, (1, 5, 40, 120, 90, 3, 130, 100)):
        got, want = native.step(ids, x), plain.step(ids, x)
        assert [(e.stream_id, e.reason) for e in got.evictions] == [
            (e.stream_id, e.reason) for e in want.evictions
        ]
        np.testing.assert_allclose(got.predictions, want.predictions, atol=1e-5, rtol=0)
    assert sorted(native.store.stream_ids()) == sorted(plain.store.stream_ids())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_stream_gets_the_same_bits_whatever_shares_its_batch(
    chunk: int, threads: int, cell: str
) -> None:
    # Every product runs over whole blocks of kernels.ROW_BLOCK rows, so a stream's
    # results do not depend on how many streams share its batch or its chunk (OpenBLAS's
    # AVX2 kernel sums the rows of a partial group of 12 in another order): a restored
    # stream continues bit for bit.
    bundle = Bundle.random(replace(CONFIGS[0], cell=cell), seed=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 1)).astype(np.float32)
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        alone = _chunked(bundle)
        want = np.concatenate([alone.step(["a"], x[t : t + 1]).predictions for t in range(12)])
        for size in (3, 40, 700, 1599):
            crowd = _chunked(bundle)
            got = []
            for t in range(12):
                others = [f"o{i}" for i in rng.permutation(2000)[:size]]
                xs = np.concatenate([rng.normal(size=(size, 1)).astype(np.float32), x[t : t + 1]])
                got.append(crowd.step([*others, "a"], xs).predictions[-1:])
            np.testing.assert_array_equal(np.concatenate(got), want)
    finally:
        kernels.set_num_threads(before)

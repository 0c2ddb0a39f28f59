"""Bad rows are rejected one by one with a reason; the rest of the batch proceeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from streamlstm import Engine, InputError
from tests.conftest import BundleFactory


def test_bad_rows_are_rejected_alone(make_bundle: BundleFactory) -> None:
    bundle = make_bundle()
    engine = Engine(bundle)
    rows: list[Any] = [
        [1.0, 2.0],
        [float("nan"), 1.0],
        [1.0],
        [3.0, float("inf")],
        ["a", 1.0],
        [4.0, 5.0],
        "12",
        [1e39, 0.0],
        [6.0, 7.0],
    ]
    ids = ["a", "a", "b", "a", "c", "a", "d", "e", ""]
    out = engine.step(ids, rows)
    assert out.accepted.tolist() == [True, False, False, False, False, True, False, False, False]
    by_index = {r.index: (r.field, r.reason) for r in out.rejections}
    assert by_index[1][0] == "values" and "NaN" in by_index[1][1]
    assert by_index[2] == ("values", "expected 2 values, got 1")
    assert "numbers" in by_index[4][1]
    assert "float32 range" in by_index[7][1]
    assert by_index[8] == ("stream", "must be a non-empty string")
    assert np.isnan(out.predictions[~out.accepted]).all()
    good = np.array([[1.0, 2.0], [4.0, 5.0]], np.float32)
    np.testing.assert_allclose(out.predictions[[0, 5]], bundle.predict_sequence(good), atol=1e-6)
    assert out.steps.tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0]
    assert set(engine.store.stream_ids()) == {"a"}  # rejected rows create no state
    assert engine.stats.rejected == 7


def test_whole_array_of_the_wrong_width(make_bundle: BundleFactory) -> None:
    out = Engine(make_bundle()).step(["a", "b"], np.zeros((2, 3), np.float32))
    assert not out.accepted.any()
    assert out.rejections[0].reason == "expected 2 values, got 3"


def test_malformed_call_arguments_raise(make_bundle: BundleFactory) -> None:
    engine = Engine(make_bundle())
    with pytest.raises(InputError, match="resets: expected 2 flags"):
        engine.step(["a", "b"], np.zeros((2, 2)), resets=[True])
    with pytest.raises(InputError, match="features: 1 rows for 2 stream ids"):
        engine.step(["a", "b"], [[1.0, 2.0]])


def test_infinite_timestamps_are_rejected_nan_means_none(make_bundle: BundleFactory) -> None:
    out = Engine(make_bundle()).step(
        ["a", "b", "c"], np.zeros((3, 2)), timestamps=[0.0, float("nan"), float("inf")]
    )
    assert out.accepted.tolist() == [True, True, False]
    assert [(r.index, r.field) for r in out.rejections] == [(2, "ts")]


def test_ids_that_are_not_strings_are_rejected_beside_held_streams(
    make_bundle: BundleFactory,
) -> None:
    engine = Engine(make_bundle())
    engine.step(["a", "b"], np.zeros((2, 2), np.float32))  # both held from now on
    ids: list[object] = ["b", ["a"], 7, None, "", "a", ("a",), b"a"]
    out = engine.step(ids, np.ones((len(ids), 2), np.float32))  # type: ignore[arg-type]
    assert out.accepted.tolist() == [True, False, False, False, False, True, False, False]
    assert {r.index for r in out.rejections} == {1, 2, 3, 4, 6, 7}
    assert all(r.field == "stream" for r in out.rejections)
    assert out.steps.tolist() == [2, 0, 0, 0, 0, 2, 0, 0]
    assert set(engine.store.stream_ids()) == {"a", "b"}

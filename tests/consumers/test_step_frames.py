"""A step request crosses to the engine child as a few flat objects, not one per tick."""

from __future__ import annotations

import pickle

import numpy as np

from streamlstm.consumers.engine.protocol import Step, StepRequest


def _request(ids: list[str]) -> StepRequest:
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=np.arange(2.0 * n).reshape(n, 2),
        resets=[i % 3 == 0 for i in range(n)],
        ends=np.arange(n) % 5 == 0,
        timestamps=np.full(n, 1.7e12),
        offsets=list(range(100, 100 + n)),
        partitions=np.arange(n) % 4,
    )


def _round_trip(request: StepRequest) -> StepRequest:
    step: Step = pickle.loads(pickle.dumps(Step.of(request), protocol=5))
    return step.request()


def test_a_step_request_crosses_as_one_string_and_arrays() -> None:
    request = _request([f"s-{i}" for i in range(1000)] + ["été", "a b", 'q"'])
    packed = Step.of(request)
    assert isinstance(packed.ids, str)
    fields = ("features", "resets", "ends", "timestamps", "offsets", "partitions")
    assert all(isinstance(getattr(packed, name), np.ndarray) for name in fields)
    back = _round_trip(request)
    assert back.stream_ids == request.stream_ids
    for name in ("features", "resets", "ends", "timestamps", "offsets", "partitions"):
        np.testing.assert_array_equal(getattr(back, name), np.asarray(getattr(request, name)))
    assert back.offsets.dtype == np.int64 and back.resets.dtype == np.bool_  # type: ignore[union-attr]


def test_ids_a_joined_string_cannot_carry_go_as_a_list() -> None:
    for ids in ([], ["a\0b", "c"], ["", "x"], [""]):
        assert _round_trip(_request(ids)).stream_ids == ids

"""Fuzz: any message ends as exactly one prediction or exactly one InputError.

Messages (random bytes, mutated valid ticks, valid JSON with hostile values,
random keys) go through ``decode_tick`` -> ``Engine.step`` (in batches, as the
daemon steps a poll) -> ``encode_prediction``. A message that decodes must be
stepped (the engine rejects nothing the decoder accepted) and encode to JSON
that round-trips its stream id; one that does not raises ``InputError`` with a
known field and a reason that fits a Kafka header. Nothing else may escape.

The default run is short; a campaign: ``STREAMLSTM_FUZZ_EXAMPLES=200000``.
"""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings

from streamlstm import Bundle, Engine, InputError, ModelConfig
from streamlstm.consumers.codec.wire import decode_tick, encode_prediction
from tests.helpers.fuzz_strategies import EXAMPLES, NOW_MS, messages

FIELDS = {"value", "values", "key", "stream", "ts", "reset", "end"}

BUNDLE = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(8,), head_sizes=(4,), output_size=1))
ENGINE = Engine(BUNDLE, max_streams=64, idle_ttl_s=60, clock=lambda: NOW_MS / 1000)

# -- the property -------------------------------------------------------------------------


def _serve(batch: list[tuple[bytes | None, bytes | None]]) -> tuple[int, int]:
    """The daemon's path for one poll; returns (predictions, rejections)."""
    ticks = []
    rejected = 0
    for key, value in batch:
        try:
            tick = decode_tick(key, value, input_size=2, now_ms=NOW_MS, max_value_bytes=4096)
        except InputError as exc:
            assert exc.field in FIELDS, exc
            exc.reason.encode("utf-8")  # it goes into a Kafka header
            assert len(exc.reason) < 1000
            rejected += 1
            continue
        assert isinstance(tick.stream, str) and tick.stream
        assert len(tick.values) == 2
        assert tick.ts is None or 1e11 <= tick.ts <= NOW_MS + 86_400_000
        ticks.append(tick)
    if not ticks:
        return 0, rejected
    out = ENGINE.step(
        [t.stream for t in ticks],
        np.array([t.values for t in ticks], dtype=np.float64),
        resets=[t.reset for t in ticks],
        ends=[t.end for t in ticks],
        timestamps=[math.nan if t.ts is None else t.ts for t in ticks],
    )
    assert out.accepted.all(), out.rejections
    for tick, prediction, step, ready, score in zip(
        ticks,
        out.predictions.tolist(),
        out.steps.tolist(),
        out.ready.tolist(),
        out.scores.tolist(),
        strict=True,
    ):
        body = encode_prediction(
            stream=tick.stream,
            ts=tick.ts,
            prediction=prediction,
            partition=0,
            offset=0,
            step=step,
            ready=ready,
            model="fuzz",
            score=score,
        )
        decoded = json.loads(body.decode("utf-8"))
        assert decoded["stream"] == tick.stream
        assert tick.stream.encode("utf-8") == decoded["stream"].encode("utf-8")
    return len(ticks), rejected


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(messages)
def test_every_message_is_one_prediction_or_one_rejection(
    batch: list[tuple[bytes | None, bytes | None]],
) -> None:
    served, rejected = _serve(batch)
    assert served + rejected == len(batch)


def test_the_reported_message() -> None:
    assert _serve([(None, b'{"stream":"\\ud800","values":[1.0, 2.0]}')]) == (0, 1)
    assert _serve([(b"k", b'{"values":[1.0, 2.0]}'), (None, b'{"stream":"\\ud800"}')]) == (1, 1)

"""``StreamView``: what the engine holds of one stream, for an operator to look at."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from streamlstm.stream_state import StreamState

__all__ = ["StreamView"]


@dataclass(frozen=True, eq=False)
class StreamView:
    """One held stream as ``Engine.inspect`` finds it.

    ``partition`` and ``offset`` are the input position of the last tick (or
    control) its state reflects (-1: unknown); ``steps`` counts ticks since its
    last reset; ``last_seen_s`` is its own latest event time (epoch seconds);
    ``ready`` whether it is past the model's warm-up; ``prediction`` the last
    answer this process gave it (``[outputs]`` in target units) and ``score``
    that answer's anomaly score: None where this process has not answered it
    since it was restored or reset, or (score) where the model has none or the
    score was not yet defined. ``state`` is the state itself, where asked for.
    """

    stream: str
    partition: int
    steps: int
    offset: int
    last_seen_s: float
    ready: bool
    model: str
    prediction: tuple[float, ...] | None
    score: float | None
    state: StreamState | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``state``: the cell, ``h`` and ``c`` per layer, no ``c`` for
        a GRU or RNN, and ``extra``, where held);
        a number that is not finite (a diverged state) is null: JSON has no NaN."""
        out: dict[str, Any] = {
            "stream": self.stream,
            "partition": self.partition,
            "steps": self.steps,
            "offset": self.offset,
            "last_seen_ms": _finite(self.last_seen_s * 1000.0),
            "ready": self.ready,
            "model": self.model,
            "prediction": None if self.prediction is None else [*map(_finite, self.prediction)],
            "score": None if self.score is None else _finite(self.score),
        }
        if self.state is not None:
            out["state"] = {
                "cell": self.state.cell,
                "h": [[*map(_finite, h.tolist())] for h in self.state.h],
                "c": [[*map(_finite, c.tolist())] for c in self.state.c],
                "extra": [*map(_finite, self.state.extra)],
            }
        return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: None for a number that is not finite."""
    return value if math.isfinite(value) else None

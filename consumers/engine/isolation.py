"""One failing tick never stops the others: a step that raises is taken again tick by tick.

This runs where the engine is (the engine's child process), before the next
request is read, so the ticks are still applied in order: the parent has
usually sent the next batch already, and retrying there would apply that
batch before the rest of this one. It is a rare path (a bug, not bad input:
the codec and the engine refuse bad input one tick at a time, and a call the
engine refuses as a whole still raises its ``StreamLSTMError``); a tick whose
own step fails is refused with the error (field ``engine``), and becomes a
dead letter.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from streamlstm import StepResult
from streamlstm.engine import Rejection
from streamlstm.errors import StreamLSTMError

if TYPE_CHECKING:  # engine.process imports this module
    from streamlstm.consumers.engine.protocol import StepRequest

__all__ = ["concat_results", "slice_request", "step_isolated"]

logger = logging.getLogger(__name__)


def step_isolated(
    step: Callable[[StepRequest], StepResult], request: StepRequest, outputs: int
) -> StepResult:
    """``step(request)``; if it raises, each tick alone, in order, the failing ones refused."""
    try:
        return step(request)
    except StreamLSTMError:
        raise  # the call itself is wrong (shapes, lengths): the caller hears it as it is
    except Exception:
        logger.warning(
            "a step of %d ticks failed; taking them one at a time",
            len(request.stream_ids),
            exc_info=True,
        )
    parts: list[tuple[int, StepResult]] = []
    failures: list[Rejection] = []
    for i in range(len(request.stream_ids)):
        try:
            parts.append((1, step(slice_request(request, i, i + 1))))
        except Exception as exc:
            failures.append(Rejection(i, "engine", f"step failed: {exc!r}"))
            parts.append((1, _refused(outputs)))
    return concat_results(parts, failures)


def slice_request(request: StepRequest, start: int, stop: int) -> StepRequest:
    """The ticks ``start:stop`` of a request (its gaps and no controls)."""
    return dataclasses.replace(
        request,
        stream_ids=request.stream_ids[start:stop],
        features=request.features[start:stop],
        resets=request.resets[start:stop],
        ends=request.ends[start:stop],
        timestamps=request.timestamps[start:stop],
        offsets=request.offsets[start:stop],
        partitions=request.partitions[start:stop],
        controls=(),
    )


def _refused(outputs: int) -> StepResult:
    """The result of one tick that was not stepped."""
    return StepResult(
        np.full((1, outputs), np.nan, np.float32),
        np.zeros(1, np.int64),
        np.zeros(1, bool),
        np.zeros(1, bool),
        scores=np.full(1, np.nan),
    )


def concat_results(
    parts: list[tuple[int, StepResult]], failures: Sequence[Rejection] = ()
) -> StepResult:
    """One call's result from the results of its consecutive slices, each with its size
    (``failures``: rejections of rows of the whole call, added as they are)."""
    starts = np.cumsum([0] + [size for size, _ in parts]).tolist()
    rejections = [
        Rejection(start + r.index, r.field, r.reason)
        for start, (_, part) in zip(starts, parts, strict=False)
        for r in part.rejections
    ]

    def column(name: str, blank: Callable[[int], Any]) -> Any:
        values = [getattr(p, name) for _, p in parts]
        return np.concatenate(
            [
                v if v is not None and v.shape[:1] == (size,) else blank(size)
                for (size, _), v in zip(parts, values, strict=True)
            ]
        )

    nothing = not any(p.skipped.size for _, p in parts)
    return StepResult(
        column("predictions", lambda n: np.zeros((n, 0), np.float32)),
        column("steps", lambda n: np.zeros(n, np.int64)),
        column("ready", lambda n: np.zeros(n, bool)),
        column("accepted", lambda n: np.zeros(n, bool)),
        rejections=sorted([*rejections, *failures], key=lambda r: r.index),
        evictions=[e for _, p in parts for e in p.evictions],
        scores=column("scores", lambda n: np.full(n, np.nan)),
        # A tick whose stream's state already reflected it stays unanswered here too.
        skipped=np.zeros(0, dtype=bool) if nothing else column("skipped", _nots),
        threshold=next((p.threshold for _, p in parts if p.threshold is not None), None),
        flags=(
            column("flags", lambda n: np.full(n, np.nan))
            if any(p.flags is not None for _, p in parts)
            else None
        ),
    )


def _nots(n: int) -> npt.NDArray[np.bool_]:
    return np.zeros(n, dtype=bool)

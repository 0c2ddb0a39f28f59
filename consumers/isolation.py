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
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from streamlstm import StepResult
from streamlstm.engine import Rejection
from streamlstm.errors import StreamLSTMError

if TYPE_CHECKING:  # engine_process imports this module
    from streamlstm.consumers.engine_protocol import StepRequest

__all__ = ["step_isolated"]

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
    parts: list[StepResult] = []
    failures: list[Rejection] = []
    for i in range(len(request.stream_ids)):
        one = dataclasses.replace(
            request,
            stream_ids=request.stream_ids[i : i + 1],
            features=request.features[i : i + 1],
            resets=request.resets[i : i + 1],
            ends=request.ends[i : i + 1],
            timestamps=request.timestamps[i : i + 1],
            offsets=request.offsets[i : i + 1],
            partitions=request.partitions[i : i + 1],
        )
        try:
            parts.append(step(one))
        except Exception as exc:
            failures.append(Rejection(i, "engine", f"step failed: {exc!r}"))
            parts.append(_refused(outputs))
    return _concat(parts, failures)


_NAN = np.full(1, np.nan)
_NOT = np.zeros(1, dtype=bool)


def _refused(outputs: int) -> StepResult:
    """The result of one tick that was not stepped."""
    return StepResult(
        np.full((1, outputs), np.nan, np.float32),
        np.zeros(1, np.int64),
        np.zeros(1, bool),
        np.zeros(1, bool),
        scores=np.full(1, np.nan),
    )


def _concat(parts: list[StepResult], failures: list[Rejection]) -> StepResult:
    """One call's result from one-tick results, in order."""
    rejections = [
        Rejection(i, r.field, r.reason) for i, part in enumerate(parts) for r in part.rejections
    ]
    return StepResult(
        np.concatenate([p.predictions for p in parts]),
        np.concatenate([p.steps for p in parts]),
        np.concatenate([p.ready for p in parts]),
        np.concatenate([p.accepted for p in parts]),
        rejections=sorted(rejections + failures, key=lambda r: r.index),
        evictions=[e for p in parts for e in p.evictions],
        scores=np.concatenate(
            [p.scores if p.scores.size == 1 else np.full(1, np.nan) for p in parts]
        ),
        # A tick whose stream's state already reflected it stays unanswered here too.
        skipped=(
            np.concatenate([p.skipped if p.skipped.size == 1 else _NOT for p in parts])
            if any(p.skipped.size for p in parts)
            else np.zeros(0, dtype=bool)
        ),
        threshold=next((p.threshold for p in parts if p.threshold is not None), None),
        flags=(
            np.concatenate(
                [p.flags if p.flags is not None and p.flags.size == 1 else _NAN for p in parts]
            )
            if any(p.flags is not None for p in parts)
            else None
        ),
    )

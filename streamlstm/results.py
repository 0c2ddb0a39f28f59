"""What ``Engine.step`` returns, and the engine's running figures."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from streamlstm.store import Eviction

if TYPE_CHECKING:  # the quality package builds on this module's types
    from streamlstm.cold_tier import ColdStats
    from streamlstm.quality.report import QualityReport, StreamError

__all__ = [
    "F32",
    "F64",
    "I64",
    "UNDEFINED",
    "Bools",
    "EngineStats",
    "Rejection",
    "StepResult",
    "Undefined",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class Undefined(enum.Enum):
    """``StepResult.anomaly``: the model flags, but not this tick yet (its score is not
    yet defined; the daemon writes it as null)."""

    UNDEFINED = "undefined"


#: The flag of a tick whose score is not yet defined: written as null.
UNDEFINED = Undefined.UNDEFINED


@dataclass(frozen=True)
class Rejection:
    """Tick ``index`` of the call was rejected: ``field`` is wrong for ``reason``."""

    index: int
    field: str
    reason: str


@dataclass(frozen=True, eq=False)
class StepResult:
    """What one ``Engine.step`` call produced; row i answers tick i.

    ``predictions`` float32 ``[N, outputs]`` in target units (NaN on rejected
    rows); ``steps`` int64 ``[N]`` ticks since the stream's last reset,
    counting this one; ``ready`` ``[N]`` whether the stream is past warm-up;
    ``accepted`` ``[N]`` false for rejected rows; ``scores`` float64 ``[N]``
    the anomaly score (``|z|`` of the forecast residual; NaN while a stream
    has too few residuals, on rejected rows, or when the model has no score);
    ``skipped`` ``[N]`` true for ticks not applied because the stream's state
    already reflects their offset (no state change, no answer; empty when the
    call skipped nothing); ``threshold`` the model's flag threshold (None: the
    model has none), which ``anomaly`` and ``anomalies`` apply to ``scores``;
    ``flags`` float64 ``[N]`` (1, 0, NaN while undefined) instead, where each
    stream's threshold adapts (``flag.AdaptiveFlag``; None: it is fixed).
    """

    predictions: F32
    steps: I64
    ready: Bools
    accepted: Bools
    rejections: list[Rejection] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)
    scores: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    skipped: Bools = field(default_factory=lambda: np.zeros(0, dtype=bool))
    threshold: float | None = None
    flags: F64 | None = None

    def anomaly(self, i: int) -> bool | Undefined | None:
        """Whether tick ``i`` is flagged (its score above the threshold), as
        ``encode_prediction`` takes it: ``UNDEFINED`` while the score is NaN,
        None when the model has no threshold."""
        if self.threshold is None or i >= self.scores.size:
            return None
        if self.flags is not None:
            flag = float(self.flags[i])
            return UNDEFINED if flag != flag else flag > 0.5
        score = float(self.scores[i])
        return UNDEFINED if score != score else score > self.threshold

    def anomalies(self) -> npt.NDArray[np.float64]:
        """``anomaly`` of every row as float64 ``[N]``: 1.0, 0.0 or NaN (undefined)."""
        if self.threshold is None:
            return np.full(self.scores.size, np.nan)
        if self.flags is not None:
            return self.flags
        return np.where(np.isnan(self.scores), np.nan, (self.scores > self.threshold) * 1.0)


@dataclass(frozen=True)
class EngineStats:
    active_streams: int
    capacity: int
    max_streams: int
    ticks: int
    rejected: int
    resets: int
    ends: int
    evictions: dict[str, int]
    #: Whether the recurrent step runs through the C kernels (else nn.LSTM).
    native: bool = False
    #: Ticks not applied: their stream's state already reflected their offset.
    skipped: int = 0
    #: The model's live quality figures (``Engine.quality``; None: not measured).
    quality: QualityReport | None = None
    #: The worst streams by recent error, where the holder ranks them (the daemon's
    #: engine child, now and then: ``Engine.worst_streams``); empty otherwise.
    worst_streams: tuple[StreamError, ...] = ()
    #: A shadow model run beside the served one on the same ticks, where the holder
    #: runs one (the daemon's engine child, ``--shadow-model``): its id ("" for none)
    #: and its live quality figures.
    shadow_model: str = ""
    shadow_quality: QualityReport | None = None
    #: The cold tier's figures (None: no cold tier).
    cold: ColdStats | None = None

"""``TrainOptions``: every choice ``streamlstm train`` makes, validated once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    features: tuple[str, ...]
    target: str | None = None
    time_column: str | None = None
    stream_column: str | None = None
    mode: str = "stateful"
    seq_len: int = 60
    hidden_size: int = 128
    num_layers: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 50
    clip_norm: float = 1.0
    patience: int = 10
    train_fraction: float = 0.8
    horizon: int = 1
    burn_in: int = 10
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    task: str = "forecast"
    label_column: str | None = None
    target_transform: str = "auto"
    season: int | None = None
    score_span: int = 100
    max_gap_factor: float | None = 5.0
    missing: str = "error"

    def __post_init__(self) -> None:
        if self.missing not in ("error", "interpolate", "ffill", "drop"):
            raise ConfigError(
                f"missing: must be error, interpolate, ffill or drop, got {self.missing!r}"
            )
        if self.task not in ("forecast", "classify"):
            raise ConfigError(f"task: must be forecast or classify, got {self.task!r}")
        if self.task == "classify" and not self.label_column:
            raise ConfigError("label_column: --task classify needs --label-column")
        if self.mode not in ("stateful", "window"):
            raise ConfigError(f"mode: must be stateful or window, got {self.mode!r}")
        if self.target_transform not in ("auto", "level", "diff"):
            raise ConfigError(
                f"target_transform: must be auto, level or diff, got {self.target_transform!r}"
            )
        if self.target_transform == "diff" and self.target_column not in self.features:
            raise ConfigError(
                f"target_transform: diff needs the target {self.target_column!r} among "
                "--features: the engine adds the forecast change to the tick's current value"
            )
        if self.season is not None and self.season < self.horizon:
            raise ConfigError(f"season: must be at least the horizon ({self.horizon})")
        for name in ("seq_len", "horizon", "epochs", "batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @property
    def target_column(self) -> str:
        return self.target or self.features[0]

    @property
    def shift(self) -> int:
        """How far ahead the target lies: the horizon, or 0 for a classifier's own tick."""
        return 0 if self.task == "classify" else self.horizon

"""``TrainOptions``: every choice ``streamlstm train`` makes, validated once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamlstm.config import CELLS
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
    #: Every layer's recurrent cell: ``lstm``, ``gru`` or ``rnn`` (``ModelConfig.cell``).
    cell: str = "lstm"
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
    #: CPU threads while training. One by default: float sums in another order train
    #: another model (an ECG excerpt's ROC AUC was 0.93 with one thread, 0.86 with
    #: two), and on a shared machine more threads were measured 10-100x slower.
    threads: int = 1
    device: str = "auto"
    progress: bool = True
    task: str = "forecast"
    label_column: str | None = None
    target_transform: str = "auto"
    season: int | None = None
    score_span: int | None = None
    score: str = "auto"
    score_horizons: int = 32
    #: The multi-horizon score's smoothing stages, and its baseline's span in ticks
    #: (None: ``BASELINE_SPANS`` x the smoothing span; 0: no baseline).
    score_stages: int = 2
    score_baseline_span: int | None = None
    false_alarm_rate: float = 0.01
    #: How fast each stream's flag threshold follows its own scores (log units a
    #: tick; 0: the threshold fitted on the training part stays fixed).
    threshold_step: float = 0.005
    max_gap_factor: float | None = 5.0
    missing: str = "error"

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads: must be at least 1, got {self.threads}")
        if self.missing not in ("error", "interpolate", "ffill", "drop"):
            raise ConfigError(
                f"missing: must be error, interpolate, ffill or drop, got {self.missing!r}"
            )
        if self.task not in ("forecast", "classify"):
            raise ConfigError(f"task: must be forecast or classify, got {self.task!r}")
        if self.task == "classify" and not self.label_column:
            raise ConfigError("label_column: --task classify needs --label-column")
        if self.cell not in CELLS:
            raise ConfigError(f"cell: must be one of {', '.join(CELLS)}, got {self.cell!r}")
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
        self._resolve_score()
        for name in ("seq_len", "horizon", "epochs", "batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")

    def _resolve_score(self) -> None:
        """``score`` auto: the multi-horizon score when anomaly labels are given."""
        if self.score not in ("auto", "residual", "horizons"):
            raise ConfigError(f"score: must be auto, residual or horizons, got {self.score!r}")
        if self.score_horizons < 1:
            raise ConfigError(f"score_horizons: must be at least 1, got {self.score_horizons}")
        if self.score_span is not None and self.score_span < 1:
            raise ConfigError(f"score_span: must be at least 1, got {self.score_span}")
        if self.score_stages < 1:
            raise ConfigError(f"score_stages: must be at least 1, got {self.score_stages}")
        if self.score_baseline_span is not None and self.score_baseline_span < 0:
            raise ConfigError(
                f"score_baseline_span: must be 0 (none) or more, got {self.score_baseline_span}"
            )
        if not (math.isfinite(self.threshold_step) and self.threshold_step >= 0):
            raise ConfigError(f"threshold_step: must be 0 or more, got {self.threshold_step}")
        if not 0 < self.false_alarm_rate < 1:
            raise ConfigError(
                f"false_alarm_rate: must lie between 0 and 1, got {self.false_alarm_rate}"
            )
        if not 0 < self.train_fraction < 1:
            raise ConfigError(
                f"train_fraction: must lie between 0 and 1, got {self.train_fraction}"
            )
        scorable = self.task == "forecast" and self.target_column in self.features
        if self.score == "horizons" and not (scorable and self.horizon == 1):
            raise ConfigError(
                "score: horizons needs a forecast of an input column (the target among "
                "--features) with --horizon 1"
            )
        if self.score == "auto":
            labeled = self.label_column is not None and scorable and self.horizon == 1
            object.__setattr__(self, "score", "horizons" if labeled else "residual")
        if self.score_span is None and self.score == "residual":
            # The multi-horizon score's default span is measured on the data (train).
            object.__setattr__(self, "score_span", 100)

    @property
    def outputs(self) -> int:
        """Model outputs of a forecaster: ``score_horizons`` for the multi-horizon score, else 1."""
        return self.score_horizons if self.score == "horizons" else 1

    @property
    def target_column(self) -> str:
        return self.target or self.features[0]

    @property
    def shift(self) -> int:
        """How far ahead the target lies: the horizon, or 0 for a classifier's own tick."""
        if self.task == "classify":
            return 0
        return self.score_horizons if self.score == "horizons" else self.horizon

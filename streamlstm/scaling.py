"""Affine scaling between original units and the units a model was trained in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError

__all__ = ["Affine"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class Affine:
    """``scaled = x * scale + offset`` per column.

    This is scikit-learn's ``MinMaxScaler`` (``scale_``, ``min_``) written as
    plain numbers, so a bundle never stores a pickled scaler.
    """

    scale: F32
    offset: F32

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        offset = np.asarray(self.offset, dtype=np.float32).reshape(-1)
        if scale.shape != offset.shape:
            raise ConfigError(
                f"scaler: scale has {scale.size} columns but offset has {offset.size}"
            )
        if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
            raise ConfigError("scaler: scale and offset must be finite")
        if (scale == 0).any():
            raise ConfigError("scaler: scale must not be zero")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "offset", offset)

    @classmethod
    def from_min_max(
        cls, minimum: Sequence[float] | npt.ArrayLike, maximum: Sequence[float] | npt.ArrayLike
    ) -> Affine:
        """Map ``[minimum, maximum]`` onto ``[0, 1]``; a constant column maps to 0."""
        lo = np.asarray(minimum, dtype=np.float64)
        hi = np.asarray(maximum, dtype=np.float64)
        span = hi - lo
        span[span == 0] = 1.0
        return cls(scale=(1.0 / span).astype(np.float32), offset=(-lo / span).astype(np.float32))

    @property
    def width(self) -> int:
        return int(self.scale.size)

    def apply(self, x: npt.NDArray[Any]) -> F32:
        return (np.asarray(x, dtype=np.float32) * self.scale + self.offset).astype(
            np.float32, copy=False
        )

    def invert(self, y: npt.NDArray[Any]) -> F32:
        return ((np.asarray(y, dtype=np.float32) - self.offset) / self.scale).astype(
            np.float32, copy=False
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {"scale": self.scale.tolist(), "offset": self.offset.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Affine:
        try:
            return cls(scale=np.asarray(data["scale"]), offset=np.asarray(data["offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"scaler: needs numeric 'scale' and 'offset' lists ({exc})") from exc

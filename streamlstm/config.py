"""Model configuration: everything needed to rebuild a model from its weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from streamlstm.errors import ConfigError

__all__ = ["CELLS", "ModelConfig", "gate_count"]

_ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")

#: The recurrent cells a model may be made of (all its layers one cell): torch's
#: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh).
CELLS = ("lstm", "gru", "rnn")


def gate_count(cell: str) -> int:
    """Gate blocks of a layer's ``weight_ih``/``weight_hh`` rows, as torch stacks them:
    4 for an LSTM (i, f, g, o), 3 for a GRU (r, z, n), 1 for a plain RNN."""
    return {"lstm": 4, "gru": 3, "rnn": 1}[cell]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a stacked recurrent model with an MLP head.

    ``cell`` is the recurrent cell of every layer: ``"lstm"`` (``nn.LSTM``, the
    default), ``"gru"`` (``nn.GRU``) or ``"rnn"`` (``nn.RNN`` with tanh); a GRU or
    RNN stream keeps ``h`` alone, half an LSTM's state. ``hidden_sizes`` lists one
    hidden size per recurrent layer (the Keras tutorial model is ``(128, 64)``);
    ``head_sizes`` lists the hidden widths of the MLP head between the top layer
    and the ``output_size`` outputs. ``dropout`` applies between recurrent layers
    and at the start of the head, in training only.
    """

    input_size: int = 1
    hidden_sizes: tuple[int, ...] = (128, 128)
    head_sizes: tuple[int, ...] = (64,)
    output_size: int = 1
    dropout: float = 0.2
    head_activation: str = "relu"
    bidirectional: bool = False
    cell: str = "lstm"

    def __post_init__(self) -> None:
        # Accept lists from JSON and callers; store tuples so the config hashes.
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        object.__setattr__(self, "head_sizes", tuple(self.head_sizes))
        _positive_int("input_size", self.input_size)
        _positive_int("output_size", self.output_size)
        if not self.hidden_sizes:
            raise ConfigError("hidden_sizes: at least one recurrent layer is required")
        for i, size in enumerate(self.hidden_sizes):
            _positive_int(f"hidden_sizes[{i}]", size)
        for i, size in enumerate(self.head_sizes):
            _positive_int(f"head_sizes[{i}]", size)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not math.isfinite(self.dropout)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        if self.head_activation not in _ACTIVATIONS:
            raise ConfigError(
                f"head_activation: must be one of {', '.join(_ACTIVATIONS)}, "
                f"got {self.head_activation!r}"
            )
        if self.cell not in CELLS:
            raise ConfigError(f"cell: must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.bidirectional:
            raise ConfigError(
                "bidirectional: a bidirectional LSTM cannot stream. Its backward direction "
                "reads each sequence starting from the last tick, which has not arrived when "
                "a prediction is due; train a unidirectional (causal) model instead"
            )

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def keeps_c(self) -> bool:
        """Whether a stream's state holds ``c`` besides ``h`` (an LSTM's does)."""
        return self.cell == "lstm"

    def to_dict(self) -> dict[str, Any]:
        """The config as bundle.json holds it. ``cell`` is written for a GRU or RNN only:
        a bundle without it is an LSTM's, so an LSTM bundle reads as before in a
        streamlstm that knows no cells (one that does not refuses a GRU's, naming
        the field)."""
        out: dict[str, Any] = {
            "input_size": self.input_size,
            "hidden_sizes": list(self.hidden_sizes),
            "head_sizes": list(self.head_sizes),
            "output_size": self.output_size,
            "dropout": self.dropout,
            "head_activation": self.head_activation,
        }
        if self.cell != "lstm":
            out["cell"] = self.cell
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ConfigError(f"model config: {exc}") from exc


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")

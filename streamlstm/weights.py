"""A model's weights as NumPy arrays: what serving needs, with no training framework.

The names and shapes are those of ``StreamLSTM.state_dict()`` (the torch
module that training and the offline oracle use), so a bundle's
``model.safetensors`` reads and writes the same either way:

- ``lstm.{g}.weight_ih_l{j}`` ``[4H, F]``, ``lstm.{g}.weight_hh_l{j}`` ``[4H, H]``,
  ``lstm.{g}.bias_ih_l{j}`` / ``bias_hh_l{j}`` ``[4H]`` for layer ``j`` of
  layer group ``g`` (consecutive layers of one hidden size), gate order
  (i, f, g, o) as in ``nn.LSTM``;
- ``head.{k}.weight`` ``[out, in]`` and ``head.{k}.bias`` ``[out]`` for the
  head's linears, where ``k`` is the linear's index in the head's
  ``nn.Sequential`` (dropout first, then linear and activation pairs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamlstm.config import ModelConfig
from streamlstm.errors import ConfigError

__all__ = ["HeadLinear", "LayerGroup", "LayerWeights", "ModelWeights", "layer_groups"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LayerGroup:
    """Consecutive LSTM layers ``first .. first + count - 1`` of one hidden size."""

    first: int
    count: int
    hidden_size: int


def layer_groups(hidden_sizes: Sequence[int]) -> tuple[LayerGroup, ...]:
    groups: list[LayerGroup] = []
    for layer, size in enumerate(hidden_sizes):
        if groups and groups[-1].hidden_size == size:
            last = groups[-1]
            groups[-1] = LayerGroup(last.first, last.count + 1, size)
        else:
            groups.append(LayerGroup(layer, 1, size))
    return tuple(groups)


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One LSTM layer: ``w_ih [4H, F]``, ``w_hh [4H, H]``, ``b_ih [4H]``, ``b_hh [4H]``."""

    w_ih: F32
    w_hh: F32
    b_ih: F32
    b_hh: F32

    @property
    def hidden_size(self) -> int:
        return int(self.w_hh.shape[1])

    def fused(self) -> tuple[F32, F32]:
        """``([W_ih, W_hh]^T [F + H, 4H], b_ih + b_hh [4H])``, contiguous: one product
        ``[x, h] @ W`` gives a step's gates."""
        weight = np.ascontiguousarray(np.concatenate([self.w_ih, self.w_hh], axis=1).T)
        return weight, np.ascontiguousarray(self.b_ih + self.b_hh)


@dataclass(frozen=True, eq=False)
class HeadLinear:
    """One head linear, ``y = act(x @ weight.T + bias)``: ``weight [out, in]``, ``bias [out]``;
    ``activation`` is ``""`` (none), ``"relu"``, ``"tanh"`` or ``"sigmoid"``."""

    weight: F32
    bias: F32
    activation: str


class ModelWeights:
    """Every weight of a model of ``config``, float32, by ``state_dict`` name."""

    def __init__(self, config: ModelConfig, tensors: Mapping[str, npt.ArrayLike]) -> None:
        expected = expected_shapes(config)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected)}")
            raise ConfigError(f"tensors do not match the model config ({'; '.join(parts)})")
        arrays: dict[str, F32] = {}
        for key, shape in expected.items():
            value = np.asarray(tensors[key])
            if tuple(value.shape) != shape:
                raise ConfigError(
                    f"tensor {key} has shape {list(value.shape)}, "
                    f"the model config needs {list(shape)}"
                )
            if value.dtype != np.float32:
                raise ConfigError(f"tensor {key} has dtype {value.dtype}, expected float32")
            array = np.array(value, dtype=np.float32, copy=True)
            array.flags.writeable = False
            arrays[key] = array
        self.config = config
        self.tensors: Mapping[str, F32] = arrays
        self.layers = tuple(
            LayerWeights(*(arrays[f"{prefix}_l{j}"] for prefix in _lstm_prefixes(g)))
            for g, group in enumerate(layer_groups(config.hidden_sizes))
            for j in range(group.count)
        )
        activation = "" if config.head_activation == "linear" else config.head_activation
        names = _head_names(config)
        self.head = tuple(
            HeadLinear(
                arrays[f"{name}.weight"],
                arrays[f"{name}.bias"],
                activation if index < len(names) - 1 else "",
            )
            for index, name in enumerate(names)
        )

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> ModelWeights:
        """Weights drawn as ``nn.LSTM``/``nn.Linear`` initialise theirs (uniform in
        ``±1/sqrt(fan)``), from NumPy's generator: not torch's numbers."""
        rng = np.random.default_rng(seed)
        tensors: dict[str, F32] = {}
        for key, shape in expected_shapes(config).items():
            if key.startswith("lstm"):
                fan = shape[1] if "weight_hh" in key else shape[0] // 4
            else:
                fan = _head_fan_in(config, key)
            bound = 1.0 / np.sqrt(fan)
            tensors[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        return cls(config, tensors)


def _lstm_prefixes(group: int) -> tuple[str, ...]:
    return tuple(
        f"lstm.{group}.{name}" for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


def _head_names(config: ModelConfig) -> list[str]:
    """The head linears' module names: ``head.1``, ``head.3``, ... (dropout at 0, then
    a linear and its activation per hidden size, then the output linear)."""
    return [f"head.{1 + 2 * k}" for k in range(len(config.head_sizes) + 1)]


def _head_fan_in(config: ModelConfig, key: str) -> int:
    widths = [config.hidden_sizes[-1], *config.head_sizes]
    index = _head_names(config).index(key.rsplit(".", 1)[0])
    return widths[index]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model of ``config``: its ``state_dict`` name and shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    width = config.input_size
    for g, group in enumerate(layer_groups(config.hidden_sizes)):
        hidden = group.hidden_size
        for j in range(group.count):
            w_ih, w_hh, b_ih, b_hh = (f"{p}_l{j}" for p in _lstm_prefixes(g))
            shapes[w_ih] = (4 * hidden, width if j == 0 else hidden)
            shapes[w_hh] = (4 * hidden, hidden)
            shapes[b_ih] = (4 * hidden,)
            shapes[b_hh] = (4 * hidden,)
        width = hidden
    outs = [*config.head_sizes, config.output_size]
    for name, out in zip(_head_names(config), outs, strict=True):
        shapes[f"{name}.weight"] = (out, width)
        shapes[f"{name}.bias"] = (out,)
        width = out
    return shapes

"""A model's weights as NumPy arrays: what serving needs, with no training framework.

The names and shapes are those of ``StreamLSTM.state_dict()`` (the torch
module that training and the offline oracle use), so a bundle's
``model.safetensors`` reads and writes the same either way:

- ``lstm.{g}.weight_ih_l{j}`` ``[GH, F]``, ``lstm.{g}.weight_hh_l{j}`` ``[GH, H]``,
  ``lstm.{g}.bias_ih_l{j}`` / ``bias_hh_l{j}`` ``[GH]`` for layer ``j`` of
  layer group ``g`` (consecutive layers of one hidden size), ``G`` gate blocks
  in torch's order: 4 for an LSTM (i, f, g, o, ``nn.LSTM``), 3 for a GRU
  (r, z, n, ``nn.GRU``), 1 for a plain RNN (``nn.RNN``). The module list is
  named ``lstm`` whatever the cell, so LSTM bundles read as they always did;
- ``head.{k}.weight`` ``[out, in]`` and ``head.{k}.bias`` ``[out]`` for the
  head's linears, where ``k`` is the linear's index in the head's
  ``nn.Sequential`` (dropout first, then linear and activation pairs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamlstm.config import ModelConfig, gate_count
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
    """One recurrent layer of ``cell``: ``w_ih [GH, F]``, ``w_hh [GH, H]``, ``b_ih [GH]``,
    ``b_hh [GH]`` (``G`` gate blocks, ``config.gate_count``)."""

    w_ih: F32
    w_hh: F32
    b_ih: F32
    b_hh: F32
    cell: str = "lstm"

    @property
    def hidden_size(self) -> int:
        return int(self.w_hh.shape[1])

    @property
    def fused_width(self) -> int:
        """Columns of ``fused()``'s weight: ``4H`` for an LSTM and a GRU, ``H`` for an RNN."""
        return (1 if self.cell == "rnn" else 4) * self.hidden_size

    def fused(self) -> tuple[F32, F32]:
        """``(W [F + H, K], bias [K])``, contiguous: one product ``[x, h] @ W`` plus
        ``bias`` gives a step's gate sums, ``K = fused_width`` columns.

        LSTM and RNN: ``W = [W_ih, W_hh]^T``, ``bias = b_ih + b_hh`` (gates i, f, g,
        o; the RNN's one block). GRU: four blocks of ``H`` columns, ``r``, ``z``,
        ``n_x``, ``n_h``: ``r`` and ``z`` over ``[x, h]`` with ``b_i* + b_h*``, then
        the ``n`` gate's input part ``W_in x + b_in`` (zero rows for ``h``) and its
        hidden part ``W_hn h + b_hn`` (zero rows for ``x``) apart, because ``r``
        multiplies the hidden part alone: ``n = tanh(n_x + r * n_h)``. The zero
        blocks cost the product ``H (F + H)`` multiply-adds of its ``4H (F + H)``;
        in return a GRU layer is one product, as an LSTM's is.
        """
        hidden, inputs = self.hidden_size, int(self.w_ih.shape[1])
        stacked = np.concatenate([self.w_ih, self.w_hh], axis=1)
        if self.cell != "gru":
            return np.ascontiguousarray(stacked.T), np.ascontiguousarray(self.b_ih + self.b_hh)
        rz = slice(0, 2 * hidden)
        n = slice(2 * hidden, 3 * hidden)
        weight = np.zeros((4 * hidden, inputs + hidden), dtype=np.float32)
        weight[rz] = stacked[rz]
        weight[n, :inputs] = self.w_ih[n]
        weight[3 * hidden :, inputs:] = self.w_hh[n]
        bias = np.concatenate([self.b_ih[rz] + self.b_hh[rz], self.b_ih[n], self.b_hh[n]])
        return np.ascontiguousarray(weight.T), np.ascontiguousarray(bias, dtype=np.float32)


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
            _layer(arrays, g, j, config.cell)
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
        """Weights drawn as ``nn.LSTM``/``nn.GRU``/``nn.RNN``/``nn.Linear`` initialise
        theirs (uniform in ``±1/sqrt(fan)``), from NumPy's generator: not torch's numbers."""
        rng = np.random.default_rng(seed)
        tensors: dict[str, F32] = {}
        gates = gate_count(config.cell)
        for key, shape in expected_shapes(config).items():
            if key.startswith("lstm"):
                fan = shape[1] if "weight_hh" in key else shape[0] // gates
            else:
                fan = _head_fan_in(config, key)
            bound = 1.0 / np.sqrt(fan)
            tensors[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        return cls(config, tensors)


def _layer(arrays: Mapping[str, F32], group: int, j: int, cell: str) -> LayerWeights:
    w_ih, w_hh, b_ih, b_hh = (arrays[f"{prefix}_l{j}"] for prefix in _lstm_prefixes(group))
    return LayerWeights(w_ih, w_hh, b_ih, b_hh, cell)


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
    gates = gate_count(config.cell)
    for g, group in enumerate(layer_groups(config.hidden_sizes)):
        hidden = group.hidden_size
        for j in range(group.count):
            w_ih, w_hh, b_ih, b_hh = (f"{p}_l{j}" for p in _lstm_prefixes(g))
            shapes[w_ih] = (gates * hidden, width if j == 0 else hidden)
            shapes[w_hh] = (gates * hidden, hidden)
            shapes[b_ih] = (gates * hidden,)
            shapes[b_hh] = (gates * hidden,)
        width = hidden
    outs = [*config.head_sizes, config.output_size]
    for name, out in zip(_head_names(config), outs, strict=True):
        shapes[f"{name}.weight"] = (out, width)
        shapes[f"{name}.bias"] = (out,)
        width = out
    return shapes

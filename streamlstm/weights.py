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

__all__ = [
    "HeadLinear",
    "LayerGroup",
    "LayerWeights",
    "ModelWeights",
    "gru_n_h_apart",
    "layer_groups",
]

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
        """Columns of a step's gate sums: ``4H`` for an LSTM and a GRU, ``H`` for an RNN."""
        return (1 if self.cell == "rnn" else 4) * self.hidden_size

    @property
    def n_h_apart(self) -> bool:
        """A GRU's: whether ``W_hn h`` is a product of its own (``gru_apart``), not columns
        of the ``[x, h]`` product (see ``gru_n_h_apart``)."""
        return gru_n_h_apart(int(self.w_ih.shape[1]), self.hidden_size)

    def fused(self) -> tuple[F32, F32]:
        """``(W [F + H, K], bias [fused_width])``, contiguous: the product ``[x, h] @ W``
        plus ``bias`` gives a step's gate sums (a GRU's with ``gru_apart``'s products).

        LSTM and RNN: ``W = [W_ih, W_hh]^T`` (``K = fused_width``), ``bias = b_ih + b_hh``
        (gates i, f, g, o; the RNN's one block). GRU: the gate sums are four blocks of
        ``H`` columns, ``r``, ``z``, ``n_h``, ``n_x``, with biases ``b_i* + b_h*``,
        ``b_hn``, ``b_in``: the ``n`` gate's hidden part ``W_hn h`` and input part
        ``W_in x`` apart, because ``r`` multiplies the hidden part alone:
        ``n = tanh(n_x + r * n_h)``. ``W`` holds ``r`` and ``z`` over ``[x, h]`` and,
        unless ``n_h_apart``, ``n_h`` (zero rows for ``x``): ``K`` is ``3H`` or ``2H``.
        ``n_x`` (and ``n_h`` where apart) come from ``gru_apart``'s products, so a GRU
        layer multiplies no more than ``nn.GRU``'s ``3H (F + H)`` a row but for those
        ``F H`` zeros.
        """
        hidden = self.hidden_size
        stacked = np.concatenate([self.w_ih, self.w_hh], axis=1)
        if self.cell != "gru":
            return np.ascontiguousarray(stacked.T), np.ascontiguousarray(self.b_ih + self.b_hh)
        rz, n = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
        weight = stacked[rz]
        if not self.n_h_apart:
            n_h = np.concatenate([np.zeros_like(self.w_ih[n]), self.w_hh[n]], axis=1)
            weight = np.concatenate([weight, n_h])
        bias = np.concatenate([self.b_ih[rz] + self.b_hh[rz], self.b_hh[n], self.b_ih[n]])
        return np.ascontiguousarray(weight.T), np.ascontiguousarray(bias, dtype=np.float32)

    def gru_apart(self) -> tuple[F32 | None, F32]:
        """A GRU's products beside ``fused()``'s: ``(W_hn^T [H, H] or None, W_in^T [F, H])``,
        contiguous: ``h @ W_hn^T`` is the ``n_h`` block where ``n_h_apart`` (None where it
        is ``fused()``'s), ``x @ W_in^T`` the ``n_x`` block."""
        n = slice(2 * self.hidden_size, 3 * self.hidden_size)
        n_h = np.ascontiguousarray(self.w_hh[n].T) if self.n_h_apart else None
        return n_h, np.ascontiguousarray(self.w_ih[n].T)


def gru_n_h_apart(inputs: int, hidden: int) -> bool:
    """Whether a GRU layer of ``inputs`` and ``hidden`` computes ``W_hn h`` as a product of
    its own rather than as ``H`` more columns of the ``[x, h]`` product.

    Those columns multiply ``F`` zero rows (``x``'s) each: ``F H`` wasted multiply-adds a
    row. A product of its own wastes none but is narrow (``H`` columns, which OpenBLAS
    runs at a lower rate) and packs ``h`` again. Measured (OpenBLAS, one thread, a chunk
    of 256 rows, ``H`` 128; 64 alike): joined is faster for a narrow input (F 1: 175
    against 183 us; the default model's first layer), the two even about ``F = H / 8``
    (F 16: 195 and 197), apart faster from ``H / 4`` on (F 32: 215 against 223; F 128,
    the default model's second layer: 337 against 380).
    """
    return 8 * inputs > hidden


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

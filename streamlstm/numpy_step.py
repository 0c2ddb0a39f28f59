"""The recurrent step and the head in NumPy, for where the C kernels are not built.

Same arithmetic as the C step (``kernels.NativeStep``): per layer one product
``[x, h] @ [W_ih, W_hh]^T`` plus ``b_ih + b_hh``, the LSTM cell in float32,
new ``h`` and ``c`` written back at the streams' slots; then the head. The
answers agree with the C step and with ``nn.LSTM`` to float32 rounding (the
parity tests run every path against the ``nn.LSTM`` oracle). Slower: NumPy
gathers ``h`` and ``c`` into a batch and scatters them back, and each gate
is a separate pass over memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamlstm.weights import HeadLinear, ModelWeights

__all__ = ["NumpyStep", "run_head"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _sigmoid(x: F32) -> F32:
    # exp of -x overflows to inf for x < -88: 1 / inf is the right 0.
    with np.errstate(over="ignore"):
        return np.reciprocal(np.float32(1.0) + np.exp(-x))


def _activate(y: F32, name: str) -> F32:
    if name == "relu":
        return np.maximum(y, np.float32(0.0), out=y)
    if name == "tanh":
        return np.tanh(y, out=y)
    if name == "sigmoid":
        return _sigmoid(y)
    return y


def run_head(linears: Sequence[HeadLinear], x: F32) -> F32:
    """The head over ``x [N, H_top]``: ``[N, outputs]``, a new array."""
    out = x
    for linear in linears:
        out = out @ linear.weight.T
        out += linear.bias
        out = _activate(out, linear.activation)
    return np.ascontiguousarray(out, dtype=np.float32)


class NumpyStep:
    """One recurrent step and the head for distinct slots, state updated in place."""

    runs_head = True

    def __init__(self, weights: ModelWeights) -> None:
        self._layers = [layer.fused() for layer in weights.layers]
        self._head = weights.head

    def __call__(self, h: Sequence[F32], c: Sequence[F32], slots: I64, x: F32) -> F32:
        """Step ``x [n, F]`` (scaled) for distinct ``slots [n]`` of the store's ``h``, ``c``
        (``[capacity, H_l]`` float32 per layer, updated at ``slots``); returns ``[n, O]``."""
        inp = np.asarray(x, dtype=np.float32)
        for (weight, bias), h_l, c_l in zip(self._layers, h, c, strict=True):
            gates = np.concatenate([inp, h_l[slots]], axis=1) @ weight
            gates += bias
            i, f, g, o = np.split(gates, 4, axis=1)
            c_new = _sigmoid(f) * c_l[slots] + _sigmoid(i) * np.tanh(g)
            h_new = _sigmoid(o) * np.tanh(c_new)
            c_l[slots] = c_new
            h_l[slots] = h_new
            inp = h_new
        return run_head(self._head, inp)

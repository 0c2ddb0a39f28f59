"""The recurrent step and the head in NumPy, for where the C kernels are not built.

Same arithmetic as the C step (``kernels.NativeStep``): per layer the product
``[x, h] @ W`` plus the bias (``LayerWeights.fused``: ``[W_ih, W_hh]^T`` and
``b_ih + b_hh`` for an LSTM or RNN; a GRU's ``r``, ``z``, ``n_h``, ``n_x``
blocks, ``n_x`` and perhaps ``n_h`` from products of their own,
``LayerWeights.gru_apart``), the cell in float32, the new ``h`` (and an
LSTM's ``c``) written back at the streams' slots; then the head. The answers agree with the C step
and with torch's ``nn.LSTM``/``nn.GRU``/``nn.RNN`` to float32 rounding (the
parity tests run every path against the torch oracle). Slower: NumPy gathers
the state into a batch and scatters it back, and each gate is a separate
pass over memory.
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
        self._apart = [
            layer.gru_apart() if layer.cell == "gru" else None for layer in weights.layers
        ]
        self._head = weights.head
        self._cell = weights.config.cell

    def __call__(self, h: Sequence[F32], c: Sequence[F32], slots: I64, x: F32) -> F32:
        """Step ``x [n, F]`` (scaled) for distinct ``slots [n]`` of the store's ``h``, ``c``
        (``[capacity, H_l]`` float32 per layer, updated at ``slots``; ``c`` empty for a
        GRU or RNN); returns ``[n, O]``."""
        inp = np.asarray(x, dtype=np.float32)
        for layer, (weight, bias) in enumerate(self._layers):
            h_l = h[layer]
            h_old = h_l[slots]
            gates = np.concatenate([inp, h_old], axis=1) @ weight
            apart = self._apart[layer]
            if apart is not None:  # a GRU's n_h (unless in W) and n_x
                n_h, n_x = apart
                parts = [gates] if n_h is None else [gates, h_old @ n_h]
                gates = np.concatenate([*parts, inp @ n_x], axis=1)
            gates += bias
            if self._cell == "lstm":
                h_new = _lstm_cell(gates, c[layer], slots)
            elif self._cell == "gru":
                h_new = _gru_cell(gates, h_old)
            else:
                h_new = np.tanh(gates)
            h_l[slots] = h_new
            inp = h_new
        return run_head(self._head, inp)


def _lstm_cell(gates: F32, c_l: F32, slots: I64) -> F32:
    """Gates (i, f, g, o) with their bias: ``c`` updated at ``slots``; the new ``h``."""
    i, f, g, o = np.split(gates, 4, axis=1)
    c_new = _sigmoid(f) * c_l[slots] + _sigmoid(i) * np.tanh(g)
    c_l[slots] = c_new
    h_new: F32 = _sigmoid(o) * np.tanh(c_new)
    return h_new


def _gru_cell(gates: F32, h_old: F32) -> F32:
    """Blocks (r, z, n_h, n_x) with their bias, as torch's ``nn.GRU``:
    ``n = tanh(n_x + r * n_h)``, ``h' = (1 - z) * n + z * h``."""
    r, z, n_h, n_x = np.split(gates, 4, axis=1)
    z = _sigmoid(z)
    n = np.tanh(n_x + _sigmoid(r) * n_h)
    h_new: F32 = (np.float32(1.0) - z) * n + z * h_old
    return h_new

"""The model as a torch module: stacked recurrent layers and an MLP head, f(input, state).

Training, the importers and the offline oracle (``Bundle.predict_sequence``)
use it; serving does not (the engine steps from ``weights.ModelWeights``
through the C kernels or NumPy), so this module is the one place in the core
that imports torch, and only the ``train`` extra installs it.

Every layer is one cell, ``ModelConfig.cell``: torch's own ``nn.LSTM``,
``nn.GRU`` or ``nn.RNN`` (tanh). Consecutive layers of equal hidden size are
held as one multi-layer module (a *group*, ``weights.layer_groups``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from streamlstm.config import ModelConfig
from streamlstm.errors import ConfigError
from streamlstm.weights import LayerGroup, ModelWeights, layer_groups

__all__ = ["LSTMWeights", "LayerGroup", "State", "StreamLSTM", "layer_groups"]

#: Recurrent state, one tuple per layer: ``(h [B, H_l], c [B, H_l])`` for an LSTM,
#: ``(h [B, H_l],)`` for a GRU or an RNN.
State = tuple[tuple[Tensor, ...], ...]

#: One recurrent layer's weights in PyTorch's layout and gate order (an LSTM's
#: i, f, g, o; a GRU's r, z, n; an RNN's one block):
#: ``(w_ih [GH, F], w_hh [GH, H], b_ih [GH], b_hh [GH])``. Named for the LSTM, which
#: came first; any cell's layers are given so.
LSTMWeights = tuple[Tensor, Tensor, Tensor, Tensor]

_MODULES: dict[str, type[nn.LSTM] | type[nn.GRU] | type[nn.RNN]] = {
    "lstm": nn.LSTM,
    "gru": nn.GRU,
    "rnn": nn.RNN,
}


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    return nn.Identity()


class StreamLSTM(nn.Module):
    """Stacked unidirectional recurrent layers (LSTM, GRU or RNN) + MLP head with an
    output at every step.

    ``forward(x [B, T, F], state) -> (y [B, T, outputs], state)`` where
    ``state`` is one ``(h [B, H_l], c [B, H_l])`` pair per LSTM layer (``(h,)``
    for a GRU or RNN layer), ``None`` meaning zeros. Dropout acts between
    recurrent layers and at the head's input, in training mode only. The
    module list of the recurrent layers is named ``lstm`` whatever the cell
    (the ``state_dict`` names of ``weights``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.groups = layer_groups(config.hidden_sizes)
        lstms = []
        input_size = config.input_size
        module = _MODULES[config.cell]
        for group in self.groups:
            lstms.append(
                module(
                    input_size,
                    group.hidden_size,
                    num_layers=group.count,
                    batch_first=True,
                    dropout=config.dropout if group.count > 1 else 0.0,
                )
            )
            input_size = group.hidden_size
        self.lstm = nn.ModuleList(lstms)
        self.between = nn.Dropout(config.dropout)
        head: list[nn.Module] = [nn.Dropout(config.dropout)]
        width = config.hidden_sizes[-1]
        for size in config.head_sizes:
            head += [nn.Linear(width, size), _activation(config.head_activation)]
            width = size
        head.append(nn.Linear(width, config.output_size))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run ``x [B, T, F]`` from ``state``; return ``(y [B, T, O], state after T)``."""
        inp = x
        new_state: list[tuple[Tensor, ...]] = []
        for index, (group, lstm) in enumerate(zip(self.groups, self.lstm, strict=True)):
            if index:
                inp = self.between(inp)
            hx = None
            if state is not None:
                layers = state[group.first : group.first + group.count]
                # (h stacked, c stacked) for an LSTM; h stacked for a GRU or RNN.
                parts = tuple(torch.stack(part) for part in zip(*layers, strict=True))
                hx = parts if self.config.keeps_c else parts[0]
            inp, out = lstm(inp, hx)
            if self.config.keeps_c:
                new_state.extend((out[0][j], out[1][j]) for j in range(group.count))
            else:
                new_state.extend((out[j],) for j in range(group.count))
        return self.head(inp), tuple(new_state)

    def recurrent_step(
        self, x: Tensor, hs: Sequence[Tensor], cs: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """One recurrent step, no head, eval only.

        ``x [B, F]``; ``hs[g]``/``cs[g]`` are ``[count_g, B, H_g]`` per layer group
        (``cs`` empty for a GRU or RNN, which keep no ``c``). Returns the top
        layer's ``h [B, H_top]`` and the new per-group ``h``/``c``. The offline
        oracle steps through here: torch's own modules, never the engine's code.
        """
        inp = x.unsqueeze(1)
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        if not self.config.keeps_c:
            for rnn, h in zip(self.lstm, hs, strict=True):
                inp, h_n = rnn(inp, h)
                new_h.append(h_n)
            return inp[:, 0], new_h, new_c
        for lstm, h, c in zip(self.lstm, hs, cs, strict=True):
            inp, (h_n, c_n) = lstm(inp, (h, c))
            new_h.append(h_n)
            new_c.append(c_n)
        return inp[:, 0], new_h, new_c

    def lstm_weights(self) -> list[LSTMWeights]:
        """The parameters of each recurrent layer, bottom up (the tensors themselves,
        not copies)."""
        out: list[LSTMWeights] = []
        for group, lstm in zip(self.groups, self.lstm, strict=True):
            for j in range(group.count):
                out.append(
                    (
                        getattr(lstm, f"weight_ih_l{j}"),
                        getattr(lstm, f"weight_hh_l{j}"),
                        getattr(lstm, f"bias_ih_l{j}"),
                        getattr(lstm, f"bias_hh_l{j}"),
                    )
                )
        return out

    def assign_weights(
        self, layers: Sequence[LSTMWeights], linears: Sequence[tuple[Tensor, Tensor]]
    ) -> None:
        """Copy weights made elsewhere: one ``LSTMWeights`` per recurrent layer (of the
        config's cell), bottom up, and ``(weight [out, in], bias [out])`` per head
        ``Linear``, input side first.

        Raises ``ConfigError`` naming the first layer whose shapes do not fit.
        """
        kind = self.config.cell.upper()
        if len(layers) != self.config.num_layers:
            raise ConfigError(f"weights: {len(layers)} {kind} layers for {self.config.num_layers}")
        heads = [m for m in self.head if isinstance(m, nn.Linear)]
        if len(linears) != len(heads):
            raise ConfigError(f"weights: {len(linears)} dense layers for {len(heads)}")
        targets: list[tuple[str, Tensor, Tensor]] = []
        for index, (weights, params) in enumerate(zip(layers, self.lstm_weights(), strict=True)):
            for name, value, param in zip(
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh"), weights, params, strict=True
            ):
                targets.append((f"{kind} layer {index} {name}", param, value))
        for index, (module, (weight, bias)) in enumerate(zip(heads, linears, strict=True)):
            targets.append((f"dense layer {index} weight", module.weight, weight))
            targets.append((f"dense layer {index} bias", module.bias, bias))
        for what, param, value in targets:
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(
                    f"weights: {what} has shape {list(value.shape)}, expected {list(param.shape)}"
                )
        with torch.no_grad():
            for _, param, value in targets:
                param.copy_(value.to(param.dtype))

    @classmethod
    def from_weights(cls, weights: ModelWeights) -> StreamLSTM:
        """A module in eval mode holding copies of ``weights``."""
        model = cls(weights.config)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.tensors.items()})
        return model.eval()

    def weights(self) -> ModelWeights:
        """Copies of the module's parameters as ``ModelWeights`` (what serving steps with)."""
        return ModelWeights(
            self.config,
            {k: np.array(v.detach().cpu().float().numpy()) for k, v in self.state_dict().items()},
        )

    def zero_group_state(self, batch: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zero ``h`` and ``c`` per layer group, ``[count_g, batch, H_g]`` (no ``c`` for a
        GRU or RNN: an empty list)."""
        hs = [torch.zeros(g.count, batch, g.hidden_size) for g in self.groups]
        if not self.config.keeps_c:
            return hs, []
        cs = [torch.zeros(g.count, batch, g.hidden_size) for g in self.groups]
        return hs, cs

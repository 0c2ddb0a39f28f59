"""Importing models trained elsewhere: a PyTorch state dict (an ``nn.LSTM``, ``nn.GRU`` or
``nn.RNN`` and a Linear head) here, a Keras 3 LSTM file in ``keras_import``.

Neither path unpickles anything: the state dict is read with
``torch.load(weights_only=True)`` (or taken from a module or a dict of
tensors in memory); the Keras file is a zip whose ``config.json`` gives the
layer stack and whose ``model.weights.h5`` is read with h5py (TensorFlow is
never needed).

A PyTorch layer moves over as it is: streamlstm's layers are torch's own
modules, with torch's gate order (an LSTM's i, f, g, o; a GRU's r, z, n). The
cell is read from the shapes (``weight_ih`` has 4, 3 or 1 blocks of the
hidden size). Both frameworks use the LSTM gate order (input, forget, cell,
output), so a Keras LSTM layer moves over as ``w_ih = kernel.T``, ``w_hh =
recurrent_kernel.T``, ``b_ih = bias``, ``b_hh = 0`` (Keras has one bias;
PyTorch adds two).
"""

from __future__ import annotations

import itertools
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from streamlstm import Affine, Bundle, ModelConfig, OutputSpec, StreamLSTM
from streamlstm.config import CELLS, gate_count
from streamlstm.errors import BundleError, ConfigError, InputError
from streamlstm.model import LSTMWeights
from streamlstm.training.data import numeric_columns, read_table

__all__ = ["ScalerSource", "assemble_bundle", "import_torch", "reorder_gates"]

HEAD_ACTIVATIONS = {"relu", "tanh", "sigmoid", "linear"}

#: The recurrent layer's name tried where none is given, in turn.
RECURRENT_PREFIXES = ("lstm", "gru", "rnn")


@dataclass(frozen=True, kw_only=True)
class ScalerSource:
    """Where an imported model's MinMax scaling comes from (nothing: no scaling).

    Either ``data`` (a CSV/Parquet file; the scaler is fit on its first
    ``fit_fraction`` of rows, like the tutorial that trained the model) or
    explicit per-column ``feature_min``/``feature_max`` (and target min/max,
    defaulting to the target column's feature bounds), or the affines
    themselves (``input_affine``, ``target_affine``: what a fitted scaler object
    applies, as ``import_darts`` reads them from darts' ``Scaler``).
    """

    features: tuple[str, ...] = ()
    target: str | None = None
    data: str | None = None
    fit_fraction: float = 1.0
    feature_min: tuple[float, ...] = ()
    feature_max: tuple[float, ...] = ()
    target_min: float | None = None
    target_max: float | None = None
    #: Or the affines themselves (from a fitted scaler object, e.g. darts').
    input_affine: Affine | None = None
    target_affine: Affine | None = None

    def scalers(self, input_size: int) -> tuple[Affine | None, Affine | None]:
        if self.input_affine is not None:
            if self.input_affine.width != input_size:
                raise ConfigError(
                    f"scaler: the model takes {input_size} inputs; the scaler has "
                    f"{self.input_affine.width} columns"
                )
            return self.input_affine, self.target_affine
        if self.data is None and not self.feature_min and not self.feature_max:
            return None, None
        target = self.target or (self.features[0] if self.features else None)
        if self.data is not None:
            if len(self.features) != input_size:
                raise ConfigError(
                    f"features: the model takes {input_size} inputs; name that many columns "
                    f"with --features to fit its scaler (got {len(self.features)})"
                )
            if not 0.0 < self.fit_fraction <= 1.0:
                raise ConfigError(
                    f"scaler_fit_fraction: must be in (0, 1], got {self.fit_fraction}"
                )
            frame = read_table(self.data)
            cols = list(dict.fromkeys([*self.features, target or self.features[0]]))
            values = numeric_columns(frame, cols, "features")
            values = values.iloc[: max(1, int(len(values) * self.fit_fraction))]
            lo = values[list(self.features)].min().to_numpy()
            hi = values[list(self.features)].max().to_numpy()
            t_lo = float(values[target].min()) if target else lo[0]
            t_hi = float(values[target].max()) if target else hi[0]
        else:
            if len(self.feature_min) != input_size or len(self.feature_max) != input_size:
                raise ConfigError(
                    f"feature_min/feature_max: the model takes {input_size} inputs; give "
                    f"{input_size} values each (got {len(self.feature_min)} and "
                    f"{len(self.feature_max)})"
                )
            lo, hi = np.asarray(self.feature_min), np.asarray(self.feature_max)
            index = self.features.index(target) if target in self.features else 0
            t_lo = self.target_min if self.target_min is not None else float(lo[index])
            t_hi = self.target_max if self.target_max is not None else float(hi[index])
        if (np.asarray(hi) < np.asarray(lo)).any() or t_hi < t_lo:
            raise ConfigError("scaler: a maximum is below its minimum")
        return Affine.from_min_max(lo, hi), Affine.from_min_max([t_lo], [t_hi])


# -- PyTorch ------------------------------------------------------------------


def import_torch(
    source: str | Path | Mapping[str, torch.Tensor] | nn.Module,
    *,
    scaler: ScalerSource | None = None,
    rnn_prefix: str | None = None,
    head_prefix: str = "fc",
    head_activation: str = "relu",
    name: str | None = None,
    cell: str = "auto",
    lstm_prefix: str | None = None,
) -> Bundle:
    """A bundle from a tutorial model's ``state_dict`` (a recurrent layer + ``fc`` head).

    ``source`` is a ``.pth`` file of the state dict, the dict itself, or the
    module. The recurrent layer is the one named ``rnn_prefix`` (default: the
    first of ``lstm``, ``gru``, ``rnn`` present; ``lstm_prefix`` is its older
    name, still read). Its cell (``auto``: read
    from the shapes; or ``lstm``, ``gru``, ``rnn``, checked against them),
    layer count and sizes and the head's widths are read from the tensors;
    the head's hidden activation cannot be (a state dict holds no
    activations) and defaults to the tutorial's ReLU. A state dict cannot tell
    an ``nn.RNN``'s tanh from ReLU either: only tanh is served, and a module
    with a ReLU ``nn.RNN`` is refused.
    """
    tensors, label, stem = _torch_source(source)
    if head_activation not in HEAD_ACTIVATIONS:
        raise ConfigError(
            f"head_activation: must be one of {', '.join(sorted(HEAD_ACTIVATIONS))}, "
            f"got {head_activation!r}"
        )
    prefix = (
        rnn_prefix
        or lstm_prefix
        or next(
            (p for p in RECURRENT_PREFIXES if any(k.startswith(f"{p}.") for k in tensors)), "lstm"
        )
    )
    rnn_keys = {k for k in tensors if k.startswith(f"{prefix}.")}
    if not rnn_keys:
        raise BundleError(
            f"{label}: no tensors named {prefix}.* (it has {', '.join(sorted(tensors))}); "
            "pass --rnn-prefix with the name of the model's nn.LSTM (nn.GRU, nn.RNN)"
        )
    if any(k.endswith("_reverse") for k in rnn_keys):
        ModelConfig(bidirectional=True)  # raises the error that says why it cannot stream
    if any("weight_hr" in k for k in rnn_keys):
        raise ConfigError("lstm: LSTMs with proj_size are not supported")
    cell, layers = _torch_layers(tensors, prefix, cell, label)
    linears = _torch_head(tensors, head_prefix, label)
    used = rnn_keys | {k for k in tensors if k.startswith(f"{head_prefix}.")}
    extra = sorted(set(tensors) - used)
    if extra:
        raise BundleError(
            f"{label}: tensors outside {prefix} and {head_prefix}: {', '.join(extra)}; "
            "only an LSTM, GRU or RNN followed by a Linear head can be imported"
        )
    config = ModelConfig(
        cell=cell,
        input_size=int(layers[0][0].shape[1]),
        hidden_sizes=tuple(int(w_hh.shape[1]) for _, w_hh, _, _ in layers),
        head_sizes=tuple(int(w.shape[0]) for w, _ in linears[:-1]),
        output_size=int(linears[-1][0].shape[0]),
        head_activation=head_activation,
    )
    return assemble_bundle(config, layers, linears, scaler, name or stem, {"source": "torch"})


def _torch_source(
    source: str | Path | Mapping[str, torch.Tensor] | nn.Module,
) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors of ``source`` (a file, a state dict or a module), what to call it in
    errors, and the model's default name."""
    if isinstance(source, nn.Module):
        for module in source.modules():
            if isinstance(module, nn.RNN) and module.nonlinearity != "tanh":
                raise ConfigError(
                    f"rnn: nn.RNN with nonlinearity={module.nonlinearity!r} is not supported "
                    "(only tanh, nn.RNN's default)"
                )
        kind = type(source).__name__
        return _state_dict(source.state_dict(), kind), kind, kind.lower()
    if isinstance(source, Mapping):
        return _state_dict(source, "state dict"), "state dict", "model"
    file = Path(source)
    if not file.is_file():
        raise BundleError(f"state dict {str(file)!r} does not exist")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
        raise BundleError(
            f"{file.name}: not a plain state dict ({str(exc).splitlines()[0]}). streamlstm "
            "never unpickles model objects; save it with torch.save(model.state_dict(), path)"
        ) from exc
    return _state_dict(loaded, file.name), file.name, file.stem


def _torch_layers(
    tensors: Mapping[str, torch.Tensor], prefix: str, cell: str, label: str
) -> tuple[str, list[LSTMWeights]]:
    """The recurrent layers under ``prefix``, bottom up, and their cell: read from the
    shapes (``weight_ih`` rows per hidden unit: 4 LSTM, 3 GRU, 1 RNN), or ``cell``
    checked against them."""
    if cell != "auto" and cell not in CELLS:
        raise ConfigError(f"cell: must be auto or one of {', '.join(CELLS)}, got {cell!r}")
    layers: list[LSTMWeights] = []
    while f"{prefix}.weight_ih_l{len(layers)}" in tensors:
        k = len(layers)
        w_ih = tensors[f"{prefix}.weight_ih_l{k}"]
        w_hh = tensors[f"{prefix}.weight_hh_l{k}"]
        zeros = torch.zeros(w_ih.shape[0])
        b_ih = tensors.get(f"{prefix}.bias_ih_l{k}", zeros)
        b_hh = tensors.get(f"{prefix}.bias_hh_l{k}", zeros)
        layers.append((w_ih, w_hh, b_ih, b_hh))
    if not layers:
        raise BundleError(f"{label}: no {prefix}.weight_ih_l0: not an nn.LSTM, nn.GRU or nn.RNN")
    w_ih, w_hh = layers[0][0], layers[0][1]
    blocks = {gate_count(c): c for c in CELLS}
    found = blocks.get(int(w_ih.shape[0]) // int(w_hh.shape[1]))
    if found is None or w_ih.shape[0] % w_hh.shape[1]:
        raise BundleError(
            f"{label}: {prefix}.weight_ih_l0 has shape {list(w_ih.shape)} for hidden size "
            f"{w_hh.shape[1]}: not an LSTM's, GRU's or RNN's (4, 3 or 1 gate blocks)"
        )
    if cell not in ("auto", found):
        raise ConfigError(f"cell: {cell} given, but {label}'s {prefix} layers are a {found}'s")
    return found, layers


def _state_dict(loaded: object, filename: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise BundleError(f"{filename}: expected a state dict of tensors")
    return {str(k).removeprefix("module."): v.float() for k, v in loaded.items()}


def _torch_head(
    tensors: Mapping[str, torch.Tensor], prefix: str, filename: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pattern = re.compile(rf"^{re.escape(prefix)}((?:\.\d+)*)\.weight$")
    found = []
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match and tensor.ndim == 2:
            position = tuple(int(p) for p in match.group(1).split(".") if p)
            bias = tensors.get(key[: -len("weight")] + "bias", torch.zeros(tensor.shape[0]))
            found.append((position, tensor, bias))
    if not found:
        raise BundleError(
            f"{filename}: no Linear weights named {prefix}.*; pass --head-prefix with the "
            "name of the model's head"
        )
    found.sort(key=lambda item: item[0])
    linears = [(w, b) for _, w, b in found]
    for (w0, _), (w1, _) in itertools.pairwise(linears):
        if w1.shape[1] != w0.shape[0]:
            raise BundleError(
                f"{filename}: head layers do not chain ({list(w0.shape)} then {list(w1.shape)})"
            )
    return linears


# -- shared -------------------------------------------------------------------


def reorder_gates(tensor: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``tensor``'s gate blocks (equal slices of its first axis) taken in ``order``: block
    ``order[k]`` of the source becomes block ``k`` (a source's gate order to torch's)."""
    blocks = torch.chunk(tensor, len(order), dim=0)
    return torch.cat([blocks[k] for k in order], dim=0).contiguous()


def assemble_bundle(
    config: ModelConfig,
    layers: Sequence[LSTMWeights],
    linears: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scaler: ScalerSource | None,
    name: str,
    meta: dict[str, Any],
    *,
    activation: str = "linear",
) -> Bundle:
    model = StreamLSTM(config)
    model.assign_weights(layers, linears)
    source = scaler or ScalerSource()
    input_scaler, target_scaler = source.scalers(config.input_size)
    if input_scaler is not None and activation != "linear":
        raise InputError("scaler", f"a model ending in {activation} does not take a target scaler")
    features = source.features if len(source.features) == config.input_size else None
    target = source.target or (source.features[0] if features else None)
    window = meta.get("window")
    return Bundle(
        config=config,
        model=model,
        feature_names=features,
        target_names=(target,) if target and config.output_size == 1 else None,
        input_scaler=input_scaler,
        target_scaler=target_scaler,
        # A window-trained model has seen at most `window` ticks of history.
        warmup_steps=int(window) if isinstance(window, int) else 0,
        name=name,
        training={"imported": meta, "scaler_data": source.data},
        outputs=OutputSpec(activation=activation),
    )

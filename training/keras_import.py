"""Importing a Keras 3 ``.keras`` file: LSTM, GRU or SimpleRNN layers, then Dense layers.

The file is a zip whose ``config.json`` gives the layer stack and whose
``model.weights.h5`` is read with h5py (the ``keras`` extra; TensorFlow is
never needed). Nothing is unpickled.

Gate orders: a Keras LSTM's kernel columns are i, f, c, o, torch's own order; a
Keras GRU's are z, r, h, and torch's r, z, n, so its blocks are swapped. A GRU
must have ``reset_after=True`` (Keras 3's default): the reset gate then scales
the recurrent product with its own bias, which is torch's GRU (the kernel's
bias is ``[2, 3 units]``: the input bias, then the recurrent one). A SimpleRNN
(tanh) is torch's ``nn.RNN``. Keras' LSTM and SimpleRNN have one bias; torch
adds two, so the second is zero.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamlstm import Bundle, ModelConfig
from streamlstm.errors import BundleError, ConfigError
from streamlstm.model import LSTMWeights
from streamlstm.training.importers import (
    HEAD_ACTIVATIONS,
    ScalerSource,
    assemble_bundle,
    reorder_gates,
)

__all__ = ["import_keras"]

_SKIPPED_KERAS_LAYERS = {"InputLayer", "Dropout", "SpatialDropout1D", "GaussianDropout"}

#: Keras' recurrent layers that import, and the cell each is.
_RECURRENT = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "rnn"}

#: A Keras GRU's kernel blocks (z, r, h) taken in torch's order (r, z, n).
_GRU_ORDER = (1, 0, 2)

# -- Keras --------------------------------------------------------------------


def import_keras(
    path: str | Path, *, scaler: ScalerSource | None = None, name: str | None = None
) -> Bundle:
    """A bundle from a Keras 3 ``.keras`` file of LSTM, GRU or SimpleRNN layers (one
    kind) then Dense layers."""
    file = Path(path)
    if not file.is_file():
        raise BundleError(f"Keras file {str(file)!r} does not exist")
    try:
        with zipfile.ZipFile(file) as archive:
            config = json.loads(archive.read("config.json"))
            weights_bytes = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"{file.name}: not a Keras 3 .keras file (a zip holding config.json and "
            f"model.weights.h5): {exc}"
        ) from exc
    import h5py  # only the Keras path needs it

    specs = _keras_layers(config, file.name)
    cell_specs = [s for s in specs if s["class_name"] in _RECURRENT]
    dense_specs = [s for s in specs if s["class_name"] == "Dense"]
    cell = _RECURRENT[cell_specs[0]["class_name"]]
    with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
        layers = [
            _keras_cell_weights(cell, _keras_vars(h5, spec, cell=True, filename=file.name))
            for spec in cell_specs
        ]
        linears = []
        for spec in dense_specs:
            kernel, *rest = _keras_vars(h5, spec, cell=False, filename=file.name)
            bias = torch.from_numpy(rest[0]) if rest else torch.zeros(kernel.shape[1])
            linears.append((torch.from_numpy(kernel).T.contiguous(), bias))
    hidden_acts = {s["config"].get("activation", "linear") for s in dense_specs[:-1]}
    if len(hidden_acts) > 1:
        raise ConfigError(
            f"{file.name}: hidden Dense layers mix activations {sorted(hidden_acts)}; "
            "a streamlstm head uses one"
        )
    model_config = ModelConfig(
        cell=cell,
        input_size=int(layers[0][0].shape[1]),
        hidden_sizes=tuple(int(s["config"]["units"]) for s in cell_specs),
        head_sizes=tuple(int(s["config"]["units"]) for s in dense_specs[:-1]),
        output_size=int(dense_specs[-1]["config"]["units"]),
        head_activation=hidden_acts.pop() if hidden_acts else "relu",
        dropout=0.0,
    )
    meta = {"source": "keras", "window": _keras_window(specs)}
    last_act = dense_specs[-1]["config"].get("activation", "linear")
    return assemble_bundle(
        model_config, layers, linears, scaler, name or file.stem, meta, activation=last_act
    )


def _keras_cell_weights(cell: str, variables: Sequence[np.ndarray]) -> LSTMWeights:
    """torch's ``(w_ih, w_hh, b_ih, b_hh)`` from a Keras cell's kernel, recurrent kernel
    and bias (absent with ``use_bias=False``)."""
    kernel, recurrent, *rest = (torch.from_numpy(v) for v in variables)
    w_ih, w_hh = kernel.T.contiguous(), recurrent.T.contiguous()
    zeros = torch.zeros(w_ih.shape[0])
    if cell != "gru":
        return w_ih, w_hh, rest[0] if rest else zeros, zeros
    # reset_after=True: the bias is [2, 3 units], the input's then the recurrent's.
    b_ih, b_hh = (rest[0][0], rest[0][1]) if rest else (zeros, zeros)
    w_ih, w_hh, b_ih, b_hh = (reorder_gates(t, _GRU_ORDER) for t in (w_ih, w_hh, b_ih, b_hh))
    return w_ih, w_hh, b_ih, b_hh


def _keras_layers(config: Mapping[str, Any], filename: str) -> list[dict[str, Any]]:
    kind = config.get("class_name")
    if kind not in ("Sequential", "Functional", "Model"):
        raise BundleError(f"{filename}: a {kind} cannot be imported; expected a Sequential model")
    specs: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for layer in config.get("config", {}).get("layers", []):
        cls = layer.get("class_name")
        cfg = layer.get("config", {})
        # Keras 3 stores weights under the snake-cased class name, numbered
        # per class in layer order ("lstm", "lstm_1"), not under the layer name.
        key = re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", cls))
        seen = counts.get(key.lower(), 0)
        counts[key.lower()] = seen + 1
        layer = {**layer, "h5_name": key.lower() if seen == 0 else f"{key.lower()}_{seen}"}
        label = f"layer {cfg.get('name', '?')!r} ({cls})"
        for node in layer.get("inbound_nodes") or []:
            args = node.get("args", []) if isinstance(node, dict) else node
            if isinstance(args, list) and len(args) > 1:
                raise BundleError(f"{filename}: {label} has several inputs; only a stack imports")
        if cls in _RECURRENT:
            _check_keras_cell(cls, cfg, f"{filename}: {label}")
        elif cls == "Dense":
            activation = cfg.get("activation", "linear")
            if activation not in HEAD_ACTIVATIONS | {"softmax"}:
                raise ConfigError(f"{filename}: {label} has unsupported activation {activation!r}")
        elif cls == "Bidirectional":
            ModelConfig(bidirectional=True)
        elif cls not in _SKIPPED_KERAS_LAYERS:
            raise ConfigError(
                f"{filename}: {label} is not supported; streamlstm imports LSTM, GRU or "
                "SimpleRNN layers followed by Dense layers (Dropout and InputLayer are skipped)"
            )
        specs.append(layer)
    _check_keras_stack(specs, filename)
    return [s for s in specs if s["class_name"] in {*_RECURRENT, "Dense", "InputLayer"}]


def _check_keras_cell(cls: str, cfg: Mapping[str, Any], label: str) -> None:
    """Refuse what a recurrent layer does that torch's cell of its kind does not."""
    if cfg.get("go_backwards"):
        raise ConfigError(f"{label} runs backwards in time and cannot stream")
    activation = cfg.get("activation", "tanh")
    recurrent = cfg.get("recurrent_activation", "sigmoid")
    if activation != "tanh" or (cls != "SimpleRNN" and recurrent != "sigmoid"):
        gates = "" if cls == "SimpleRNN" else f" / recurrent_activation {recurrent!r}"
        raise ConfigError(
            f"{label} uses activation {activation!r}{gates}; only "
            f"{'tanh' if cls == 'SimpleRNN' else 'tanh / sigmoid'} (the Keras defaults) "
            "are supported"
        )
    if cls == "GRU" and not cfg.get("reset_after", True):
        raise ConfigError(
            f"{label} has reset_after=False: its reset gate scales the state before the "
            "recurrent product, which torch's GRU (and streamlstm) does not; retrain it with "
            "reset_after=True (the Keras 3 default)"
        )


def _check_keras_stack(specs: Sequence[Mapping[str, Any]], filename: str) -> None:
    """Recurrent layers of one kind (all but the last returning sequences), then Dense."""
    kinds = [s["class_name"] for s in specs if s["class_name"] not in _SKIPPED_KERAS_LAYERS]
    cells = [k for k in kinds if k in _RECURRENT]
    if len(set(cells)) > 1:
        raise ConfigError(
            f"{filename}: the model mixes recurrent layers ({' -> '.join(cells)}); streamlstm "
            "serves one cell kind in every layer"
        )
    n = len(cells)
    if not n or kinds[:n] != cells or "Dense" not in kinds or set(kinds[n:]) != {"Dense"}:
        raise ConfigError(
            f"{filename}: expected LSTM, GRU or SimpleRNN layers then Dense layers, got "
            f"{' -> '.join(kinds)}"
        )
    recurrent = [s for s in specs if s["class_name"] in _RECURRENT]
    for spec in recurrent[:-1]:
        if not spec["config"].get("return_sequences"):
            raise ConfigError(
                f"{filename}: {spec['class_name']} {spec['config'].get('name')!r} feeds "
                "another recurrent layer, so it must have return_sequences=True"
            )
    denses = [s for s in specs if s["class_name"] == "Dense"]
    if any(s["config"].get("activation") == "softmax" for s in denses[:-1]):
        raise ConfigError(f"{filename}: softmax is only supported on the last Dense layer")


def _keras_window(specs: Sequence[Mapping[str, Any]]) -> int | None:
    for spec in specs:
        cfg = spec["config"]
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape is None and "build_config" in spec:
            shape = spec["build_config"].get("input_shape")
        if shape and len(shape) == 3 and isinstance(shape[1], int):
            return int(shape[1])
    return None


def _keras_vars(h5: Any, spec: Mapping[str, Any], *, cell: bool, filename: str) -> list[Any]:
    layer_name = spec["config"]["name"]
    suffix = "/cell/vars" if cell else "/vars"
    group_path = f"layers/{spec['h5_name']}{suffix}"
    if group_path not in h5:
        group_path = f"layers/{layer_name}{suffix}"
    if group_path not in h5:
        raise BundleError(
            f"{filename}: weights for layer {layer_name!r} not found at {group_path} in "
            "model.weights.h5"
        )
    group = h5[group_path]
    return [np.asarray(group[key], dtype=np.float32) for key in sorted(group, key=int)]

"""Importing a Keras 3 ``.keras`` file: LSTM layers, then Dense layers.

The file is a zip whose ``config.json`` gives the layer stack and whose
``model.weights.h5`` is read with h5py (the ``keras`` extra; TensorFlow is
never needed). Nothing is unpickled. See ``importers`` for the gate order.
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
from streamlstm.training.importers import HEAD_ACTIVATIONS, ScalerSource, assemble_bundle

__all__ = ["import_keras"]

_SKIPPED_KERAS_LAYERS = {"InputLayer", "Dropout", "SpatialDropout1D", "GaussianDropout"}

# -- Keras --------------------------------------------------------------------


def import_keras(
    path: str | Path, *, scaler: ScalerSource | None = None, name: str | None = None
) -> Bundle:
    """A bundle from a Keras 3 ``.keras`` file of LSTM layers then Dense layers."""
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
    lstm_specs = [s for s in specs if s["class_name"] == "LSTM"]
    dense_specs = [s for s in specs if s["class_name"] == "Dense"]
    with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
        layers: list[LSTMWeights] = []
        for spec in lstm_specs:
            kernel, recurrent, *rest = _keras_vars(h5, spec, cell=True, filename=file.name)
            units = int(spec["config"]["units"])
            bias = torch.from_numpy(rest[0]) if rest else torch.zeros(4 * units)
            layers.append(
                (
                    torch.from_numpy(kernel).T.contiguous(),
                    torch.from_numpy(recurrent).T.contiguous(),
                    bias,
                    torch.zeros(4 * units),
                )
            )
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
    last_act = dense_specs[-1]["config"].get("activation", "linear")
    window = _keras_window(specs)
    model_config = ModelConfig(
        input_size=int(layers[0][0].shape[1]),
        hidden_sizes=tuple(int(s["config"]["units"]) for s in lstm_specs),
        head_sizes=tuple(int(s["config"]["units"]) for s in dense_specs[:-1]),
        output_size=int(dense_specs[-1]["config"]["units"]),
        head_activation=hidden_acts.pop() if hidden_acts else "relu",
        dropout=0.0,
    )
    meta = {"source": "keras", "window": window}
    return assemble_bundle(
        model_config,
        layers,
        linears,
        scaler,
        name or file.stem,
        meta,
        activation=last_act,
    )


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
        if cls in _SKIPPED_KERAS_LAYERS:
            specs.append(layer)
            continue
        if cls == "LSTM":
            if cfg.get("go_backwards"):
                raise ConfigError(f"{filename}: {label} runs backwards in time and cannot stream")
            if cfg.get("activation", "tanh") != "tanh" or (
                cfg.get("recurrent_activation", "sigmoid") != "sigmoid"
            ):
                raise ConfigError(
                    f"{filename}: {label} uses activation {cfg.get('activation')!r} / "
                    f"recurrent_activation {cfg.get('recurrent_activation')!r}; only "
                    "tanh / sigmoid (the Keras defaults) are supported"
                )
        elif cls == "Dense":
            activation = cfg.get("activation", "linear")
            if activation not in HEAD_ACTIVATIONS | {"softmax"}:
                raise ConfigError(f"{filename}: {label} has unsupported activation {activation!r}")
        elif cls == "Bidirectional":
            ModelConfig(bidirectional=True)
        else:
            raise ConfigError(
                f"{filename}: {label} is not supported; streamlstm imports LSTM layers "
                "followed by Dense layers (Dropout and InputLayer are skipped)"
            )
        specs.append(layer)
    kinds = [s["class_name"] for s in specs if s["class_name"] not in _SKIPPED_KERAS_LAYERS]
    n_lstm = kinds.count("LSTM")
    if not n_lstm or kinds[:n_lstm] != ["LSTM"] * n_lstm or "Dense" not in kinds:
        raise ConfigError(
            f"{filename}: expected LSTM layers then Dense layers, got {' -> '.join(kinds)}"
        )
    lstms = [s for s in specs if s["class_name"] == "LSTM"]
    for spec in lstms[:-1]:
        if not spec["config"].get("return_sequences"):
            raise ConfigError(
                f"{filename}: LSTM {spec['config'].get('name')!r} feeds another LSTM, so it "
                "must have return_sequences=True"
            )
    denses = [s for s in specs if s["class_name"] == "Dense"]
    if any(s["config"].get("activation") == "softmax" for s in denses[:-1]):
        raise ConfigError(f"{filename}: softmax is only supported on the last Dense layer")
    return [s for s in specs if s["class_name"] in ("LSTM", "Dense", "InputLayer")]


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

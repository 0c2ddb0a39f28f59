"""Importing a darts ``RNNModel`` (LSTM, GRU or vanilla RNN) from its Lightning checkpoint.

``RNNModel.save("model.pt")`` writes two files: ``model.pt``, the pickled
forecasting-model object, and ``model.pt.ckpt``, the Lightning checkpoint whose
``state_dict`` holds the ``_RNNModule``'s tensors: an ``nn.LSTM``/``nn.GRU``/
``nn.RNN`` named ``rnn`` (``batch_first``) and a Linear head ``V``. Only the
checkpoint is read, with ``tensor_reader`` (it builds tensors and plain values
and runs nothing; ``torch.load(weights_only=True)`` refuses the file, whose
hyper-parameters name the optimiser and loss classes). ``model.pt`` is never
opened.

darts feeds the module, at each step ``t``, the target(s) at ``t`` then the
future covariates at ``t + 1``, and reads the prediction of the target at
``t + 1``: served, a tick's features are ``[target_t, covariates_(t+1)]`` and its
answer the next target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamlstm import Affine, Bundle
from streamlstm.errors import BundleError, ConfigError
from streamlstm.training.importers import ScalerSource, import_torch
from streamlstm.training.tensor_reader import Opaque, read_checkpoint

__all__ = ["affine_of_darts_scaler", "import_darts"]

#: darts' names of its RNNModel modules and streamlstm's cells.
_MODULES = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}


def import_darts(
    path: str | Path,
    *,
    scaler: ScalerSource | None = None,
    target_scaler: Any = None,
    covariate_scaler: Any = None,
    name: str | None = None,
) -> Bundle:
    """A bundle from a darts ``RNNModel``'s checkpoint (``model.pt.ckpt``; given the
    ``model.pt`` beside it, the ``.ckpt`` is read instead).

    Scaling: ``scaler`` (min/max per input column: the target(s), then the future
    covariates), or the fitted darts ``Scaler`` objects themselves:
    ``target_scaler`` (the target's; also inverts the outputs) and
    ``covariate_scaler`` (the covariates'; default none). Each must be affine per
    column (MinMaxScaler, StandardScaler, MaxAbsScaler, RobustScaler, ...).
    """
    file = _checkpoint_file(Path(path))
    loaded = read_checkpoint(file)
    state = loaded.get("state_dict") if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise BundleError(f"{file.name}: not a Lightning checkpoint (no state_dict)")
    hyper = loaded.get("hyper_parameters")
    hyper = dict(hyper) if isinstance(hyper, Mapping) else {}
    cell = _check_darts_module(hyper, file.name)
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if target_scaler is not None or covariate_scaler is not None:
        scaler = _darts_scalers(
            scaler or ScalerSource(), tensors, hyper, target_scaler, covariate_scaler
        )
    bundle = import_torch(
        tensors,
        scaler=scaler,
        rnn_prefix="rnn",
        head_prefix="V",
        head_activation="linear",
        cell=cell,
        name=name or file.name.split(".")[0],
    )
    shape = hyper.get("train_sample_shape")
    past = shape.get("past_target") if isinstance(shape, Mapping) else None
    bundle.training["imported"] = {
        "source": "darts",
        "module": hyper.get("name"),
        "input_chunk_length": hyper.get("input_chunk_length"),
        # The windows it was trained on (RNNModel's training_length).
        "training_length": int(past[0]) if isinstance(past, tuple | list) and past else None,
    }
    return bundle


def _checkpoint_file(path: Path) -> Path:
    """The Lightning checkpoint to read: ``path`` itself, or for a darts ``.pt`` the
    ``.pt.ckpt`` beside it (the ``.pt`` is a pickled object and is never opened)."""
    if path.suffix != ".ckpt":
        sibling = path.with_name(path.name + ".ckpt")
        if sibling.is_file():
            return sibling
        raise BundleError(
            f"{path.name}: darts' .pt file is the pickled model object, which streamlstm "
            f"never unpickles; give the Lightning checkpoint {sibling.name} that "
            "RNNModel.save() writes beside it (or one from save_checkpoints=True)"
        )
    if not path.is_file():
        raise BundleError(f"darts checkpoint {str(path)!r} does not exist")
    return path


def _check_darts_module(hyper: Mapping[str, Any], filename: str) -> str:
    """The cell of a checkpoint's ``_RNNModule``, refusing what streamlstm cannot serve."""
    module = hyper.get("name")
    if module not in _MODULES:
        raise ConfigError(
            f"{filename}: module {module!r} is not darts' RNNModel LSTM, GRU or RNN (a "
            "custom CustomRNNModule, or not an RNNModel checkpoint)"
        )
    likelihood = hyper.get("likelihood")
    if likelihood is not None or int(hyper.get("nr_params") or 1) != 1:
        kind = likelihood.name if isinstance(likelihood, Opaque) else repr(likelihood)
        raise ConfigError(
            f"{filename}: the model is probabilistic (likelihood {kind}): it outputs "
            "distribution parameters, not values; streamlstm imports models trained with a "
            "loss (likelihood=None)"
        )
    if hyper.get("use_reversible_instance_norm"):
        raise ConfigError(
            f"{filename}: use_reversible_instance_norm normalises each input window by its "
            "own statistics, which a stream that never ends has not; retrain without it"
        )
    if int(hyper.get("output_chunk_shift") or 0) != 0:
        raise ConfigError(f"{filename}: output_chunk_shift must be 0")
    return _MODULES[module]


def _darts_scalers(
    source: ScalerSource,
    tensors: Mapping[str, torch.Tensor],
    hyper: Mapping[str, Any],
    target_scaler: Any,
    covariate_scaler: Any,
) -> ScalerSource:
    """``source`` with the input and target affines of fitted darts scalers."""
    weight = tensors.get("rnn.weight_ih_l0")
    if weight is None:
        raise BundleError("checkpoint: no rnn.weight_ih_l0")
    inputs = int(weight.shape[1])
    targets = int(hyper.get("target_size") or 1)
    target = (
        affine_of_darts_scaler(target_scaler, targets, "target_scaler")
        if target_scaler is not None
        else _identity(targets)
    )
    covariates = inputs - targets
    if covariate_scaler is not None:
        if not covariates:
            raise ConfigError("covariate_scaler: the model takes no covariates")
        cov = affine_of_darts_scaler(covariate_scaler, covariates, "covariate_scaler")
    else:
        cov = _identity(covariates)
    both = Affine(
        scale=np.concatenate([target.scale, cov.scale]).astype(np.float32),
        offset=np.concatenate([target.offset, cov.offset]).astype(np.float32),
    )
    return dataclasses.replace(source, input_affine=both, target_affine=target)


def _identity(width: int) -> Affine:
    return Affine(scale=np.ones(width, np.float32), offset=np.zeros(width, np.float32))


def affine_of_darts_scaler(scaler: Any, width: int, what: str) -> Affine:
    """The per-column ``x * scale + offset`` a fitted darts transformer applies to a
    ``width``-column series, found by transforming probe values (refused when it is
    not affine, or not fitted for one series of that width)."""
    from darts import TimeSeries

    probe = np.repeat(np.array([[0.0], [1.0], [2.0], [-3.5], [10.25]]), width, axis=1)
    try:
        out = scaler.transform(TimeSeries.from_values(probe)).values(copy=True)
    except Exception as exc:  # darts raises ValueError, sklearn its own, a wrong object others
        raise ConfigError(
            f"{what}: transforming a {width}-column series failed ({exc}); pass the darts "
            "Scaler fitted on the one series the model was trained on"
        ) from exc
    offset, scale = out[0], out[1] - out[0]
    if not np.allclose(out, offset + probe * scale, rtol=1e-6, atol=1e-9):
        raise ConfigError(f"{what}: the scaler is not affine per column; it cannot be served")
    return Affine(scale=scale.astype(np.float32), offset=offset.astype(np.float32))

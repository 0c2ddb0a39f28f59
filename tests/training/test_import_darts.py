"""import darts: tiny RNNModels trained with darts, served like darts' own module runs them."""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from darts import TimeSeries
from darts.dataprocessing.transformers import Scaler
from darts.models import RNNModel
from darts.utils.data.torch_datasets.utils import ModuleStage, PLModuleInput
from darts.utils.likelihood_models.torch import GaussianLikelihood
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from streamlstm import Bundle, BundleError, ConfigError
from streamlstm.cli import main as cli_main
from streamlstm.training import tensor_reader
from streamlstm.training.darts_import import import_darts
from streamlstm.training.tensor_reader import Opaque, read_checkpoint
from tests.helpers.importing import LONG, assert_serves_like

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _series(ticks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy seasonal target and the covariate that drives it (one tick longer:
    darts feeds the covariate of the tick ahead)."""
    rng = np.random.default_rng(seed)
    t = np.arange(ticks + 1)
    cov = np.cos(t / 5).astype(np.float32)
    target = (np.sin(t[:-1] / 7) + 0.5 * cov[:-1] + rng.normal(0, 0.1, ticks)).astype(np.float32)
    return target, cov


def _fit(tmp_path: Path, module: str, **options: Any) -> RNNModel:
    """A tiny RNNModel, trained for two epochs on CPU and saved as model.pt (+ .ckpt)."""
    target, cov = _series(300)
    target, cov = options.pop("_target", target), options.pop("_cov", cov)
    model = RNNModel(
        input_chunk_length=12, model=module, hidden_dim=8, n_rnn_layers=2, training_length=24,
        n_epochs=2, random_state=0, **options,
        pl_trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                           "enable_model_summary": False, "enable_checkpointing": False},
    )  # fmt: skip
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on workers, pinned memory
        model.fit(
            TimeSeries.from_values(target),
            future_covariates=TimeSeries.from_values(cov),
            verbose=False,
        )
    model.save(str(tmp_path / "model.pt"))
    return model


def _darts_own(model: RNNModel, target: np.ndarray, cov_next: np.ndarray) -> np.ndarray:
    """darts' module over the whole sequence from zero state, as it trains: the target
    at each tick beside the covariate of the next, the next target predicted."""
    module = model.model.eval()
    batch = PLModuleInput(
        past_target=torch.from_numpy(target)[None, :, None],
        future_covariates=torch.from_numpy(cov_next)[None, :, None],
        stage=ModuleStage.VALIDATE,
    )
    with torch.no_grad():
        return module(batch).prediction[0, :, :, 0].numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_darts_rnn_models_serve_like_darts_over_a_long_sequence(tmp_path: Path, cell: str) -> None:
    model = _fit(tmp_path, MODULES[cell])
    target, cov = _series(LONG, seed=1)
    expected = _darts_own(model, target, cov[1:])  # [1000, 1]
    # The .pt is the pickled object: the import reads the .pt.ckpt beside it instead.
    assert (
        cli_main(["import", "darts", str(tmp_path / "model.pt"), "--out", str(tmp_path / "b")]) == 0
    )
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.cell == cell and bundle.config.hidden_sizes == (8, 8)
    assert bundle.config.input_size == 2 and bundle.config.head_sizes == ()
    meta = bundle.training["imported"]
    assert meta["source"] == "darts" and meta["training_length"] == 24
    x = np.stack([target, cov[1:]], axis=1)[None]
    assert_serves_like(bundle, x, expected[None], atol=1e-5)


def test_fitted_darts_scalers_map_to_the_bundle_scalers(tmp_path: Path) -> None:
    target, cov = _series(300)
    raw_target, raw_cov = 150 + 40 * target, 10 + 3 * cov
    target_scaler = Scaler().fit(TimeSeries.from_values(raw_target))  # MinMaxScaler
    cov_scaler = Scaler(StandardScaler()).fit(TimeSeries.from_values(raw_cov))
    scaled_t = target_scaler.transform(TimeSeries.from_values(raw_target)).values()[:, 0]
    scaled_c = cov_scaler.transform(TimeSeries.from_values(raw_cov)).values()[:, 0]
    model = _fit(tmp_path, "GRU", _target=scaled_t.astype(np.float32), _cov=scaled_c)
    bundle = import_darts(
        tmp_path / "model.pt.ckpt", target_scaler=target_scaler, covariate_scaler=cov_scaler
    )
    own = _darts_own(model, scaled_t.astype(np.float32), scaled_c[1:].astype(np.float32))
    expected = target_scaler.inverse_transform(TimeSeries.from_values(own)).values()
    x = np.stack([raw_target, raw_cov[1:]], axis=1).astype(np.float32)
    np.testing.assert_allclose(bundle.predict_sequence(x), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="covariate_scaler: the scaler is not affine"):
        quantiles = Scaler(QuantileTransformer(n_quantiles=10))
        import_darts(
            tmp_path / "model.pt.ckpt",
            covariate_scaler=quantiles.fit(TimeSeries.from_values(raw_cov)),
        )


def test_probabilistic_and_instance_normed_models_and_the_pickle_are_refused(
    tmp_path: Path,
) -> None:
    _fit(tmp_path, "LSTM", likelihood=GaussianLikelihood())
    with pytest.raises(ConfigError, match=r"probabilistic .*GaussianLikelihood"):
        import_darts(tmp_path / "model.pt")
    # darts' RNNModel does not apply instance norm; a hand-built checkpoint says it does.
    _fit(tmp_path, "GRU")
    loaded = read_checkpoint(tmp_path / "model.pt.ckpt")
    plain = (int, float, str, dict, tuple, type(None))
    hyper = {k: v for k, v in loaded["hyper_parameters"].items() if type(v) in plain}
    hyper["use_reversible_instance_norm"] = True
    torch.save(
        {"state_dict": loaded["state_dict"], "hyper_parameters": hyper}, tmp_path / "rin.ckpt"
    )
    with pytest.raises(ConfigError, match="use_reversible_instance_norm normalises each input"):
        import_darts(tmp_path / "rin.ckpt")
    os.remove(tmp_path / "model.pt.ckpt")
    with pytest.raises(BundleError, match="never unpickles; give the Lightning checkpoint"):
        import_darts(tmp_path / "model.pt")


def test_the_checkpoint_reader_builds_tensors_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save(
        {"state_dict": {"w": weight.T, "h": weight.to(torch.bfloat16)}, "evil": Payload()},
        tmp_path / "evil.ckpt",
    )
    loaded = read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert isinstance(loaded["evil"], Opaque)
    torch.testing.assert_close(loaded["state_dict"]["w"], weight.T)  # strides kept
    assert loaded["state_dict"]["h"].dtype == torch.bfloat16
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")


def test_a_tensor_view_outside_its_storage_is_refused() -> None:
    """``as_strided`` checks nothing: a hostile checkpoint's size, stride or offset that
    reaches past its storage (or multiplies it by broadcasting) is refused, not read."""
    storage = np.arange(6, dtype=np.float32)
    ok = tensor_reader._rebuild_tensor(storage, 1, (2, 2), (2, 1))
    np.testing.assert_array_equal(ok.numpy(), [[1, 2], [3, 4]])
    for offset, size, stride in [(0, (2,), (100,)), (5, (2,), (1,)), (0, (1000,), (0,)),
                                 (-1, (1,), (1,)), (0, (2,), (-1,))]:  # fmt: skip
        with pytest.raises(pickle.UnpicklingError, match="tensor view"):
            tensor_reader._rebuild_tensor(storage, offset, size, stride)

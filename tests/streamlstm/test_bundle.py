import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from streamlstm import Bundle, BundleError, InputError, ModelConfig
from tests.conftest import BundleFactory


def test_round_trip_keeps_predictions_and_metadata(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle(scaled=True, warmup_steps=5)
    bundle.metrics["rmse"] = 1.5
    bundle.save(tmp_path / "m")
    loaded = Bundle.load(tmp_path / "m")
    x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32) * 20
    np.testing.assert_array_equal(loaded.predict_sequence(x), bundle.predict_sequence(x))
    assert loaded.config == bundle.config
    assert loaded.warmup_steps == 5
    assert loaded.metrics == {"rmse": 1.5}
    assert loaded.feature_names == bundle.feature_names
    assert loaded.model_id == bundle.model_id
    meta = json.loads((tmp_path / "m" / "bundle.json").read_text())
    assert meta["schema_version"] == 1
    assert set(meta) >= {"model", "features", "targets", "scaler", "warmup_steps", "training"}


def test_missing_directory_and_files(make_bundle: BundleFactory, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nope")
    path = make_bundle().save(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors is missing"):
        Bundle.load(path)


def test_unknown_schema_version(make_bundle: BundleFactory, tmp_path: Path) -> None:
    path = make_bundle().save(tmp_path / "m")
    meta = json.loads((path / "bundle.json").read_text())
    meta["schema_version"] = 99
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown schema_version 99"):
        Bundle.load(path)


def test_corrupt_json(make_bundle: BundleFactory, tmp_path: Path) -> None:
    path = make_bundle().save(tmp_path / "m")
    (path / "bundle.json").write_text('{"schema_version": 1, "model": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(path)


def test_truncated_weights(make_bundle: BundleFactory, tmp_path: Path) -> None:
    path = make_bundle().save(tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="unreadable safetensors"):
        Bundle.load(path)


def test_weights_that_do_not_match_the_config(make_bundle: BundleFactory, tmp_path: Path) -> None:
    path = make_bundle(hidden_sizes=(16, 16, 8)).save(tmp_path / "m")
    other = make_bundle(hidden_sizes=(16, 16, 4))
    save_file(dict(other.model.state_dict()), str(path / "model.safetensors"))
    with pytest.raises(
        BundleError, match=r"has shape \[16, 16\], the model config needs \[32, 16\]"
    ):
        Bundle.load(path)
    missing = {k: v for k, v in other.model.state_dict().items() if not k.startswith("head")}
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(BundleError, match="missing head"):
        Bundle.load(path)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_pickle_is_never_executed(
    make_bundle: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_bundle().save(tmp_path / "m")
    (path / "model.safetensors").write_bytes(pickle.dumps({"w": _Boom()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError):
        Bundle.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_predict_sequence_validates_its_input(make_bundle: BundleFactory) -> None:
    bundle = make_bundle()
    with pytest.raises(InputError, match=r"x: expected shape \[T, 2\]"):
        bundle.predict_sequence(np.zeros((4, 3)))
    with pytest.raises(InputError, match="NaN"):
        bundle.predict_sequence(np.array([[0.0, np.nan]]))
    assert bundle.predict_sequence(np.zeros((0, 2))).shape == (0, 2)


def test_random_is_reproducible() -> None:
    cfg = ModelConfig(input_size=3, hidden_sizes=(32, 16), head_sizes=(8,), output_size=2)
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(
        Bundle.random(cfg, seed=3).predict_sequence(x),
        Bundle.random(cfg, seed=3).predict_sequence(x),
    )
    assert not np.array_equal(
        Bundle.random(cfg, seed=3).predict_sequence(x),
        Bundle.random(cfg, seed=4).predict_sequence(x),
    )


def test_lazy_weights_are_read_on_first_use_and_checked_against_bundle_json(
    make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle()
    path = bundle.save(tmp_path / "m")
    assert json.loads((path / "bundle.json").read_text())["model_id"] == bundle.model_id
    lazy = Bundle.load(path, lazy_weights=True)
    assert not lazy.weights_loaded and lazy.model_id == bundle.model_id  # from bundle.json
    assert not lazy.weights_loaded
    np.testing.assert_array_equal(
        lazy.weights.tensors["lstm.0.weight_ih_l0"], bundle.weights.tensors["lstm.0.weight_ih_l0"]
    )
    assert lazy.weights_loaded and lazy.model_id == bundle.model_id
    # Weights swapped under a bundle.json that names others: refused, eager or lazy.
    other = make_bundle(seed=9)
    other.save(tmp_path / "other")
    (path / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes()
    )
    with pytest.raises(BundleError, match=r"not those bundle\.json names"):
        Bundle.load(path)
    late = Bundle.load(path, lazy_weights=True)
    with pytest.raises(BundleError, match=r"not those bundle\.json names"):
        late.weights  # noqa: B018
    # A bundle.json without model_id (an older save) is computed from the weights.
    meta = json.loads((path / "bundle.json").read_text())
    del meta["model_id"]
    (path / "bundle.json").write_text(json.dumps(meta))
    assert Bundle.load(path, lazy_weights=True).model_id == other.model_id.replace(
        other.name, meta["name"]
    )


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_cell_is_saved_and_read_back(
    make_bundle: BundleFactory, tmp_path: Path, cell: str
) -> None:
    bundle = make_bundle(cell=cell, scaled=True)
    bundle.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "bundle.json").read_text())
    # An LSTM's bundle.json reads as before cells (a streamlstm that knows none reads it).
    assert meta["model"].get("cell") == (None if cell == "lstm" else cell)
    loaded = Bundle.load(tmp_path / "m")
    assert loaded.config.cell == cell and loaded.config == bundle.config
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32) * 20
    np.testing.assert_array_equal(loaded.predict_sequence(x), bundle.predict_sequence(x))
    if cell != "lstm":  # an older bundle.json (no cell) is an LSTM's: not these weights
        del meta["model"]["cell"]
        (tmp_path / "m" / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match="shape"):
            Bundle.load(tmp_path / "m")
    meta["model"]["cell"] = "lstmx"
    (tmp_path / "m" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="cell: must be one of lstm, gru, rnn, got 'lstmx'"):
        Bundle.load(tmp_path / "m")

"""Importers: the bundle reproduces the original framework's outputs on the same windows."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from streamlstm import Bundle, BundleError, ConfigError, Engine
from streamlstm.cli import main as cli_main
from tests.helpers.importing import LONG, assert_serves_like

WINDOW = 60


class TutorialLSTM(nn.Module):
    """The common PyTorch tutorial model, as users write it."""

    def __init__(self, input_size: int = 1, hidden: int = 48, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, layers, batch_first=True, dropout=0.2)
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(hidden, 24), nn.ReLU(), nn.Linear(24, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])  # type: ignore[no-any-return]


def _windows(
    rng: np.random.Generator, count: int, features: int, lo: float, hi: float
) -> np.ndarray:
    walk = np.cumsum(rng.normal(0, 1, (count, WINDOW, features)), axis=1)
    windows: np.ndarray = (lo + (hi - lo) * (walk - walk.min()) / np.ptp(walk)).astype(np.float32)
    return windows


def test_torch_state_dict_imports_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TutorialLSTM(input_size=2).eval()
    path = tmp_path / "tutorial.pth"
    torch.save(model.state_dict(), path)
    lo, hi = np.array([100.0, -3.0]), np.array([200.0, 5.0])
    code = cli_main(
        [
            "import", "torch", "--state-dict", str(path), "--out", str(tmp_path / "b"),
            "--features", "price,volume", "--feature-min", "100,-3", "--feature-max", "200,5",
        ]
    )  # fmt: skip
    assert code == 0
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.hidden_sizes == (48, 48)
    assert bundle.config.head_sizes == (24,)
    raw = _windows(np.random.default_rng(0), 6, 2, 100, 200)
    raw[:, :, 1] = raw[:, :, 1] / 25 - 3
    with torch.no_grad():
        expected_scaled = model(torch.from_numpy(((raw - lo) / (hi - lo)).astype(np.float32)))
    # The tutorial inverse-transforms with the price column's scaler.
    expected = expected_scaled.numpy()[:, 0] * (hi[0] - lo[0]) + lo[0]
    got = np.array([bundle.predict_sequence(w)[-1, 0] for w in raw])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # And served through the engine, each window as its own stream, interleaved.
    engine = Engine(bundle)
    ids = [f"w{i}" for i in range(len(raw))]
    for t in range(WINDOW):
        out = engine.step(ids, raw[:, t]).predictions[:, 0]
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_torch_scaler_fit_from_a_data_file(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = TutorialLSTM().eval()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    prices = 50 + np.cumsum(np.random.default_rng(3).normal(0, 1, 400))
    pd.DataFrame({"Close": prices}).to_csv(tmp_path / "prices.csv", index=False)
    assert cli_main(
        [
            "import", "torch", "--state-dict", str(tmp_path / "ckpt.pth"),
            "--out", str(tmp_path / "b"), "--scaler-data", str(tmp_path / "prices.csv"),
            "--features", "Close",
        ]
    ) == 0  # fmt: skip
    bundle = Bundle.load(tmp_path / "b")
    lo, hi = prices.min(), prices.max()
    window = prices[-WINDOW:].astype(np.float32)
    with torch.no_grad():
        scaled = torch.from_numpy(((window - lo) / (hi - lo)).astype(np.float32))[None, :, None]
        expected = float(model(scaled)[0, 0]) * (hi - lo) + lo
    assert bundle.predict_sequence(window[:, None])[-1, 0] == pytest.approx(expected, abs=1e-3)


def test_torch_pickled_model_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    with (tmp_path / "evil.pth").open("wb") as fh:
        pickle.dump({"lstm.weight_ih_l0": Payload()}, fh)
    with pytest.raises(BundleError, match="state_dict"):
        from streamlstm.training.importers import import_torch

        import_torch(tmp_path / "evil.pth")
    assert not marker.exists()


def test_torch_bidirectional_and_foreign_tensors_are_refused(tmp_path: Path) -> None:
    from streamlstm.training.importers import import_torch

    bi = nn.LSTM(1, 8, batch_first=True, bidirectional=True)
    state = {f"lstm.{k}": v for k, v in bi.state_dict().items()}
    state |= {"fc.weight": torch.zeros(1, 16), "fc.bias": torch.zeros(1)}
    torch.save(state, tmp_path / "bi.pth")
    with pytest.raises(ConfigError, match="cannot stream"):
        import_torch(tmp_path / "bi.pth")
    model = TutorialLSTM()
    extra = dict(model.state_dict()) | {"norm.weight": torch.ones(48)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(BundleError, match=r"norm\.weight"):
        import_torch(tmp_path / "extra.pth")


class TutorialRecurrent(nn.Module):
    """The tutorial model with an ``nn.GRU`` or ``nn.RNN`` (named as users name it)."""

    def __init__(self, cell: str, input_size: int = 2, hidden: int = 20) -> None:
        super().__init__()
        kind = {"gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn_name = cell
        setattr(self, cell, kind(input_size, hidden, 2, batch_first=True, dropout=0.2))
        self.fc = nn.Sequential(nn.Linear(hidden, 12), nn.Tanh(), nn.Linear(12, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = getattr(self, self.rnn_name)(x)
        return self.fc(out[:, -1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_torch_gru_and_rnn_state_dicts_and_modules_import_and_match(
    tmp_path: Path, cell: str
) -> None:
    from streamlstm.training.importers import import_torch

    torch.manual_seed(3)
    model = TutorialRecurrent(cell).eval()
    path = tmp_path / f"{cell}.pth"
    torch.save(model.state_dict(), path)
    # The cell from the weights' shapes, the layer from the names tried (gru, rnn).
    code = cli_main(
        ["import", "torch", "--state-dict", str(path), "--out", str(tmp_path / "b"),
         "--head-activation", "tanh"]
    )  # fmt: skip
    assert code == 0
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.cell == cell and bundle.config.hidden_sizes == (20, 20)
    raw = _windows(np.random.default_rng(1), 5, 2, -1, 1)
    with torch.no_grad():
        expected = model(torch.from_numpy(raw)).numpy()[:, 0]
    got = np.array([bundle.predict_sequence(w)[-1, 0] for w in raw])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for native in (True, False):  # served: each window a stream, interleaved
        engine = Engine(bundle, native=native)
        ids = [f"w{i}" for i in range(len(raw))]
        for t in range(WINDOW):
            out = engine.step(ids, raw[:, t]).predictions[:, 0]
        np.testing.assert_allclose(out, expected, atol=1e-5)
    # The module itself, or its state dict in memory, import the same weights.
    for source in (model, model.state_dict()):
        again = import_torch(source, head_activation="tanh", cell=cell)
        assert again.config == bundle.config
        np.testing.assert_array_equal(
            again.predict_sequence(raw[0]), bundle.predict_sequence(raw[0])
        )
    with pytest.raises(ConfigError, match=f"cell: lstm given, but .* a {cell}'s"):
        import_torch(path, cell="lstm")
    # The layer named outright (--rnn-prefix; --lstm-prefix, its older name, alike).
    for flag in ("--rnn-prefix", "--lstm-prefix"):
        named = tmp_path / flag.strip("-")
        args = ["import", "torch", "--state-dict", str(path), flag, cell, "--out", str(named),
                "--head-activation", "tanh"]  # fmt: skip
        assert cli_main(args) == 0 and Bundle.load(named).config == bundle.config
    with pytest.raises(BundleError, match=r"no tensors named fc1.*pass --rnn-prefix"):
        import_torch(path, rnn_prefix="fc1")


def test_torch_relu_rnn_module_and_odd_shapes_are_refused() -> None:
    from streamlstm.training.importers import import_torch

    model = TutorialRecurrent("rnn")
    model.rnn = nn.RNN(2, 20, 2, batch_first=True, nonlinearity="relu")
    with pytest.raises(ConfigError, match="nonlinearity='relu' is not supported"):
        import_torch(model)
    odd = {"lstm.weight_ih_l0": torch.zeros(10, 1), "lstm.weight_hh_l0": torch.zeros(10, 5)}
    odd |= {"fc.weight": torch.zeros(1, 5)}
    with pytest.raises(BundleError, match="not an LSTM's, GRU's or RNN's"):
        import_torch(odd)


def _randomise(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Keras starts biases at zero; random ones make the bias mapping matter.
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])


def test_keras_tutorial_model_matches_keras(tmp_path: Path) -> None:
    model = keras.Sequential(
        [
            keras.Input((WINDOW, 1)),
            keras.layers.LSTM(128, return_sequences=True),
            keras.layers.Dropout(0.2),
            keras.layers.LSTM(64),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    _randomise(model, 0)
    model.save(tmp_path / "tutorial.keras")
    x = np.random.default_rng(1).uniform(0, 1, (8, WINDOW, 1)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0))[:, 0]
    assert (
        cli_main(
            ["import", "keras", str(tmp_path / "tutorial.keras"), "--out", str(tmp_path / "b")]
        )
        == 0
    )
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.config.hidden_sizes == (128, 64)
    assert bundle.config.head_sizes == (32,)
    assert bundle.input_scaler is None and bundle.target_scaler is None
    assert bundle.warmup_steps == WINDOW
    got = np.array([bundle.predict_sequence(w)[-1, 0] for w in x])
    # Random weights of scale 0.3 over 60 steps make float32 ill-conditioned:
    # against the same model run in float64, Keras (torch backend, Keras 3.15)
    # was off by 1.0e-4 on window 0 and predict_sequence by 2.4e-5. A wrong
    # weight mapping moves answers by 1e-1, so 5e-4 still tells them apart.
    np.testing.assert_allclose(got, expected, atol=5e-4, rtol=0)


def test_keras_functional_sequence_model_with_softmax(tmp_path: Path) -> None:
    inputs = keras.Input((20, 3))
    h = keras.layers.LSTM(16, return_sequences=True)(inputs)
    h = keras.layers.LSTM(16, return_sequences=True)(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    outputs = keras.layers.Dense(4, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    _randomise(model, 5)
    model.save(tmp_path / "seq.keras")
    x = np.random.default_rng(2).normal(0, 1, (3, 20, 3)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0))  # [3, 20, 4], an output every step
    from streamlstm.training.keras_import import import_keras

    bundle = import_keras(tmp_path / "seq.keras")
    assert bundle.outputs.activation == "softmax"
    for window, want in zip(x, expected, strict=True):
        np.testing.assert_allclose(bundle.predict_sequence(window), want, atol=1e-4)


def test_keras_unsupported_layers_and_bad_files_are_named(tmp_path: Path) -> None:
    from streamlstm.training.keras_import import import_keras

    model = keras.Sequential(
        [keras.Input((10, 1)), keras.layers.Conv1D(4, 3), keras.layers.Dense(1)]
    )
    model.save(tmp_path / "conv.keras")
    with pytest.raises(ConfigError, match=r"'conv1d' \(Conv1D\) is not supported"):
        import_keras(tmp_path / "conv.keras")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(BundleError, match=r"config\.json"):
        import_keras(tmp_path / "empty.keras")
    with pytest.raises(BundleError, match="does not exist"):
        import_keras(tmp_path / "missing.keras")


def _keras_stack(cell: type[keras.layers.Layer], features: int, **options: object) -> keras.Model:
    """Two recurrent layers of ``cell`` returning sequences, then a Dense head: one
    output per tick, as the engine serves it."""
    model = keras.Sequential(
        [
            keras.Input((None, features)),
            cell(16, return_sequences=True, **options),
            keras.layers.Dropout(0.1),
            cell(12, return_sequences=True, **options),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(7)
    # Random biases (Keras starts them at zero) and weights small enough that a
    # 1,000-tick float32 run stays well conditioned, so 1e-5 tells a mapping apart.
    model.set_weights(
        [
            rng.normal(0, 0.2 if w.ndim == 1 or w.shape[0] == 2 else 0.6 / np.sqrt(w.shape[0]),
                       w.shape).astype(np.float32)
            for w in model.get_weights()
        ]
    )  # fmt: skip
    return model


@pytest.mark.parametrize(
    ("layer", "cell"), [("GRU", "gru"), ("SimpleRNN", "rnn"), ("LSTM", "lstm")]
)
def test_keras_recurrent_models_match_keras_over_a_long_sequence(
    tmp_path: Path, layer: str, cell: str
) -> None:
    model = _keras_stack(getattr(keras.layers, layer), 3)
    model.save(tmp_path / f"{cell}.keras")
    rng = np.random.default_rng(11)
    x = np.cumsum(rng.normal(0, 0.3, (2, LONG, 3)), axis=1).astype(np.float32)
    x = np.sin(x)  # a wandering, bounded signal
    expected = np.asarray(model.predict(x, verbose=0))  # Keras' own: [2, 1000, 2]
    out = tmp_path / "b"
    assert cli_main(["import", "keras", str(tmp_path / f"{cell}.keras"), "--out", str(out)]) == 0
    bundle = Bundle.load(out)
    assert bundle.config.cell == cell and bundle.config.hidden_sizes == (16, 12)
    assert bundle.config.head_sizes == (8,) and bundle.config.head_activation == "tanh"
    assert_serves_like(bundle, x, expected, atol=1e-5)


def test_keras_gru_reset_before_other_activations_and_mixed_cells_are_refused(
    tmp_path: Path,
) -> None:
    from streamlstm.training.keras_import import import_keras

    cases = {
        "reset": (
            _keras_stack(keras.layers.GRU, 1, reset_after=False),
            r"layer 'gru\w*' \(GRU\) has reset_after=False",
        ),
        "relu": (
            _keras_stack(keras.layers.SimpleRNN, 1, activation="relu"),
            r"'simple_rnn\w*' \(SimpleRNN\) uses activation 'relu'; only tanh",
        ),
        "hard": (
            _keras_stack(keras.layers.GRU, 1, recurrent_activation="hard_sigmoid"),
            "recurrent_activation 'hard_sigmoid'",
        ),
        "mixed": (
            keras.Sequential(
                [
                    keras.Input((None, 1)),
                    keras.layers.LSTM(4, return_sequences=True),
                    keras.layers.GRU(4),
                    keras.layers.Dense(1),
                ]
            ),
            r"mixes recurrent layers \(LSTM -> GRU\)",
        ),
        "backwards": (
            _keras_stack(keras.layers.GRU, 1, go_backwards=True),
            "runs backwards in time",
        ),
    }
    for name, (model, message) in cases.items():
        model.save(tmp_path / f"{name}.keras")
        with pytest.raises(ConfigError, match=message):
            import_keras(tmp_path / f"{name}.keras")

import numpy as np
import pytest
import torch

from streamlstm import ConfigError, ModelConfig, StreamLSTM
from streamlstm.numpy_step import run_head
from streamlstm.weights import ModelWeights, expected_shapes
from tests.conftest import BundleFactory


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_shapes_and_state_per_layer(cell: str) -> None:
    config = ModelConfig(input_size=3, hidden_sizes=(32, 32, 16), output_size=2, cell=cell)
    model = StreamLSTM(config).eval()
    kind = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    assert all(type(m) is kind for m in model.lstm)  # torch's own module, nothing else
    y, state = model(torch.randn(4, 7, 3))
    assert y.shape == (4, 7, 2)
    assert [tuple(layer[0].shape) for layer in state] == [(4, 32), (4, 32), (4, 16)]
    assert {len(layer) for layer in state} == {2 if cell == "lstm" else 1}  # (h, c) or (h,)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_state_carries_across_calls(cell: str) -> None:
    model = StreamLSTM(ModelConfig(input_size=1, hidden_sizes=(8, 4), cell=cell)).eval()
    x = torch.randn(2, 10, 1)
    with torch.no_grad():
        whole, _ = model(x)
        first, state = model(x[:, :6])
        second, _ = model(x[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=0)


def test_default_head_is_dropout_linear_relu_linear() -> None:
    model = StreamLSTM(ModelConfig())
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Linear"]
    assert model.head[1].in_features == 128 and model.head[1].out_features == 64


def test_dropout_acts_in_training_only() -> None:
    model = StreamLSTM(ModelConfig(input_size=1, hidden_sizes=(16, 16), dropout=0.5))
    x = torch.randn(3, 5, 1)
    model.train()
    torch.manual_seed(0)
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_oracle_agrees_with_whole_sequence_forward(make_bundle: BundleFactory) -> None:
    bundle = make_bundle(hidden_sizes=(24, 24, 12))
    x = np.random.default_rng(1).normal(size=(200, 2)).astype(np.float32)
    with torch.no_grad():
        y, _ = bundle.model(torch.from_numpy(x)[None])
    np.testing.assert_allclose(bundle.predict_sequence(x), y[0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "linear"])
@pytest.mark.parametrize("head_sizes", [(), (16,), (16, 8)])
def test_the_numpy_head_computes_what_the_torch_head_does(
    activation: str, head_sizes: tuple[int, ...]
) -> None:
    config = ModelConfig(
        input_size=1,
        hidden_sizes=(12,),
        head_sizes=head_sizes,
        head_activation=activation,
        output_size=3,
    )
    model = StreamLSTM(config).eval()
    weights = model.weights()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (5, 40, 3):
            x = torch.randn(rows, 12, generator=gen) * 3
            got = run_head(weights.head, x.numpy())
            np.testing.assert_allclose(got, model.head(x).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(input_size=3, hidden_sizes=(12, 12, 6), head_sizes=(16, 8), output_size=3),
        ModelConfig(input_size=2, hidden_sizes=(7,), head_sizes=(), head_activation="linear"),
        ModelConfig(input_size=3, hidden_sizes=(12, 12, 6), cell="gru"),
        ModelConfig(input_size=2, hidden_sizes=(7,), head_sizes=(), cell="rnn"),
    ],
)
def test_numpy_weights_name_and_shape_every_tensor_as_the_torch_module(
    config: ModelConfig,
) -> None:
    # Serving reads model.safetensors into ModelWeights without torch; training
    # writes it from StreamLSTM.state_dict(): the two must agree name for name.
    model = StreamLSTM(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(config)
    weights = model.weights()
    back = StreamLSTM.from_weights(weights)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert [lin.activation for lin in weights.head][-1] == ""


def test_numpy_weights_refuse_a_wrong_shape_or_dtype() -> None:
    config = ModelConfig(input_size=1, hidden_sizes=(8,), head_sizes=(4,))
    tensors = dict(ModelWeights.random(config).tensors)
    tensors["head.3.bias"] = np.zeros(2, np.float32)
    with pytest.raises(ConfigError, match=r"tensor head.3.bias has shape \[2\]"):
        ModelWeights(config, tensors)
    tensors["head.3.bias"] = np.zeros(1, np.float64)
    with pytest.raises(ConfigError, match=r"tensor head\.3\.bias has dtype float64"):
        ModelWeights(config, tensors)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_random_weights_are_drawn_within_torchs_init_bounds(cell: str) -> None:
    config = ModelConfig(input_size=3, hidden_sizes=(16, 4), cell=cell)
    weights = ModelWeights.random(config, seed=1)
    for layer, hidden in zip(weights.layers, (16, 4), strict=True):
        for array in (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh):
            assert np.abs(array).max() <= 1 / np.sqrt(hidden)


def test_a_gru_layers_products_give_torchs_gate_sums_joined_or_apart() -> None:
    """The default model's first layer (one input) has W_hn h as columns of the [x, h]
    product, its second (128 inputs) as a product of its own (gru_n_h_apart); either
    way the blocks r, z, n_h, n_x are torch's W_ih x + b_ih and W_hh h + b_hh."""
    weights = ModelWeights.random(ModelConfig(input_size=1, cell="gru"), seed=1)
    assert [layer.n_h_apart for layer in weights.layers] == [False, True]
    rng = np.random.default_rng(0)
    for layer in weights.layers:
        hidden, inputs = layer.hidden_size, int(layer.w_ih.shape[1])
        x = rng.standard_normal((5, inputs)).astype(np.float32)
        h = rng.uniform(-1, 1, (5, hidden)).astype(np.float32)
        w, bias = layer.fused()
        n_h, n_x = layer.gru_apart()
        assert w.shape == (inputs + hidden, (2 if layer.n_h_apart else 3) * hidden)
        assert (n_h is not None) == layer.n_h_apart
        parts = [np.concatenate([x, h], axis=1) @ w]
        parts += [] if n_h is None else [h @ n_h]
        got = np.concatenate([*parts, x @ n_x], axis=1) + bias
        gi = x @ layer.w_ih.T + layer.b_ih
        gh = h @ layer.w_hh.T + layer.b_hh
        r, z = slice(0, hidden), slice(hidden, 2 * hidden)
        n = slice(2 * hidden, 3 * hidden)
        want = np.concatenate([gi[:, r] + gh[:, r], gi[:, z] + gh[:, z], gh[:, n], gi[:, n]], 1)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

import numpy as np
import pytest
import torch

from streamlstm import ConfigError, ModelConfig, StreamLSTM
from streamlstm.model import HeadRunner
from tests.conftest import BundleFactory


def test_forward_shapes_and_state_per_layer() -> None:
    model = StreamLSTM(ModelConfig(input_size=3, hidden_sizes=(32, 32, 16), output_size=2)).eval()
    y, state = model(torch.randn(4, 7, 3))
    assert y.shape == (4, 7, 2)
    assert [tuple(h.shape) for h, _ in state] == [(4, 32), (4, 32), (4, 16)]


def test_state_carries_across_calls() -> None:
    model = StreamLSTM(ModelConfig(input_size=1, hidden_sizes=(8, 4))).eval()
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
def test_head_runner_computes_what_the_head_does(
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
    runner = HeadRunner(model)
    gen = torch.Generator().manual_seed(0)
    kept = []
    with torch.inference_mode():
        for rows in (5, 40, 3):  # grows its buffers, then reuses them
            x = torch.randn(rows, 12, generator=gen) * 3
            got = runner(x)
            torch.testing.assert_close(got, model.head(x), atol=1e-6, rtol=0)
            kept.append((got, model.head(x)))
    for got, want in kept:  # what it returned is not overwritten by later calls
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_head_runner_refuses_a_head_module_it_cannot_run() -> None:
    model = StreamLSTM(ModelConfig(input_size=1, hidden_sizes=(8,), head_sizes=(4,))).eval()
    model.head[2] = torch.nn.GELU()  # in place of the ReLU after the first Linear
    with pytest.raises(ConfigError, match="head: no inference path for GELU"):
        HeadRunner(model)

import re

import pytest

from streamlstm import ConfigError, ModelConfig


def test_defaults_are_the_tutorial_model() -> None:
    cfg = ModelConfig()
    assert cfg.hidden_sizes == (128, 128)
    assert cfg.num_layers == 2
    assert cfg.dropout == 0.2
    assert cfg.head_sizes == (64,)


def test_round_trips_through_a_dict() -> None:
    cfg = ModelConfig(input_size=3, hidden_sizes=(32, 16), head_sizes=(8,), output_size=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for cell in ("gru", "rnn"):
        other = ModelConfig(input_size=3, cell=cell)
        assert other.to_dict()["cell"] == cell
        assert ModelConfig.from_dict(other.to_dict()) == other


def test_the_cell_defaults_to_lstm_and_only_an_lstm_keeps_c() -> None:
    assert ModelConfig().cell == "lstm" and "cell" not in ModelConfig().to_dict()
    assert ModelConfig.from_dict({"input_size": 1}).cell == "lstm"  # a bundle before cells
    assert [ModelConfig(cell=c).keeps_c for c in ("lstm", "gru", "rnn")] == [True, False, False]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_size": 0}, "input_size"),
        ({"hidden_sizes": ()}, "hidden_sizes"),
        ({"hidden_sizes": (8, -1)}, "hidden_sizes[1]"),
        ({"head_sizes": (0,)}, "head_sizes[0]"),
        ({"dropout": 1.0}, "dropout"),
        ({"output_size": True}, "output_size"),
        ({"head_activation": "gelu"}, "head_activation"),
        ({"cell": "lstm2"}, "cell"),
        ({"cell": "GRU"}, "cell"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_bidirectional_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="cannot stream"):
        ModelConfig(bidirectional=True)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"input_size": 1, "layers": 3})

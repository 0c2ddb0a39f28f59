"""``--model`` as one bundle or a directory of versioned bundles: the newest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlstm import Bundle, BundleError, ConfigError, ModelConfig
from streamlstm.consumers.models.source import ModelSource, check_shadow

CONFIG = ModelConfig(input_size=2, hidden_sizes=(4,), head_sizes=(), output_size=1)


def _save(path: Path, seed: int) -> Bundle:
    bundle = Bundle.random(CONFIG, seed=seed)
    bundle.save(path)
    return bundle


def test_the_newest_version_serves_digits_compared_as_numbers(tmp_path: Path) -> None:
    for name, seed in (("v9", 1), ("v10", 2), ("v2", 3)):
        _save(tmp_path / name, seed)
    found = ModelSource(tmp_path).resolve()
    assert found.version == "v10" and found.bundle.name == "random-2"
    assert not found.bundle.weights_loaded  # bundle.json only: the engine reads weights


def test_a_version_that_does_not_load_is_skipped_and_none_at_all_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path / "1", 1)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "bundle.json").write_text("{ half-copied")
    assert ModelSource(tmp_path).resolve().version == "1"
    assert "model version" in caplog.text and "skipped" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no bundle"):
        ModelSource(empty).resolve()


def test_one_bundle_is_itself_and_a_missing_path_says_so(tmp_path: Path) -> None:
    bundle = _save(tmp_path / "model", 4)
    found = ModelSource(tmp_path / "model").resolve()
    assert (found.version, found.bundle.model_id) == ("", bundle.model_id)
    with pytest.raises(BundleError, match="does not exist"):
        ModelSource(tmp_path / "nope").resolve()


def test_a_shadow_must_take_the_served_models_inputs() -> None:
    served = Bundle.random(CONFIG, feature_names=["load", "temp"])
    check_shadow(served, Bundle.random(CONFIG, seed=1, feature_names=["load", "temp"]))
    check_shadow(served, Bundle.random(CONFIG, seed=1))  # unnamed (x0, x1): by position
    with pytest.raises(ConfigError, match="shadow_model: takes 3 inputs, the served model 2"):
        wider = ModelConfig(input_size=3, hidden_sizes=(4,), head_sizes=(), output_size=1)
        check_shadow(served, Bundle.random(wider))
    with pytest.raises(ConfigError, match=r"features \['temp', 'load'\] are not"):
        check_shadow(served, Bundle.random(CONFIG, feature_names=["temp", "load"]))

"""Shared factory fixtures, and which broker the suite runs on (in pytest's header)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamlstm import Affine, Bundle, ModelConfig

BundleFactory = Callable[..., Bundle]


@pytest.fixture
def make_bundle() -> BundleFactory:
    """``make_bundle(scaled=True, seed=0, **config)``: a random bundle, optionally with scalers."""

    def factory(
        *, scaled: bool = False, seed: int = 0, warmup_steps: int = 0, **config: Any
    ) -> Bundle:
        config.setdefault("input_size", 2)
        config.setdefault("hidden_sizes", (16, 16, 8))
        config.setdefault("head_sizes", (8,))
        config.setdefault("output_size", 2)
        cfg = ModelConfig(**config)
        kwargs: dict[str, Any] = {"warmup_steps": warmup_steps}
        if scaled:
            rng = np.random.default_rng(seed)
            lo = rng.uniform(-50, 0, cfg.input_size)
            kwargs["input_scaler"] = Affine.from_min_max(
                lo, lo + rng.uniform(1, 100, cfg.input_size)
            )
            tlo = rng.uniform(-5, 5, cfg.output_size)
            kwargs["target_scaler"] = Affine.from_min_max(
                tlo, tlo + rng.uniform(1, 10, cfg.output_size)
            )
        return Bundle.random(cfg, seed=seed, **kwargs)

    return factory


def pytest_report_header() -> str:
    external = os.environ.get("STREAMLSTM_TEST_BOOTSTRAP")
    if external:
        return f"broker: the one at {external} (STREAMLSTM_TEST_BOOTSTRAP)"
    kind = os.environ.get("STREAMLSTM_TEST_BROKER", "kafka")
    if kind == "tansu":
        return "broker: Tansu, one node, memory only (STREAMLSTM_TEST_BROKER=tansu)"
    from streamlstm.consumers.devtools.apache_kafka import KAFKA_VERSION

    return f"broker: Apache Kafka {KAFKA_VERSION}, KRaft, one node (STREAMLSTM_TEST_BROKER={kind})"

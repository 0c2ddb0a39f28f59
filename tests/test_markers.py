"""The markers tests/conftest.py sets, and the unit tests' guard against a broker."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from streamlstm import BrokerError
from streamlstm.consumers.devtools.apache_kafka import KafkaCluster
from streamlstm.consumers.devtools.tansu import TansuBroker
from tests.conftest import BROKER_FIXTURES, BrokerToolGuard

KINDS = ("unit", "broker", "cluster", "deploy")


def test_every_collected_test_is_unit_or_else_marked_for_what_it_needs(
    request: pytest.FixtureRequest,
) -> None:
    # Whatever this run selected (-m unit included): each test's marks follow the rules.
    items = request.session.items
    assert request.node in items
    deploy = Path(__file__).resolve().parent / "deploy"
    for item in items:
        marks = {m for m in KINDS if item.get_closest_marker(m)}
        uses_broker = bool(BROKER_FIXTURES & set(getattr(item, "fixturenames", ())))
        under_deploy = deploy in Path(str(item.path)).resolve().parents
        assert ("unit" in marks) == (marks == {"unit"}), (item.nodeid, marks)
        assert ("unit" in marks) != (uses_broker or under_deploy or bool(marks - {"unit"}))
        if uses_broker or "cluster" in marks:
            assert "broker" in marks, item.nodeid
        assert ("deploy" in marks) == under_deploy, item.nodeid


def test_a_unit_test_finds_no_java_maven_or_tansu(
    request: pytest.FixtureRequest, broker_tool_guard: BrokerToolGuard, tmp_path: Path
) -> None:
    assert request.node.get_closest_marker("unit")
    for tool in ("java", "mvn"):
        found = shutil.which(tool)
        assert found == str(broker_tool_guard.bin / tool), found
        assert subprocess.run([found, "-version"], capture_output=True).returncode == 97
    assert [call.split()[0] for call in broker_tool_guard.take()] == ["java", "mvn"]
    # Apache Kafka (its jars through Maven unless cached, then Java) and Tansu: each
    # start fails, and the guard saw it (else it fails the test at its teardown).
    with pytest.raises(BrokerError):
        KafkaCluster(nodes=1, data_dir=tmp_path / "kafka").start()
    assert {call.split()[0] for call in broker_tool_guard.take()} & {"java", "mvn"}
    with pytest.raises(BrokerError, match="exited"):
        TansuBroker().start()
    assert [call.split()[0] for call in broker_tool_guard.take()] == ["tansu"]


@pytest.mark.apache_kafka
def test_a_test_marked_apache_kafka_gets_apache_kafka(bootstrap: str, kafka_bootstrap: str) -> None:
    # On a Tansu suite (STREAMLSTM_TEST_BROKER=tansu) these differ unless the marker
    # is read per test: a session-wide bootstrap once served every module one broker.
    assert bootstrap == kafka_bootstrap


def test_an_unmarked_test_gets_the_suite_broker(bootstrap: str, suite_broker: str) -> None:
    assert bootstrap == suite_broker

"""A real Prometheus scrapes a real daemon with deploy/'s rules; every query is run.

The test starts `streamlstm serve` on a random model against Apache Kafka,
with durable state (`--state durable`, a checkpoint every 500 ms, so that the
checkpoint and restore series hold real data, not memory mode's zeros), once
per guarantee (at-least-once, and exactly-once with its transactions), feeds
it valid and invalid ticks (so that the dead-letter series exist), and
starts Debian's `prometheus` on a free port with a 1 s scrape and evaluation
interval, loading deploy/prometheus/rules. Then, through the HTTP API:

- every rule loads and evaluates without error, every recording rule's
  expression and recorded series has data, every alert expression parses;
- every query of every dashboard panel parses, and has data unless it reads a
  series the daemon does not expose (listed in NOT_EXPOSED, each with why);
  each dashboard variable (`label_values`) has values;
- every series name the rules and the dashboard read is one the daemon exposes
  (or in NOT_EXPOSED), so a renamed metric fails here;
- the rules see the daemon as durable and checkpointing, and
  StreamlstmCheckpointsStopped is not pending;
- ticks fed while Prometheus watches: exactly-once commits transactions
  (the rules see a committed rate above 0), at-least-once exports both
  outcomes at 0; no aborted transaction, StreamlstmTransactionsAborted is not
  pending;
- the model's quality series (a forecaster that flags, with training figures and
  statistics) feed the quality rules and panels; the served level moves three
  training sds up and StreamlstmInputDrift goes pending;
- after the daemon stops, StreamlstmInstanceDown goes pending.

It fails (never skips) when prometheus is not installed.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streamlstm import Bundle, ModelConfig, OutputSpec
from tests.deploy.conftest import DEPLOY, tool

# Durable state needs what Tansu lacks (topic configs, compaction, exact end offsets):
# Apache Kafka even when the suite runs on Tansu.
pytestmark = pytest.mark.apache_kafka

RULES = DEPLOY / "prometheus" / "rules"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamlstm.json"
STREAMLSTM = str(Path(sys.executable).with_name("streamlstm"))
#: Series the dashboard reads that the daemon does not expose today.
NOT_EXPOSED: dict[str, str] = {}
#: Dashboard variables, as Grafana would fill them in.
VARIABLES = {"$__rate_interval": "1m", "$job": "streamlstm", "$instance": ".*"}
METRIC = re.compile(r"(?<![:\w$])((?:streamlstm|process)_[a-z0-9_]+|up)(?![:\w(])")
VALID = 40
#: The input drift's window (ticks), and a level shift of three training sds.
DRIFT_WINDOW, SHIFT = 20, 3 * 0.12


def forecaster_with_a_flag() -> Bundle:
    """A model with every quality series: it forecasts its input (so it sees its
    truth), scores and flags ticks, and carries training figures and statistics
    (the ticks sent lie around the training mean; ``SHIFT`` moves them 3 sd up)."""
    config = ModelConfig(input_size=1, hidden_sizes=(8,), head_sizes=(4,), output_size=1)
    return Bundle.random(
        config,
        seed=0,
        outputs=OutputSpec(target_feature=0, score_span=5, threshold=1.5, false_alarm_rate=0.05),
        training={"inputs": {"mean": [0.7], "std": [0.12]}},
        metrics={"horizons": {"1": {"mae": 0.05, "persistence_mae": 0.01}}},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait(what: str, check: Callable[[], bool], timeout: float, *procs: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"waiting for {what}: {proc.args[0]} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = _http(url)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def error(self, expr: str) -> str | None:
        status, body = _http(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        reply = json.loads(body)
        return None if status == 200 and reply["status"] == "success" else str(reply)


def _alert_in(name: str, prom: Prom, state: str | None = None) -> bool:
    """Whether alert ``name`` is pending or firing (in ``state``, where given)."""
    return any(
        a["labels"]["alertname"] == name and state in (None, a["state"])
        for a in prom.api("alerts")["alerts"]
    )


def _metrics(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unhandled variable in {panel['title']}: {expr}"
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    assert len(queries) >= 20
    return queries


def _variable_queries() -> list[tuple[str, str, str]]:
    """(name, series selector, label) of each `label_values(...)` dashboard variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
        assert match, variable["query"]
        selector = match.group(1).replace("$job", VARIABLES["$job"])
        found.append((variable["name"], selector, match.group(2)))
    assert {name for name, _, _ in found} == {"job", "instance"}
    return found


async def _send_ticks(bootstrap: str, topic: str, shift: float = 0.0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for i in range(VALID):
            stream = f"s{i % 4}"
            tick = {"stream": stream, "ts": now_ms + i, "values": [0.5 + i / 100 + shift]}
            await producer.send(topic, key=stream.encode(), value=json.dumps(tick).encode())
        await producer.send(topic, key=b"s1", value=b"not json")
        await producer.send(topic, key=b"s2", value=b'{"stream": "s2", "values": [1, 2]}')
        await producer.flush()
    finally:
        await producer.stop()


@pytest.fixture(params=["at-least-once", "exactly-once"])
def guarantee(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


#: The daemon's process, its metrics port, and a function that sends the ticks again.
Daemon = tuple[subprocess.Popen[bytes], int, Callable[..., None]]


@pytest.fixture
def daemon(
    bootstrap: str, make_topics: Callable[..., list[str]], guarantee: str, tmp_path: Path
) -> Iterator[Daemon]:
    model = tmp_path / "model"
    forecaster_with_a_flag().save(model)
    ticks, predictions = make_topics("ticks", "predictions", partitions=2)
    port = _free_port()
    log = (tmp_path / "daemon.log").open("wb")
    command = [
        STREAMLSTM,
        "serve",
        "--model",
        str(model),
        "--bootstrap-servers",
        bootstrap,
        "--input-topic",
        ticks,
        "--output-topic",
        predictions,
        "--group-id",
        f"deploy-{uuid.uuid4().hex[:8]}",
        "--create-topics",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(port),
        "--metrics-interval-s",
        "1",
        # Durable state, so that the checkpoint and restore series have data (in memory
        # mode they are all 0, and the labelled ones, by kind and by reason, absent).
        "--state",
        "durable",
        "--commit-interval-ms",
        "500",
        "--guarantee",
        guarantee,
        "--drift-window-ticks",
        str(DRIFT_WINDOW),
        # A state dir: the cold tier's and the local checkpoints' series and panels.
        "--state-dir",
        str(tmp_path / "state"),
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = f"http://127.0.0.1:{port}/readyz"
        _wait("the daemon's /readyz", lambda: _http(ready)[0] == 200, 120, proc)
        asyncio.run(_send_ticks(bootstrap, ticks))

        sent = 1

        def answered() -> bool:
            text = _http(f"http://127.0.0.1:{port}/metrics")[1].decode()
            found = re.search(r"^streamlstm_predictions_produced_total (\S+)$", text, re.M)
            return (
                found is not None
                and float(found.group(1)) >= VALID * sent
                and ('streamlstm_dead_letters_total{reason="values"}' in text)
            )

        _wait("predictions and dead letters", answered, 60, proc)

        def feed(shift: float = 0.0) -> None:
            nonlocal sent
            asyncio.run(_send_ticks(bootstrap, ticks, shift))
            sent += 1
            _wait("predictions of the ticks sent again", answered, 60, proc)

        yield proc, port, feed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if sys.exc_info()[0] is not None:
            print((tmp_path / "daemon.log").read_text()[-4000:])


@pytest.fixture
def prometheus(daemon: Daemon, tmp_path: Path) -> Iterator[tuple[Prom, subprocess.Popen[bytes]]]:
    binary = tool("prometheus")
    _, metrics_port, _ = daemon
    rule_files = sorted(str(p) for p in RULES.glob("*.yml"))
    assert rule_files
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [
            {
                "job_name": "streamlstm",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prom(port)
    try:
        _wait("prometheus /-/ready", lambda: _http(f"{prom.base}/-/ready")[0] == 200, 60, proc)
        yield prom, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if sys.exc_info()[0] is not None:
            print((tmp_path / "prometheus.log").read_text()[-4000:])


def test_rules_and_dashboard_against_a_live_daemon(
    daemon: Daemon, prometheus: tuple[Prom, subprocess.Popen[bytes]], guarantee: str
) -> None:
    prom, prom_proc = prometheus
    proc, _, feed = daemon

    def scraped() -> bool:
        samples = prom.query('count_over_time(up{job="streamlstm"}[1m])')
        return bool(samples) and float(samples[0]["value"][1]) >= 6

    _wait("six scrapes of the daemon", scraped, 60, proc, prom_proc)
    assert [s["value"][1] for s in prom.query('up{job="streamlstm"}')] == ["1"]
    exposed = set(prom.api("label/__name__/values"))

    groups = prom.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recording = [r for r in rules if r["type"] == "recording"]
    alerting = [r for r in rules if r["type"] == "alerting"]
    assert len(recording) >= 15 and len(alerting) >= 8

    def evaluated() -> bool:
        current = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return all(r.get("lastEvaluation", "").startswith("2") for r in current) and all(
            prom.query(r["name"]) for r in current if r["type"] == "recording"
        )

    _wait("every recording rule to have recorded", evaluated, 30, proc, prom_proc)
    problems = []
    read: set[str] = set()
    for rule in [r for g in prom.api("rules")["groups"] for r in g["rules"]]:
        if rule["health"] != "ok":
            problems.append(f"rule {rule['name']}: {rule['health']} {rule.get('lastError')}")
        read |= _metrics(rule["query"])
        if rule["type"] == "recording" and not prom.query(rule["query"]):
            problems.append(f"recording rule {rule['name']}: no data")
        if rule["type"] == "alerting" and (error := prom.error(rule["query"])):
            problems.append(f"alert {rule['name']}: {error}")
        annotations = rule.get("annotations", {})
        if rule["type"] == "alerting":
            for key in ("summary", "description", "runbook_url"):
                if not annotations.get(key):
                    problems.append(f"alert {rule['name']}: no {key} annotation")

    for title, expr in _panel_queries():
        if error := prom.error(expr):
            problems.append(f"panel {title}: {error}")
            continue
        names = _metrics(expr)
        read |= names
        if not names & NOT_EXPOSED.keys() and not prom.query(expr):
            problems.append(f"panel {title}: no data for {expr}")

    for name, selector, label in _variable_queries():
        read |= _metrics(selector)
        values = prom.api(f"label/{label}/values", **{"match[]": selector})
        if not values:
            problems.append(f"variable ${name}: label_values({selector}, {label}) is empty")

    unknown = read - exposed - NOT_EXPOSED.keys()
    if unknown:
        problems.append(f"series the daemon does not expose: {sorted(unknown)}")

    # The checkpoint alert's guard sees a durable daemon, which checkpoints (every 500 ms).
    durable = prom.query("instance:streamlstm_state_durable:bool")
    if [s["value"][1] for s in durable] != ["1"]:
        problems.append(f"instance:streamlstm_state_durable:bool is {durable}, not 1")
    if not prom.query("instance:streamlstm_checkpoints:rate5m > 0"):
        problems.append("instance:streamlstm_checkpoints:rate5m is not above 0")
    if any(
        a["labels"]["alertname"] == "StreamlstmCheckpointsStopped"
        for a in prom.api("alerts")["alerts"]
    ):
        problems.append("StreamlstmCheckpointsStopped is pending or firing")
    assert not problems, "\n".join(problems)

    # Transactions: the first ticks' went before the first scrape (a rate cannot see
    # them); ticks sent now are committed in transactions while Prometheus watches.
    feed()
    committed = 'instance_outcome:streamlstm_transactions:rate5m{outcome="committed"}'
    if guarantee == "exactly-once":
        _wait(f"{committed} > 0", lambda: bool(prom.query(f"{committed} > 0")), 30, proc)
    else:
        time.sleep(3)  # scraped and evaluated after the ticks
        outcomes = prom.query("instance_outcome:streamlstm_transactions:rate5m")
        assert sorted((s["metric"]["outcome"], s["value"][1]) for s in outcomes) == [
            ("aborted", "0"),
            ("committed", "0"),
        ]
    aborted = prom.query("instance:streamlstm_transactions_aborted:increase15m")
    assert [s["value"][1] for s in aborted] == ["0"]
    assert not any(
        a["labels"]["alertname"] == "StreamlstmTransactionsAborted"
        for a in prom.api("alerts")["alerts"]
    )

    # The served level moves three training sds up: within the drift window the EW
    # mean crosses the alert's line, and StreamlstmInputDrift goes pending.
    assert not _alert_in("StreamlstmInputDrift", prom)
    feed(SHIFT)
    _wait(
        "StreamlstmInputDrift to go pending",
        lambda: _alert_in("StreamlstmInputDrift", prom, "pending"),
        30,
        proc,
        prom_proc,
    )
    drift = prom.query('max by (feature) (streamlstm_input_drift_z{job="streamlstm"})')
    assert [s["metric"]["feature"] for s in drift] == ["x0"] and float(drift[0]["value"][1]) > 2

    # The daemon goes away: the instance-down alert goes pending (its `for` is 2m).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0

    def pending() -> bool:
        alerts = prom.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "StreamlstmInstanceDown" and a["state"] == "pending"
            for a in alerts
        )

    _wait("StreamlstmInstanceDown to go pending", pending, 30, prom_proc)

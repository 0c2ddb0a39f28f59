"""The Helm chart, rendered by the helm that deploy/check.sh builds.

What `deploy/check.sh` cannot see by linting: that the daemon accepts the
chart's TOML config, that every STREAMLSTM_* variable anywhere in deploy/ is a
real `serve` setting, and the chart's rules about grace periods, KEDA and
secrets.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from streamlstm.consumers.settings import ServeConfig, parse_serve_args
from streamlstm.errors import ConfigError
from tests.deploy.conftest import DEPLOY
from tests.helpers.chart import (
    ALL_OPTIONS,
    CHART,
    container,
    helm_template,
    one,
    render,
    yaml_docs,
)


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_OPTIONS)]], ids=["default", "all-options"])
def test_the_daemon_accepts_the_chart_config(values: list[str], tmp_path: Path) -> None:
    docs = render(*values)
    toml = tmp_path / "serve.toml"
    toml.write_text(one(docs, "ConfigMap", "streamlstm")["data"]["serve.toml"])
    env = {e["name"]: e.get("value", "from-a-secret") for e in container(docs)["env"]}
    assert env["STREAMLSTM_CONFIG"] == "/etc/streamlstm/serve.toml"
    environ = {k: v.replace("$(POD_NAME)", "streamlstm-0") for k, v in env.items()}
    environ.pop("STREAMLSTM_CONFIG")
    config = parse_serve_args(["--config", str(toml)], environ=environ)
    assert config.input_topic == "ticks"
    assert config.instance_id == "streamlstm-0"
    mounts = {m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert "/tmp" in mounts  # the engine process writes its model copy there
    if values:
        assert config.max_records == 2048 and config.compression_type == "zstd"
        assert config.state == "durable" and config.guarantee == "exactly-once"
        assert config.transactional_id_prefix == "prices-eos"
        assert config.ssl_cafile == "/etc/streamlstm/tls/ca.crt"
        assert config.sasl_plain_password == "from-a-secret"
        assert {"/etc/streamlstm/tls", "/models", "/etc/streamlstm/admin"} <= mounts
        assert config.admin_port == 9465
        assert config.admin_token_file == "/etc/streamlstm/admin/token"


def test_every_streamlstm_variable_in_deploy_is_a_serve_setting() -> None:
    settings = {f.name for f in dataclasses.fields(ServeConfig)} | {"config"}
    names = {e["name"] for e in container(render("-f", str(ALL_OPTIONS)))["env"]}
    for path in (DEPLOY / "Dockerfile", DEPLOY / "compose.yaml", DEPLOY / "compose.admin.yaml"):
        names |= set(re.findall(r"\bSTREAMLSTM_[A-Z0-9_]+", path.read_text()))
    ours = {n for n in names if n.startswith("STREAMLSTM_")}
    assert "STREAMLSTM_GROUP_INSTANCE_ID" in ours
    assert "STREAMLSTM_ADMIN_TOKEN_FILE" in ours  # compose.admin.yaml's
    unknown = {n for n in ours if n.removeprefix("STREAMLSTM_").lower() not in settings}
    assert not unknown, f"not `streamlstm serve` settings: {sorted(unknown)}"


def test_static_membership_and_grace_period() -> None:
    docs = render("--set", "shutdownTimeoutSeconds=25")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["STREAMLSTM_GROUP_INSTANCE_ID"]["value"] == "$(POD_NAME)"
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 40
    assert "shutdown_timeout_s = 25" in one(docs, "ConfigMap", "streamlstm")["data"]["serve.toml"]


def test_a_grace_period_within_the_shutdown_timeout_is_refused() -> None:
    done = helm_template(
        "--set", "shutdownTimeoutSeconds=60", "--set", "terminationGracePeriodSeconds=60"
    )
    assert done.returncode != 0
    assert "must exceed shutdownTimeoutSeconds" in done.stderr


@pytest.mark.parametrize(
    "settings",
    [
        ["config.guarantee=exactly_once"],
        ["config.state=disk"],
        ["config.guarantee=exactly-once", "config.state=memory"],
    ],
    ids=["guarantee-typo", "state-typo", "exactly-once-in-memory"],
)
def test_the_schema_refuses_a_guarantee_or_state_the_daemon_refuses(settings: list[str]) -> None:
    done = helm_template(*(arg for setting in settings for arg in ("--set", setting)))
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    # ... and the daemon would refuse them too (at start-up, in a crash loop).
    config = dict(setting.removeprefix("config.").split("=") for setting in settings)
    with pytest.raises(ConfigError, match=r"^(guarantee|state):"):
        ServeConfig(
            model="m",
            bootstrap_servers="b",
            input_topic="t",
            output_topic="o",
            state=config.get("state", "durable"),
            guarantee=config.get("guarantee", "at-least-once"),
        )


def test_exactly_once_with_durable_state_passes_the_schema() -> None:
    toml = one(render("--set", "config.guarantee=exactly-once"), "ConfigMap", "streamlstm")
    assert 'guarantee = "exactly-once"' in toml["data"]["serve.toml"]


def test_secrets_stay_out_of_the_config_map() -> None:
    done = helm_template("--set", "config.sasl_plain_password=hunter2")
    assert done.returncode != 0 and "not allowed here" in done.stderr
    docs = render("-f", str(ALL_OPTIONS))
    assert "password" not in one(docs, "ConfigMap", "streamlstm")["data"]["serve.toml"]
    env = {e["name"]: e for e in container(docs)["env"]}
    ref = env["STREAMLSTM_SASL_PLAIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "streamlstm-kafka-user", "key": "password"}


def test_restrictive_security_context() -> None:
    docs = render()
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    ctx = container(docs)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and ctx["runAsNonRoot"]
    assert ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    probes = {k: container(docs)[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")}
    assert probes == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def test_keda_scales_the_statefulset_up_to_the_partition_count() -> None:
    docs = render("--set", "keda.enabled=true", "--set", "kafka.inputPartitions=12")
    scaled = one(docs, "ScaledObject")["spec"]
    assert scaled["maxReplicaCount"] == 12
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet"
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "streamlstm"
    assert "replicas" not in one(docs, "StatefulSet")["spec"]  # KEDA owns it
    assert "replicas" in one(render(), "StatefulSet")["spec"]


def test_the_chart_ships_the_one_copy_of_the_rules_and_the_dashboard() -> None:
    docs = render("-f", str(ALL_OPTIONS))
    rules_file = CHART / "files" / "rules" / "streamlstm.rules.yml"
    assert one(docs, "PrometheusRule")["spec"] == yaml_docs(rules_file.read_text())[0]
    dashboard = one(docs, "ConfigMap", "dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["streamlstm.json"])
    assert shipped == json.loads((CHART / "files" / "dashboards" / "streamlstm.json").read_text())
    assert (DEPLOY / "prometheus" / "rules").resolve() == rules_file.parent
    assert (DEPLOY / "grafana" / "dashboards").resolve() == CHART / "files" / "dashboards"


def test_runbook_links_name_sections_of_the_runbook() -> None:
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("#")
    }
    text = (CHART / "files" / "rules" / "streamlstm.rules.yml").read_text()
    links = re.findall(r"runbook_url: deploy/RUNBOOK\.md#(\S+)", text)
    assert len(links) == text.count("- alert:")
    assert set(links) <= anchors, sorted(set(links) - anchors)


def test_a_state_dir_gets_a_volume_claim_per_pod_and_the_daemon_its_path() -> None:
    assert "volumeClaimTemplates" not in one(render(), "StatefulSet", "streamlstm")["spec"]
    docs = render("--set", "stateDir.enabled=true", "--set", "stateDir.size=50Gi")
    spec = one(docs, "StatefulSet", "streamlstm")["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts["state"] == "/var/lib/streamlstm"
    toml = one(docs, "ConfigMap", "streamlstm")["data"]["serve.toml"]
    assert 'state_dir = "/var/lib/streamlstm"' in toml

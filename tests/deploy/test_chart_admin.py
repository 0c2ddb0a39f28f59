"""The chart's stream admin API (``admin.*``): off by default; when on, its token
Secret mounted as a file, the daemon's admin settings, a container port and a
ClusterIP Service of its own that the ServiceMonitor never selects.

Rendered with the helm that deploy/check.sh builds, as in test_chart.py.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from streamlstm.consumers.settings import ServeConfig
from tests.helpers.chart import CHART, container, helm_template, one, render

Docs = list[dict[str, Any]]

ON = ("--set", "admin.enabled=true")
#: With surrounding whitespace, which the daemon strips from the file: so does the chart.
WITH_VALUE = (*ON, "--set", "admin.token.value= s3cret ")
WITH_EXISTING = (
    *ON,
    *("--set", "admin.token.existingSecret=ops-admin"),
    *("--set", "admin.token.existingSecretKey=bearer"),
)
NO_TOKEN = "admin.enabled needs a token: admin.token.existingSecret"
TOKEN_DIR = "/etc/streamlstm/admin"


def _pod(docs: Docs) -> dict[str, Any]:
    pod: dict[str, Any] = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    return pod


def _volumes(docs: Docs, name: str) -> list[dict[str, Any]]:
    return [v for v in _pod(docs)["volumes"] if v["name"] == name]


def _toml(docs: Docs) -> str:
    text: str = one(docs, "ConfigMap", "streamlstm")["data"]["serve.toml"]
    return text


def _services(docs: Docs) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}


def notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as rendered. `helm template` leaves it out and `helm install --dry-run`
    wants a cluster, so a copy of the chart renders it into a ConfigMap with `tpl`."""
    chart = tmp_path / "streamlstm"
    shutil.copytree(CHART, chart)
    (chart / "notes-under-test.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n'
    )
    docs = render("--namespace", "streaming", *args, chart=chart)
    text: str = one(docs, "ConfigMap", "notes-under-test")["data"]["notes"]
    return text


def test_admin_is_off_by_default(tmp_path: Path) -> None:
    docs = render()
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert list(_services(docs)) == ["streamlstm"]
    assert [p["name"] for p in container(docs)["ports"]] == ["metrics"]
    assert not _volumes(docs, "admin-token")
    assert TOKEN_DIR not in {m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert "admin_" not in _toml(docs)
    assert "admin" not in notes(tmp_path).lower()


def test_admin_with_a_token_value_gets_the_charts_secret_mounted_as_a_file() -> None:
    docs = render(*WITH_VALUE)
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "streamlstm-admin"
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    (volume,) = _volumes(docs, "admin-token")
    assert volume["secret"]["secretName"] == "streamlstm-admin"
    assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]
    # The file is root's, read through fsGroup's group: 0440 needs an fsGroup.
    assert volume["secret"]["defaultMode"] == 0o440
    assert _pod(docs)["securityContext"]["fsGroup"] is not None
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "admin-token"]
    assert mount == {"name": "admin-token", "mountPath": TOKEN_DIR, "readOnly": True}
    toml = _toml(docs).splitlines()
    assert "admin_port = 9465" in toml
    assert f'admin_token_file = "{TOKEN_DIR}/token"' in toml
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports == {"metrics": 9464, "admin": 9465}


def test_the_admin_service_exposes_the_admin_port_only() -> None:
    services = _services(render(*WITH_VALUE, "--set", "admin.port=9500"))
    admin = services["streamlstm-admin"]["spec"]
    assert admin.get("type", "ClusterIP") == "ClusterIP"
    assert admin["ports"] == [
        {"name": "admin", "port": 9500, "targetPort": "admin", "protocol": "TCP"}
    ]
    assert [p["name"] for p in services["streamlstm"]["spec"]["ports"]] == ["metrics"]


def test_the_service_monitor_selects_the_metrics_service_only() -> None:
    docs = render(*WITH_VALUE, "--set", "serviceMonitor.enabled=true")
    wanted = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items()
    services = _services(docs)
    assert wanted <= services["streamlstm"]["metadata"]["labels"].items()
    assert not wanted <= services["streamlstm-admin"]["metadata"]["labels"].items()


def test_admin_with_an_existing_secret_mounts_it_and_makes_none() -> None:
    docs = render(*WITH_EXISTING, "--set", "admin.token.value=ignored")
    assert not [d for d in docs if d["kind"] == "Secret"]
    (volume,) = _volumes(docs, "admin-token")
    assert volume["secret"]["secretName"] == "ops-admin"
    assert volume["secret"]["items"] == [{"key": "bearer", "path": "token"}]
    assert "streamlstm-admin" in _services(docs)


@pytest.mark.parametrize(
    "token", [[], ["--set", "admin.token.value=  "]], ids=["no-token", "blank-value"]
)
def test_admin_without_a_token_fails_rendering(token: list[str]) -> None:
    done = helm_template(*ON, *token)
    assert done.returncode != 0
    assert NO_TOKEN in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["config.admin_port=9999"], "config.admin_port: not allowed here"),
        (["admin.port=9464"], "admin.port (9464) must differ from metrics.port"),
        (["admin.token.existingSecretKey="], "values don't meet the specifications"),
        (["admin.tokenFile=/x"], "values don't meet the specifications"),
    ],
    ids=["admin-in-config", "port-clash", "empty-key", "unknown-key"],
)
def test_admin_settings_the_chart_refuses(settings: list[str], message: str) -> None:
    done = helm_template(*WITH_VALUE, *(arg for setting in settings for arg in ("--set", setting)))
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_the_notes_say_how_to_reach_the_admin_api(tmp_path: Path) -> None:
    text = notes(tmp_path, *WITH_EXISTING, "--set", "admin.token.existingSecretKey=a.b")
    assert "kubectl -n streaming port-forward svc/streamlstm-admin 9465" in text
    assert "get secret ops-admin -o jsonpath='{.data.a\\.b}' | base64 -d" in text
    assert 'curl -s -H "Authorization: Bearer $TOKEN" localhost:9465/v1/' in text


def test_the_daemon_has_the_admin_settings_the_chart_passes() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    # Off unless set, as the chart's admin.enabled: false.
    assert defaults["admin_port"] is None and defaults["admin_token_file"] is None

"""Rendering the Helm chart with the helm that deploy/check.sh builds (the chart tests')."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.conftest import DEPLOY, tool

__all__ = ["ALL_OPTIONS", "CHART", "container", "helm_template", "one", "render", "yaml_docs"]

CHART = DEPLOY / "helm" / "streamlstm"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
K8S_VERSION = "1.34.0"
TO_JSON = (
    "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"
)


def helm_template(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    command = [tool("helm"), "template", "streamlstm", str(chart), "--kube-version", K8S_VERSION]
    return subprocess.run([*command, *args], capture_output=True, text=True, check=False)


def yaml_docs(text: str) -> Any:
    python = str(Path(tool("yamllint")).with_name("python"))  # the tools venv has PyYAML
    done = subprocess.run([python, "-c", TO_JSON], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def render(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    done = helm_template(*args, chart=chart)
    assert done.returncode == 0, done.stderr
    docs: list[dict[str, Any]] = yaml_docs(done.stdout)
    return docs


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    found: dict[str, Any] = spec["containers"][0]
    return found

"""deploy/helm/check_custom_resources.py finds what the CRDs would refuse."""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

from tests.deploy.conftest import DEPLOY

_spec = importlib.util.spec_from_file_location(
    "check_custom_resources", DEPLOY / "helm" / "check_custom_resources.py"
)
assert _spec is not None and _spec.loader is not None
crs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crs)

LABELS = {"app.kubernetes.io/name": "streamlstm", "app.kubernetes.io/instance": "r"}
GOOD: list[dict[str, Any]] = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "r-streamlstm", "labels": {**LABELS, "x": "y"}},
        "spec": {"ports": [{"name": "metrics", "port": 9464}]},
    },
    {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "r-streamlstm"}},
    {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "r-streamlstm"},
        "spec": {
            "selector": {"matchLabels": LABELS},
            "endpoints": [
                {
                    "port": "metrics",
                    "interval": "15s",
                    "relabelings": [{"targetLabel": "job", "replacement": "streamlstm"}],
                }
            ],
        },
    },
    {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r-streamlstm"},
        "spec": {
            "groups": [
                {
                    "name": "g",
                    "rules": [
                        {"record": "a:b:c", "expr": "sum(x)"},
                        {"alert": "A", "expr": "up == 0", "for": "2m", "labels": {"s": "x"}},
                    ],
                }
            ]
        },
    },
    {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "r-streamlstm"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "name": "r-streamlstm",
            },
            "minReplicaCount": 1,
            "maxReplicaCount": 4,
            "triggers": [
                {
                    "type": "kafka",
                    "metadata": {
                        "bootstrapServers": "k:9092",
                        "consumerGroup": "g",
                        "topic": "t",
                        "lagThreshold": "100",
                    },
                    "authenticationRef": {"name": "auth"},
                }
            ],
        },
    },
]


def problems(docs: list[dict[str, Any]]) -> list[str]:
    found: list[str] = crs.Checker(docs).run()
    return found


def broken(kind: str, path: str, value: Any) -> list[str]:
    """The problems of GOOD with ``path`` of the ``kind`` document set (None: deleted)."""
    docs = copy.deepcopy(GOOD)
    doc = next(d for d in docs if d["kind"] == kind)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return problems(docs)


def test_the_good_set_passes() -> None:
    assert problems(GOOD) == []


def test_service_monitor() -> None:
    assert "spec.selector: required" in broken("ServiceMonitor", "spec.selector", None)[0]
    assert "selects no Service" in broken("ServiceMonitor", "spec.selector.matchLabels.x", "z")[0]
    assert "no port" in broken("ServiceMonitor", "spec.endpoints.0.port", "http")[0]
    assert "not a duration" in broken("ServiceMonitor", "spec.endpoints.0.interval", "15 s")[0]


def test_prometheus_rule() -> None:
    assert "spec.groups: required" in broken("PrometheusRule", "spec.groups", None)[0]
    assert (
        "exactly one of alert and record"
        in broken("PrometheusRule", "spec.groups.0.rules.0.alert", "A2")[0]
    )
    assert "expr: required" in broken("PrometheusRule", "spec.groups.0.rules.1.expr", None)[0]
    assert "not a duration" in broken("PrometheusRule", "spec.groups.0.rules.1.for", "2 min")[0]
    assert (
        "strings to strings"
        in broken("PrometheusRule", "spec.groups.0.rules.1.labels", {"s": 1})[0]
    )


def test_scaled_object() -> None:
    assert (
        "must be a string"
        in broken("ScaledObject", "spec.triggers.0.metadata.lagThreshold", 100)[0]
    )
    assert "requires it" in broken("ScaledObject", "spec.triggers.0.metadata.topic", None)[0]
    assert "no StatefulSet named" in broken("ScaledObject", "spec.scaleTargetRef.name", "x")[0]
    assert "exceeds maxReplicaCount" in broken("ScaledObject", "spec.minReplicaCount", 9)[0]
    assert "spec.triggers: required" in broken("ScaledObject", "spec.triggers", None)[0]
    assert "must be an integer" in broken("ScaledObject", "spec.maxReplicaCount", "4")[0]

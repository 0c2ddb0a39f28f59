"""Checks the chart's custom resources against what their CRDs require.

    python deploy/helm/check_custom_resources.py RENDERED.yaml [...]

kubernetes-validate bundles the schemas of Kubernetes' own kinds only, and no
PyPI package bundles these CRDs, so the fields below are written out by hand
from the CRDs (prometheus-operator's monitoring.coreos.com/v1 ServiceMonitor
and PrometheusRule, KEDA's keda.sh/v1alpha1 ScaledObject): their `required`
lists, the types the chart could get wrong (KEDA's trigger metadata is a map of
strings), the duration pattern, and the references between the resources (the
ServiceMonitor selects the metrics Service and names its port; the
ScaledObject scales the StatefulSet). Exit status 1 lists every problem.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# prometheus-operator's Duration pattern (monitoring.coreos.com/v1).
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
RELABEL_ACTIONS = {
    "replace",
    "keep",
    "drop",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
    "keepequal",
    "dropequal",
}
# KEDA's kafka scaler refuses to start without these trigger metadata keys.
KAFKA_SCALER_KEYS = ("bootstrapServers", "consumerGroup", "topic")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


class Checker:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.problems: list[str] = []

    def fail(self, doc: Mapping[str, Any], message: str) -> None:
        self.problems.append(f"{doc.get('kind')}/{_get(doc, 'metadata.name')}: {message}")

    def require(self, doc: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
        value = _get(doc, path)
        if value is None:
            self.fail(doc, f"{path}: required")
        elif not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.fail(doc, f"{path}: must be {kind}, got {type(value).__name__}")
        return value

    def of_kind(self, kind: str) -> Iterator[dict[str, Any]]:
        return (d for d in self.docs if d.get("kind") == kind)

    def run(self) -> list[str]:
        for doc in self.docs:
            for path in ("apiVersion", "kind", "metadata.name"):
                self.require(doc, path, str)
        for doc in self.of_kind("ServiceMonitor"):
            self.service_monitor(doc)
        for doc in self.of_kind("PrometheusRule"):
            self.prometheus_rule(doc)
        for doc in self.of_kind("ScaledObject"):
            self.scaled_object(doc)
        return self.problems

    def service_monitor(self, doc: dict[str, Any]) -> None:
        if doc.get("apiVersion") != "monitoring.coreos.com/v1":
            self.fail(doc, "apiVersion: must be monitoring.coreos.com/v1")
        self.require(doc, "spec", dict)
        selector = self.require(doc, "spec.selector", dict)
        endpoints = self.require(doc, "spec.endpoints", list) or []
        labels = (selector or {}).get("matchLabels", {})
        services = [
            s
            for s in self.of_kind("Service")
            if labels.items() <= (_get(s, "metadata.labels") or {}).items()
        ]
        if not services:
            self.fail(doc, f"spec.selector {labels} selects no Service of the chart")
        ports = {p.get("name") for s in services for p in _get(s, "spec.ports") or []}
        for i, ep in enumerate(endpoints):
            where = f"spec.endpoints[{i}]"
            if not isinstance(ep, dict):
                self.fail(doc, f"{where}: must be an object")
                continue
            if ep.get("port") not in ports:
                self.fail(doc, f"{where}.port: {ep.get('port')!r} is no port of {sorted(ports)}")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not DURATION.match(str(ep[key])):
                    self.fail(doc, f"{where}.{key}: {ep[key]!r} is not a duration")
            for j, rl in enumerate(ep.get("relabelings", [])):
                action = str(rl.get("action", "replace")).lower()
                if action not in RELABEL_ACTIONS:
                    self.fail(doc, f"{where}.relabelings[{j}].action: {action!r}")
                if action == "replace" and "targetLabel" not in rl:
                    self.fail(doc, f"{where}.relabelings[{j}]: replace needs targetLabel")

    def prometheus_rule(self, doc: dict[str, Any]) -> None:
        if doc.get("apiVersion") != "monitoring.coreos.com/v1":
            self.fail(doc, "apiVersion: must be monitoring.coreos.com/v1")
        self.require(doc, "spec", dict)
        groups = self.require(doc, "spec.groups", list) or []
        if not groups:
            self.fail(doc, "spec.groups: empty")
        names = [g.get("name") for g in groups if isinstance(g, dict)]
        if len(set(names)) != len(names):
            self.fail(doc, "spec.groups: names must be unique")
        for i, group in enumerate(groups):
            where = f"spec.groups[{i}]"
            if not isinstance(group, dict) or not isinstance(group.get("name"), str):
                self.fail(doc, f"{where}.name: required string")
                continue
            if not group["name"]:
                self.fail(doc, f"{where}.name: must not be empty")
            for key in ("interval", "query_offset"):
                if key in group and not DURATION.match(str(group[key])):
                    self.fail(doc, f"{where}.{key}: {group[key]!r} is not a duration")
            for j, rule in enumerate(group.get("rules") or []):
                self._rule(doc, f"{where}.rules[{j}]", rule)

    def _rule(self, doc: dict[str, Any], where: str, rule: Any) -> None:
        if not isinstance(rule, dict):
            self.fail(doc, f"{where}: must be an object")
            return
        if not isinstance(rule.get("expr"), str | int) or rule.get("expr") == "":
            self.fail(doc, f"{where}.expr: required")
        if ("alert" in rule) == ("record" in rule):
            self.fail(doc, f"{where}: needs exactly one of alert and record")
        for key in ("for", "keep_firing_for"):
            if key in rule and not DURATION.match(str(rule[key])):
                self.fail(doc, f"{where}.{key}: {rule[key]!r} is not a duration")
        for key in ("labels", "annotations"):
            values = rule.get(key, {})
            if not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values.items()
            ):
                self.fail(doc, f"{where}.{key}: must map strings to strings")

    def scaled_object(self, doc: dict[str, Any]) -> None:
        if doc.get("apiVersion") != "keda.sh/v1alpha1":
            self.fail(doc, "apiVersion: must be keda.sh/v1alpha1")
        self.require(doc, "spec", dict)
        name = self.require(doc, "spec.scaleTargetRef.name", str)
        kind = _get(doc, "spec.scaleTargetRef.kind") or "Deployment"
        if not any(_get(t, "metadata.name") == name for t in self.of_kind(kind)):
            self.fail(doc, f"spec.scaleTargetRef: no {kind} named {name!r} in the chart")
        if _get(doc, "spec.scaleTargetRef.apiVersion") not in (None, "apps/v1"):
            self.fail(doc, "spec.scaleTargetRef.apiVersion: must be apps/v1")
        for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            value = _get(doc, f"spec.{key}")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                self.fail(doc, f"spec.{key}: must be an integer")
        low, high = _get(doc, "spec.minReplicaCount"), _get(doc, "spec.maxReplicaCount")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            self.fail(doc, "spec.minReplicaCount: exceeds maxReplicaCount")
        triggers = self.require(doc, "spec.triggers", list) or []
        if not triggers:
            self.fail(doc, "spec.triggers: empty")
        for i, trigger in enumerate(triggers):
            where = f"spec.triggers[{i}]"
            if not isinstance(trigger, dict) or not isinstance(trigger.get("type"), str):
                self.fail(doc, f"{where}.type: required string")
                continue
            metadata = trigger.get("metadata")
            if not isinstance(metadata, dict):
                self.fail(doc, f"{where}.metadata: required object")
                continue
            for key, value in metadata.items():
                if not isinstance(value, str):
                    self.fail(doc, f"{where}.metadata.{key}: must be a string, got {value!r}")
            if trigger["type"] == "kafka":
                for key in KAFKA_SCALER_KEYS:
                    if not metadata.get(key):
                        self.fail(doc, f"{where}.metadata.{key}: the kafka scaler requires it")
            ref = trigger.get("authenticationRef")
            if ref is not None and not isinstance(_get(ref, "name"), str):
                self.fail(doc, f"{where}.authenticationRef.name: required string")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    import yaml  # here: the checks above also run where PyYAML is not installed

    problems: list[str] = []
    for name in argv:
        docs = [d for d in yaml.safe_load_all(Path(name).read_text()) if d]
        found = Checker(docs).run()
        problems += [f"{name}: {p}" for p in found]
        kinds = sorted({d["kind"] for d in docs if d.get("kind") in _CUSTOM})
        print(f"{name}: {', '.join(kinds) or 'no custom resources'} checked")
    for problem in problems:
        print(f"ERROR {problem}", file=sys.stderr)
    return 1 if problems else 0


_CUSTOM = ("ServiceMonitor", "PrometheusRule", "ScaledObject")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

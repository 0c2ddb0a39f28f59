#!/usr/bin/env bash
# Static checks of deploy/ with the real tools; installs them first.
#
#   deploy/check.sh            install what is missing, then check everything
#   deploy/check.sh install    only install (idempotent; instant when present)
#
# Tools land in deploy/.tools (gitignored; STREAMLSTM_DEPLOY_TOOLS moves it):
# a venv with the PyPI tools (deploy/tools-requirements.txt), helm built from
# the Go module proxy, and promtool, prometheus, amtool and shellcheck from
# Debian's packages.
# No Docker engine, no cluster: Dockerfile, compose file, chart, rules and
# dashboard are linted, validated against schemas and unit-tested.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOLS=$(mkdir -p "${STREAMLSTM_DEPLOY_TOOLS:-deploy/.tools}" && cd "${STREAMLSTM_DEPLOY_TOOLS:-deploy/.tools}" && pwd)
HELM_VERSION=v3.22.0
# A Kubernetes version whose schemas kubernetes-validate bundles.
K8S_VERSION=1.34.0
VENV=$TOOLS/venv
HELM=$TOOLS/bin/helm
CHART=deploy/helm/streamlstm

say() { printf '[deploy-check] %s\n' "$*"; }
die() { printf '[deploy-check] ERROR: %s\n' "$*" >&2; exit 1; }

install_venv() {
  local want have=""
  want=$(sha256sum deploy/tools-requirements.txt | cut -d' ' -f1)
  [[ -f $VENV/.requirements.sha256 ]] && have=$(<"$VENV/.requirements.sha256")
  if [[ $want == "$have" && -x $VENV/bin/python ]]; then return; fi
  say "installing Python tools into ${VENV#"$ROOT"/}"
  python3 -m venv "$VENV"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --quiet -r deploy/tools-requirements.txt
  echo "$want" > "$VENV/.requirements.sha256"
}

install_helm() {
  if [[ -x $HELM ]] && [[ $("$HELM" version --template '{{.Version}}') == "$HELM_VERSION" ]]; then
    return
  fi
  local go
  go=$(command -v go || echo /usr/local/go/bin/go)
  [[ -x $go ]] || die "helm: no Go toolchain to build it with (go install helm.sh/helm/v3/cmd/helm)"
  say "building helm $HELM_VERSION from the Go module proxy (minutes when the Go caches are cold)"
  local start=$SECONDS log=$TOOLS/helm-build.log
  if ! GOBIN=$TOOLS/bin GOFLAGS=-trimpath "$go" install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "helm: go install failed (log: $log)"
  fi
  say "helm built in $((SECONDS - start)) s"
}

install_debian() {
  local tool missing=""
  for tool in promtool prometheus amtool shellcheck; do
    command -v "$tool" >/dev/null || missing=1
  done
  [[ -n $missing ]] || return 0
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  say "installing promtool, prometheus, amtool, shellcheck (Debian packages)"
  # Keep the packages' services from starting (and holding ports 9090/9093):
  # a policy-rc.d that denies every start, for the install only.
  local policy=/usr/sbin/policy-rc.d own_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=1
    # shellcheck disable=SC2064  # expanded now, on purpose: also when the install fails
    trap "$sudo rm -f $policy" EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager shellcheck >/dev/null
  if [[ -n $own_policy ]]; then
    $sudo rm -f "$policy"
    trap - EXIT
  fi
  if [[ -d /run/systemd/system ]]; then
    $sudo systemctl disable --now prometheus prometheus-alertmanager >/dev/null 2>&1 || true
  fi
}

install_all() {
  install_venv
  install_helm
  install_debian
}

step() {  # step NAME COMMAND...: quiet unless it fails
  local name=$1 start=$SECONDS output
  shift
  if ! output=$("$@" 2>&1); then
    printf '%s\n' "$output" >&2
    die "$name failed"
  fi
  say "ok  $name ($((SECONDS - start)) s)"
}

helm_render() {  # helm_render NAME [helm args...] > rendered.yaml
  "$HELM" template "$1" "$CHART" --namespace streaming --kube-version "$K8S_VERSION" "${@:2}"
}

check_chart() {  # (set -e is off in here: `step` runs it in a condition)
  local out=$1
  "$HELM" lint --strict "$CHART" --kube-version "$K8S_VERSION" || return 1
  "$HELM" lint --strict "$CHART" --kube-version "$K8S_VERSION" \
    -f "$CHART/ci/all-options-values.yaml" || return 1
  "$HELM" lint --strict "$CHART" --kube-version "$K8S_VERSION" \
    -f "$CHART/ci/admin-token-values.yaml" || return 1
  helm_render streamlstm >"$out/default.yaml" || return 1
  helm_render streamlstm -f "$CHART/ci/all-options-values.yaml" >"$out/all-options.yaml" || return 1
  helm_render streamlstm -f "$CHART/ci/admin-token-values.yaml" >"$out/admin-token.yaml" || return 1
  # Kubernetes' own kinds; the custom resources are the next step's.
  "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" \
    "$out/default.yaml" "$out/all-options.yaml" "$out/admin-token.yaml"
}

check_all() {
  local out
  out=$(mktemp -d)
  trap 'rm -rf "$out"' RETURN
  step "shellcheck $(shellcheck --version | awk '/^version:/ {print $2}'): check.sh" \
    shellcheck deploy/check.sh
  step "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): Dockerfile" \
    "$VENV/bin/hadolint" deploy/Dockerfile
  step "yamllint: deploy/**/*.yml" "$VENV/bin/yamllint" --strict -c deploy/.yamllint.yaml deploy
  step "check-jsonschema: compose.yaml, compose.admin.yaml against the Compose spec" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml \
    deploy/compose.admin.yaml
  step "check-jsonschema: the chart's values.schema.json against its metaschema" \
    "$VENV/bin/check-jsonschema" --check-metaschema "$CHART/values.schema.json"
  step "promtool check config" promtool check config deploy/prometheus/prometheus.yml
  step "promtool check rules" promtool check rules deploy/prometheus/rules/*.yml
  step "promtool test rules" promtool test rules deploy/prometheus/tests/*.yml
  step "amtool check-config" amtool check-config deploy/prometheus/alertmanager.yml
  step "dashboard JSON is what dashboard.py generates" \
    "$VENV/bin/python" deploy/grafana/dashboard.py --check
  step "helm $HELM_VERSION lint + kubernetes-validate (k8s $K8S_VERSION, strict)" check_chart "$out"
  step "custom resources against their CRDs' required fields" \
    "$VENV/bin/python" deploy/helm/check_custom_resources.py "$out/default.yaml" "$out/all-options.yaml"
  step "mypy --strict: deploy/ scripts" \
    "$VENV/bin/mypy" --strict deploy/grafana/dashboard.py deploy/helm/check_custom_resources.py
  if [[ -x .venv/bin/mypy ]]; then  # the tests import the project: its venv
    step "mypy --strict: tests/deploy" .venv/bin/mypy --strict tests/deploy
  fi
}

case ${1:-all} in
  install) install_all ;;
  check) check_all ;;
  all) install_all; check_all ;;
  *) die "usage: deploy/check.sh [install|check]" ;;
esac

#!/usr/bin/env bash
# A Docker engine for the container test (tests/deploy/test_container.py), on a
# fresh Debian machine as on a developer's: idempotent.
#
#   deploy/container/dockerd.sh start   installs docker.io and debootstrap (apt) when
#                                       missing; starts dockerd unless one answers; waits
#   deploy/container/dockerd.sh stop    removes the containers the tests started (label
#                                       org.streamlstm.test), then stops the dockerd that
#                                       `start` started (never one it found running)
#
# The dockerd started here has no bridge and leaves iptables alone
# (--bridge=none --iptables=false): every build and run uses the host network.
# Its log: $STREAMLSTM_DOCKERD_LOG (default /var/log/streamlstm-dockerd.log).
set -euo pipefail

LOG=${STREAMLSTM_DOCKERD_LOG:-/var/log/streamlstm-dockerd.log}
PIDFILE=${STREAMLSTM_DOCKERD_PIDFILE:-/run/streamlstm-dockerd.pid}
WAIT_S=${STREAMLSTM_DOCKERD_WAIT_S:-60}
LABEL=org.streamlstm.test

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi
}

answers() {
  docker version --format '{{.Server.Version}}' > /dev/null 2>&1
}

install_missing() {
  local missing=()
  command -v dockerd > /dev/null || missing+=(docker.io)
  command -v docker > /dev/null || missing+=(docker.io)
  command -v debootstrap > /dev/null || missing+=(debootstrap)
  if ((${#missing[@]} == 0)); then
    return
  fi
  echo "dockerd.sh: installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  # The package may try to start its service; where there is no init to do it, we do.
  as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" > /dev/null
}

start() {
  install_missing
  if answers; then
    echo "dockerd.sh: a Docker engine answers already ($(docker version --format '{{.Server.Version}}'))"
    return
  fi
  echo "dockerd.sh: starting dockerd (log: $LOG)"
  as_root mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"
  # setsid: the daemon outlives this script (and make's shell) until `stop`.
  as_root setsid dockerd --bridge=none --iptables=false --ip6tables=false \
    --pidfile "$PIDFILE" >> "$LOG" 2>&1 < /dev/null &
  local deadline=$((SECONDS + WAIT_S))
  until answers; do
    if ((SECONDS >= deadline)); then
      echo "dockerd.sh: dockerd did not answer within ${WAIT_S}s; its log ends:" >&2
      tail -n 30 "$LOG" >&2 || true
      exit 1
    fi
    sleep 1
  done
  echo "dockerd.sh: dockerd $(docker version --format '{{.Server.Version}}') answers"
}

stop() {
  if answers; then
    local containers
    containers=$(docker ps -aq --filter "label=$LABEL")
    if [[ -n $containers ]]; then
      echo "dockerd.sh: removing the tests' containers: $(echo "$containers" | tr '\n' ' ')"
      # shellcheck disable=SC2086  # one id a word
      docker rm -f $containers > /dev/null
    fi
  fi
  if [[ ! -f $PIDFILE ]]; then
    echo "dockerd.sh: no dockerd of ours to stop ($PIDFILE is absent)"
    return
  fi
  local pid
  pid=$(cat "$PIDFILE")
  if ! kill -0 "$pid" 2> /dev/null; then
    echo "dockerd.sh: dockerd $pid is gone already"
    as_root rm -f "$PIDFILE"
    return
  fi
  echo "dockerd.sh: stopping dockerd $pid"
  as_root kill -TERM "$pid"
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2> /dev/null; do
    if ((SECONDS >= deadline)); then
      echo "dockerd.sh: dockerd $pid did not stop within 30s; killing it" >&2
      as_root kill -KILL "$pid" || true
      break
    fi
    sleep 0.5
  done
  as_root rm -f "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Prometheus from Debian's package, scraping the services' /metrics endpoints on loopback.
# Usage: prometheus.sh install | up | down | status
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=prometheus
CONFIG="$OEL_REPO/infra/prometheus/prometheus.yml"
MARKER="--web.listen-address=$OEL_BIND:$PROMETHEUS_PORT"

install() {
  if [[ -x "$PROMETHEUS_BIN" ]]; then return 0; fi
  say "prometheus: installing Debian's prometheus package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The package's own service would listen on every interface; policy-rc.d keeps it from starting.
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e "$policy" ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if (( created )); then rm -f "$policy"; fi
}

healthy() { curl -fsS "http://$OEL_BIND:$PROMETHEUS_PORT/-/ready"; }

up() {
  install
  if running_pid "$NAME" "$MARKER" >/dev/null; then say "prometheus: already running"; return 0; fi
  require_free_port prometheus "$PROMETHEUS_PORT"
  mkdir -p "$(svc_dir prometheus)/data"
  : > "$(log_file prometheus)"
  start_bg "$NAME" "$PROMETHEUS_BIN" --config.file="$CONFIG" \
    --storage.tsdb.path="$(svc_dir prometheus)/data" "$MARKER" \
    --web.enable-lifecycle --storage.tsdb.retention.time=7d
  wait_healthy "$NAME" 60 "$MARKER" healthy
}

status() {
  if pid="$(running_pid "$NAME" "$MARKER")"; then echo "prometheus running  pid $pid  $OEL_BIND:$PROMETHEUS_PORT  ($("$PROMETHEUS_BIN" --version 2>&1 | head -n 1))"
  else echo "prometheus stopped"; return 1; fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) stop_svc "$NAME" "$MARKER" ;;
  status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The whole local stack: Kafka, MinIO, Prometheus on 127.0.0.1.
# Usage: stack.sh install | up | down | status
#   up is idempotent (running services are left alone) and waits until each is healthy; it then
#   writes <state dir>/stack.env, which OEL's settings read. down stops exactly what up started.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
SERVICES=(kafka minio prometheus)

write_env() {  # the settings of the services that run (arguments: their names)
  local running=" $* " creds=""
  if [[ "$running" == *" minio "* ]]; then creds="$(bash "$HERE/minio.sh" credentials)"; fi
  umask 077
  {
    echo "# Written by 'oel stack up'; read by OEL's settings after the environment and the config file."
    if [[ "$running" == *" kafka "* ]]; then echo "OEL_KAFKA__BOOTSTRAP_SERVERS=$OEL_BIND:$KAFKA_PORT"; fi
    if [[ -n "$creds" ]]; then
      echo "OEL_S3__ENDPOINT=$OEL_BIND:$MINIO_PORT"
      echo "OEL_S3__SECURE=false"
      echo "$creds"
    fi
  } > "$OEL_STATE_DIR/stack.env"
}

case "${1:-}" in
  install)
    # The three installs are independent: run them side by side.
    pids=()
    for s in "${SERVICES[@]}"; do bash "$HERE/$s.sh" install & pids+=($!); done
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
    exit $rc ;;
  up)
    # Starts what it can: one service that fails to install or start does not stop the others; the
    # settings of those that run are written, the failures are named, and the exit status is 1.
    mkdir -p "$OEL_STATE_DIR"
    bash "$0" install || say "an install failed; starting the services that are installed"
    running=(); failed=()
    for s in "${SERVICES[@]}"; do
      if bash "$HERE/$s.sh" up; then running+=("$s"); else failed+=("$s"); fi
    done
    write_env "${running[@]}"
    if ((${#failed[@]})); then
      say "stack partly up: ${failed[*]} failed (see above); ${running[*]:-nothing} running; settings in $OEL_STATE_DIR/stack.env"
      exit 1
    fi
    say "stack up; settings in $OEL_STATE_DIR/stack.env" ;;
  down)
    rc=0
    for s in prometheus minio kafka; do bash "$HERE/$s.sh" down || rc=1; done
    rm -f "$OEL_STATE_DIR/stack.env"
    exit $rc ;;
  status)
    rc=0
    for s in "${SERVICES[@]}"; do bash "$HERE/$s.sh" status || rc=1; done
    exit $rc ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The whole local stack: Kafka, MinIO, Prometheus on 127.0.0.1.
# Usage: stack.sh install | up | down | status
#   up is idempotent (running services are left alone) and waits until each is healthy; it then
#   writes <state dir>/stack.env, which OEL's settings read. down stops exactly what up started.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
SERVICES=(kafka minio prometheus)

write_env() {
  local creds; creds="$(bash "$HERE/minio.sh" credentials)"
  umask 077
  {
    echo "# Written by 'oel stack up'; read by OEL's settings after the environment and the config file."
    echo "OEL_KAFKA__BOOTSTRAP_SERVERS=$OEL_BIND:$KAFKA_PORT"
    echo "OEL_S3__ENDPOINT=$OEL_BIND:$MINIO_PORT"
    echo "OEL_S3__SECURE=false"
    echo "$creds"
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
    mkdir -p "$OEL_STATE_DIR"
    bash "$0" install
    for s in "${SERVICES[@]}"; do bash "$HERE/$s.sh" up; done
    write_env
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

#!/usr/bin/env bash
# MinIO server (the S3 object store), built from source with `go install` (MinIO's documented
# from-source install), data and generated credentials under the state directory.
# Usage: minio.sh install | up | down | status
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=minio
DATA="$(svc_dir minio)/data"
MARKER="$MINIO_BIN server --address $OEL_BIND:$MINIO_PORT"
CREDS="$(svc_dir minio)/credentials.env"

install() {
  if [[ -x "$MINIO_BIN" ]]; then return 0; fi
  say "minio: building github.com/minio/minio@$MINIO_MODULE_VERSION with go install (a few minutes, once)"
  mkdir -p "$(dirname "$MINIO_BIN")"
  GOBIN="$(dirname "$MINIO_BIN")" GOFLAGS=-trimpath go install "github.com/minio/minio@$MINIO_MODULE_VERSION"
}

# Credentials are generated once per state directory; no secret lives in the repository.
credentials() {
  if [[ ! -f "$CREDS" ]]; then
    mkdir -p "$(svc_dir minio)"
    umask 077
    printf 'MINIO_ROOT_USER=oel-%s\nMINIO_ROOT_PASSWORD=%s\n' \
      "$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
      "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$CREDS"
  fi
  # shellcheck disable=SC1090
  source "$CREDS"
}

healthy() { curl -fsS "http://$OEL_BIND:$MINIO_PORT/minio/health/ready"; }

up() {
  install
  credentials
  if running_pid "$NAME" "$MARKER" >/dev/null; then say "minio: already running"; return 0; fi
  require_free_port minio "$MINIO_PORT"
  mkdir -p "$DATA"
  : > "$(log_file minio)"
  MINIO_ROOT_USER="$MINIO_ROOT_USER" MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD" \
  MINIO_PROMETHEUS_AUTH_TYPE=public MINIO_UPDATE=off MINIO_BROWSER=off \
    start_bg "$NAME" "$MINIO_BIN" server --address "$OEL_BIND:$MINIO_PORT" \
      --console-address "$OEL_BIND:$MINIO_CONSOLE_PORT" --quiet --anonymous "$DATA"
  wait_healthy "$NAME" 60 "$MARKER" healthy
}

status() {
  if pid="$(running_pid "$NAME" "$MARKER")"; then echo "minio      running  pid $pid  $OEL_BIND:$MINIO_PORT  (MinIO built from $MINIO_MODULE_VERSION)"
  else echo "minio      stopped"; return 1; fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) stop_svc "$NAME" "$MARKER" ;;
  status) status ;;
  credentials) credentials; echo "OEL_S3__ACCESS_KEY=$MINIO_ROOT_USER"; echo "OEL_S3__SECRET_KEY=$MINIO_ROOT_PASSWORD" ;;
  *) echo "usage: $0 install|up|down|status|credentials" >&2; exit 2 ;;
esac

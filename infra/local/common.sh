# Shared helpers for the local stack scripts: where things live, and how a service is started,
# checked and stopped. Sourced, not run.
set -euo pipefail

OEL_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OEL_STATE_DIR="${OEL_PATHS__STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/oel}"
OEL_CACHE_DIR="${OEL_PATHS__CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oel}"
OEL_BIND="127.0.0.1"

KAFKA_VERSION="4.3.1"
KAFKA_PORT="${OEL_STACK_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${OEL_STACK_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${OEL_STACK_KAFKA_HEAP:-768m}"
KAFKA_LIBS="$OEL_CACHE_DIR/kafka-$KAFKA_VERSION/libs"

# MinIO has no semver tags; the Go module proxy serves its commits as pseudo-versions.
# This one is the newest minio/minio commit the proxy served when it was pinned.
MINIO_MODULE_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
MINIO_PORT="${OEL_STACK_MINIO_PORT:-9000}"
MINIO_CONSOLE_PORT="${OEL_STACK_MINIO_CONSOLE_PORT:-9001}"
MINIO_BIN="$OEL_CACHE_DIR/minio-$MINIO_MODULE_VERSION/minio"

PROMETHEUS_PORT="${OEL_STACK_PROMETHEUS_PORT:-9090}"
PROMETHEUS_BIN="${OEL_PROMETHEUS_BIN:-/usr/bin/prometheus}"

say() { printf '%s %s\n' "[$(date +%H:%M:%S)]" "$*" >&2; }
die() { say "error: $*"; exit 1; }

svc_dir() { echo "$OEL_STATE_DIR/$1"; }
pid_file() { echo "$OEL_STATE_DIR/$1/$1.pid"; }
log_file() { echo "$OEL_STATE_DIR/$1/$1.log"; }
marker_file() { echo "$OEL_STATE_DIR/$1/$1.marker"; }

# The pid recorded for a service, if that process is alive and is still the one we started
# (its command line contains the service's marker, so a recycled pid is not mistaken for it).
running_pid() {
  local name="$1" marker="$2" pf pid
  # The marker recorded at start wins: `down` then finds the process even if the ports it was
  # started with (OEL_STACK_*_PORT) are not set the same way now.
  [[ -f "$(marker_file "$name")" ]] && marker="$(cat "$(marker_file "$name")")"
  pf="$(pid_file "$name")"
  [[ -f "$pf" ]] || return 1
  pid="$(cat "$pf")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || return 1
  echo "$pid"
}

# start_bg NAME CMD...: run CMD detached, logging to the service's log, recording its pid.
start_bg() {
  local name="$1"; shift
  mkdir -p "$(svc_dir "$name")"
  setsid nohup "$@" >>"$(log_file "$name")" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$name")"
  printf '%s' "${MARKER:?each service script sets MARKER}" > "$(marker_file "$name")"
}

# wait_healthy NAME SECONDS MARKER CHECK...: poll CHECK until it succeeds; fail (with the log's tail)
# if the process dies or the time runs out.
wait_healthy() {
  local name="$1" timeout="$2" marker="$3"; shift 3
  local start=$SECONDS
  while (( SECONDS - start < timeout )); do
    # Only liveness here: right after the fork the command line may not show the marker yet.
    if ! kill -0 "$(cat "$(pid_file "$name")")" 2>/dev/null; then
      tail -n 30 "$(log_file "$name")" >&2 || true
      die "$name exited during start-up (log: $(log_file "$name"))"
    fi
    if "$@" >/dev/null 2>&1; then
      say "$name healthy after $(( SECONDS - start ))s"
      return 0
    fi
    sleep 0.5
  done
  tail -n 30 "$(log_file "$name")" >&2 || true
  stop_svc "$name" "$marker" KILL
  die "$name not healthy after ${timeout}s (log: $(log_file "$name"))"
}

# stop_svc NAME MARKER [SIGNAL]: stop the process we started (TERM, then KILL after 30 s).
stop_svc() {
  local name="$1" marker="$2" sig="${3:-TERM}" pid
  if ! pid="$(running_pid "$name" "$marker")"; then
    rm -f "$(pid_file "$name")" "$(marker_file "$name")"
    say "$name: not running"
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name: still alive after 30s, killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pid_file "$name")" "$(marker_file "$name")"
  say "$name: stopped (pid $pid)"
}

port_open() { (exec 3<>"/dev/tcp/$OEL_BIND/$1") 2>/dev/null; }

# Fails if something else already listens on a port we want (we never reuse a foreign process).
require_free_port() {
  local name="$1" port="$2"
  if port_open "$port"; then
    die "$name: port $OEL_BIND:$port is already in use by another process"
  fi
}

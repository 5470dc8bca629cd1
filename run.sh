#!/usr/bin/env bash
# The main job on embedded defaults: install the Python environment, then run the whole learning loop
# on one machine (`oel demo`: agents play -> extraction -> KB -> OPCD -> gate -> new version -> agents
# reload) and print the `oel eval` table. Extra arguments go to `oel demo` (see `oel demo --help`).
# No service is needed; `oel demo --stack` runs the same loop on Kafka, MinIO, the processor and the learner.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"
OEL_INSTALL_STACK="${OEL_INSTALL_STACK:-0}" OEL_INSTALL_VLLM="${OEL_INSTALL_VLLM:-0}" bash infra/install.sh
exec .venv/bin/oel demo "$@"

#!/usr/bin/env bash
# The main job on its built-in defaults: set everything up, then run it.
# Extra arguments go to the command (e.g. scripts/run.sh --json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kvalloc simulate "$@"

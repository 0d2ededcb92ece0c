#!/usr/bin/env bash
# Install what the tests need (into .venv) and run lint, types and the test suite.
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
pip install -q -e ".[test]"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium not found: installing Debian's chromium (the chat page test drives it)" >&2
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ruff check .
ruff format --check . || { echo "run: ruff format ." >&2; exit 1; }
mypy
python -m pytest -q "$@"

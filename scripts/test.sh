#!/usr/bin/env bash
# Install what the tests need (into .venv) and run lint, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

LORASTREAM_EXTRAS="[test]" . scripts/env.sh
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium not found: installing Debian's chromium (the chat page test drives it)" >&2
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null
fi

ruff check .
ruff format --check . || { echo "run: ruff format ." >&2; exit 1; }
mypy
# Three test processes on two cores: many tests wait on worker processes and Redis, so a
# third keeps the cores busy. Whole files stay together (their fixtures start workers once),
# and each process computes on one thread.
OMP_NUM_THREADS=1 python -m pytest -q -n 3 --dist loadfile "$@"

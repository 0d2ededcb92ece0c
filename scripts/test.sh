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
python -m pytest -q "$@"

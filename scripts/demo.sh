#!/usr/bin/env bash
# README command one: fetch SmolLM2-135M-Instruct (GGUF, once, into $LORASTREAM_CACHE), start
# a private Redis and a worker, and stream one question answered by the base model and by
# each demo adapter side by side. Flags go to `lorastream demo` (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/env.sh
exec lorastream demo "$@"

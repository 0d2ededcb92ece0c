#!/usr/bin/env bash
# README command one: build the tiny model (cached), start a private Redis and a worker, and
# stream several adapters side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/env.sh
exec lorastream demo "$@"

#!/usr/bin/env bash
# One device-machine command for issue 20: the GPU tests the scheduler touches, then the
# service against the engine (benchmarks/bench_serve.py) on one shape, the worker profiled with
# py-spy. Wheels the device lacks travel in .whl (carry it). Run from the repository root:
#
#   bash scripts/gpu_serve.sh SHAPE [tests] [bench_serve flags...]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-gpu-serve-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
shape=$1; shift
nvidia-smi --query-gpu=name,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if [ "${1:-}" = tests ]; then
    shift
    echo "== GPU tests"
    timeout 240 python3 -m pytest -q -p no:cacheprovider \
        tests/engine/test_prefix_caching.py tests/engine/test_cuda_graphs.py \
        tests/engine/test_matches_peft.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
fi
echo "== service against the engine, $shape"
timeout 420 python3 -m benchmarks.bench_serve --shape "$shape" --num-prompts 1024 --input-len 100 \
    --output-len 128 --num-adapters 32 --rank 16 --max-loras 32 --max-num-seqs 256 \
    --out "$OUT/$shape" --profile-serve "$OUT/prof" "$@" 2>&1 | grep -v "^20..-" | tail -20
cp "$OUT/$shape/worker.log" "$OUT/worker.log" 2>/dev/null
tar czf "$OUT/prof.tgz" -C "$OUT" prof 2>/dev/null && rm -rf "$OUT/prof"
rm -rf "$OUT/$shape/redis"

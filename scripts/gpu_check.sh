#!/usr/bin/env bash
# One device-machine command that checks and times what issue 4 measures, writing under
# $OUT (the device tool brings it back). Each part has its own time limit, so one slow part
# cannot take the others' results with it. Run from the repository root:
#
#   bash scripts/gpu_check.sh [quick]
#
# quick: the GPU tests and the target workload's throughput only (about 6 minutes);
# otherwise also the attention and LoRA-fusion sweeps (about 9 minutes).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest -q \
    tests/engine/test_matches_peft.py tests/engine/test_cuda_graphs.py \
    tests/model/test_attention_kernels.py tests/model/test_fused_ops.py \
    2>&1 | tail -3 | tee "$OUT/tests.txt"

echo "== target workload, three timed runs per configuration"
timeout 240 python3 -m benchmarks.bench --shape llama-3.1-8b --num-prompts 256 --input-len 128 \
    --output-len 128 --num-adapters 32 --rank 16 --max-loras 32 --max-num-seqs 256 \
    --patterns distinct,identical --skip-max-loras-1 --skip-hf --repeats 3 \
    --out "$OUT/bench" 2>&1 | grep -A30 "^| config" | head -30

if [ "${1:-}" != quick ]; then
    echo "== attention launch and layout sweep"
    timeout 120 python3 -m benchmarks.kernels.attention --cases 256x192,64x2048 --out "$OUT/attention" \
        2>&1 | grep "^best"
    echo "== gate_up expand + SiLU"
    OUT="$OUT/fusion" timeout 90 python3 -m benchmarks.kernels.lora --fusion-only 2>&1 | tail -2
fi

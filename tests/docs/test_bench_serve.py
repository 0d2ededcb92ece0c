"""``benchmarks/bench_serve.py`` runs end to end on the CPU (its dry run): the same requests
offline and through a private redis-server and a real ``lorastream serve``, prefix caching on
and off, every request's every token counted on each side. No timing is checked here; the
GPU numbers are in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_dry_run_counts_every_token_offline_and_through_redis(tmp_path: Path) -> None:
    requests, output_len = 12, 4
    cmd = [
        sys.executable, "-m", "benchmarks.bench_serve",
        "--device", "cpu", "--dtype", "float32", "--shape", "tiny",
        "--num-prompts", str(requests), "--output-len", str(output_len),
        "--num-adapters", "2", "--rank", "4", "--max-loras", "2", "--max-num-seqs", "8",
        "--clients", "2", "--engine-arg=--num-gpu-blocks-override=512",
        "--workload", "chat", "--chat-system-len", "64", "--chat-turns", "3",
        "--chat-adapters", "2", "--compare-prefix-caching",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "bench_serve.json").read_text())["rows"]
    assert [r["config"] for r in rows] == [
        "offline (LLM.generate)",
        "service (serve --enable-multiprocessing --enable-prefix-caching + Redis)",
        "service (serve --enable-multiprocessing --no-enable-prefix-caching + Redis)",
    ]
    for row in rows:
        # The script itself asserts each side saw every request end with finish_reason
        # "length"; here: every token of every request was counted.
        assert row["output_tokens"] == requests * output_len
        assert row["ttft_ms"]["p50"] > 0
    # Greedy outputs do not depend on the cache (the script compares them token by token).
    assert rows[1]["outputs_identical_with_caching_off"] is True

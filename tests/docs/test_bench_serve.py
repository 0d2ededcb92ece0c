"""``scripts/bench_serve.py`` runs end to end on the CPU (its dry run): the same requests
offline and through a private redis-server and a real ``lorastream serve``, every request's
every token counted on both sides. No timing is checked here; the GPU numbers are in
BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serve_dry_run_counts_every_token_offline_and_through_redis(tmp_path: Path) -> None:
    prompts, output_len = 8, 4
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_serve.py"),
        "--device", "cpu", "--dtype", "float32", "--shape", "tiny",
        "--num-prompts", str(prompts), "--input-len", "8", "--output-len", str(output_len),
        "--num-adapters", "2", "--rank", "4", "--max-loras", "2", "--max-num-seqs", "4",
        "--clients", "2", "--engine-arg=--num-gpu-blocks-override=256",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_serve.json").read_text())
    rows = {r["config"].split(" ")[0]: r for r in result["rows"]}
    assert set(rows) == {"offline", "service"}
    for row in rows.values():
        # The script itself asserts each side saw every request end with finish_reason
        # "length"; here: every token of every request was counted.
        assert row["output_tokens"] == prompts * output_len
        assert row["output_tok_s"] > 0
        assert row["ttft_ms"]["p50"] > 0
    assert "| service (serve --enable-multiprocessing + Redis) |" in proc.stdout

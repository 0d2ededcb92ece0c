"""``benchmarks/bench_tp.py`` runs end to end on the CPU (its dry run, gloo): a row per
configuration, the collectives timed beside them. No timing is checked here; the GPU
numbers are for BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_tp_dry_run_gives_a_row_per_configuration(tmp_path):
    cmd = [
        sys.executable,
        *("-m", "benchmarks.bench_tp"),
        *("--device", "cpu", "--shape", "tiny", "--tp", "2", "--num-seqs", "4"),
        *("--ranks", "8", "--fully-sharded", "on", "--num-adapters", "2"),
        *("--input-len", "8", "--output-len", "4", "--collective-iters", "3", "--bw-mib", "1"),
        *("--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "bench_tp.json").read_text())["rows"]
    assert [(r["tp"], r["num_seqs"], r["rank"], r["fully_sharded"]) for r in rows] == [
        (2, 4, 8, True)
    ]
    (row,) = rows
    assert row["output_tok_s"] > 0
    assert row["collective_ms"] > 0
    assert row["bus_mib"] > 0
    assert "| 2 | 4 | 8 | on |" in (tmp_path / "out" / "bench_tp.md").read_text()

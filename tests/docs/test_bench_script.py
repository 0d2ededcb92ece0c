"""``benchmarks/bench.py`` runs end to end on the CPU (its dry run): every configuration of the
side-by-side comparison, with and without async scheduling, gets a row. No timing is
checked here; the GPU numbers are in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dry_run_gives_a_row_per_configuration_and_mode(tmp_path):
    cmd = [
        sys.executable,
        *("-m", "benchmarks.bench"),
        *("--device", "cpu", "--shape", "tiny", "--num-prompts", "4", "--input-len", "8"),
        *("--output-len", "4", "--num-adapters", "2", "--rank", "4", "--max-loras", "2"),
        *("--max-num-seqs", "4", "--patterns", "distinct", "--skip-max-loras-1", "--skip-hf"),
        *("--async-scheduling", "both", "--temperature", "0.8", "--top-p", "0.9"),
        *("--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert not [c for c in rows if c.startswith("error")], rows
    for name in ("base", "base async", "distinct", "distinct async"):
        row = rows[f"lorastream {name}"]
        # The bench itself asserts every request made exactly --output-len tokens.
        assert row["output_tok_s"] > 0
        assert row["steps"] > 0
    assert "distinct async / base async (>= 0.90)" in result["targets"]
    assert "| lorastream distinct async |" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.slow
def test_bench_dry_run_with_steady_arrivals(tmp_path):
    """``--output-len-range`` with more prompts than ``--max-num-seqs``: requests end at
    different steps and waiting ones join running decodes; the bench asserts that each made
    its own drawn length, and base and adapters get the same lengths."""
    cmd = [
        sys.executable,
        *("-m", "benchmarks.bench"),
        *("--device", "cpu", "--shape", "tiny", "--num-prompts", "12", "--input-len", "8"),
        *("--output-len-range", "2,9", "--num-adapters", "2", "--rank", "4"),
        *("--max-loras", "2", "--max-num-seqs", "4", "--patterns", "distinct"),
        *("--skip-max-loras-1", "--skip-hf"),
        *("--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        r["config"]: r for r in json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    }
    assert not [c for c in rows if c.startswith("error")], rows
    base, distinct = rows["lorastream base"], rows["lorastream distinct"]
    assert base["output_tok_s"] * base["elapsed_s"] == pytest.approx(
        distinct["output_tok_s"] * distinct["elapsed_s"]
    )
    assert base["steps"] > 9  # the 4 slots were refilled as requests ended
    bad = subprocess.run(
        [*cmd[:3], "--device", "cpu", "--output-len-range", "9,2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0
    assert "--output-len-range '9,2'" in bad.stderr


def test_sampling_params_are_greedy_for_options_without_sampling():
    """``benchmarks/kernels/decode_step.py`` hands ``utils.warm_up`` its own options, which
    have no ``--temperature`` or ``--top-p``: its requests are greedy."""
    from benchmarks import utils

    greedy = utils.sampling_params(argparse.Namespace(), 7)
    assert (greedy.temperature, greedy.top_p, greedy.max_tokens) == (0.0, 1.0, 7)
    assert greedy.ignore_eos
    sampled = utils.sampling_params(argparse.Namespace(temperature=0.8, top_p=0.9), 3)
    assert (sampled.temperature, sampled.top_p) == (0.8, 0.9)


def test_bench_dry_run_with_half_the_requests_under_a_json_schema(tmp_path):
    """``--guided-json-share 0.5``: the base model's runs with every other request under
    GUIDED_SCHEMA beside the same requests unconstrained; the row has the decode-rate ratio
    the GPU benchmark holds to 0.9 (not checked here: a CPU dry run)."""
    cmd = [
        sys.executable,
        *("-m", "benchmarks.bench"),
        *("--device", "cpu", "--shape", "tiny", "--num-prompts", "6", "--input-len", "8"),
        *("--output-len", "12", "--num-adapters", "1", "--rank", "4", "--max-loras", "1"),
        *("--max-num-seqs", "6", "--patterns", "", "--skip-base", "--skip-max-loras-1"),
        *("--skip-hf", "--guided-json-share", "0.5"),
        *("--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert not [c for c in rows if c.startswith("error")], rows
    row = rows["lorastream base guided 0.5"]
    assert row["guided_requests"] == 3
    assert row["guided_decode_tok_s"] > 0
    assert row["plain_decode_tok_s"] > 0
    assert any("constrained / unconstrained" in k for k in result["targets"])

#!/usr/bin/env python3
"""The sampler's GPU time per step: 256 rows over llama-3's 128 256-token vocabulary,
float32 logits, for each kind of request, and the pieces of the top-p path. CUDA events
around 20 launches after warm-up; the median. Run on the device machine::

    python3 -m benchmarks.kernels.sampler --out $OUT/sampler

Writes ``sampler.json`` and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.utils import time_cuda
from engine.sampling.sampler import Sampler, SamplingMetadata, SamplingRow, apply_top_k_top_p_sorted
from engine.sampling.top_p import apply_top_k_top_p
from engine.sampling_params import SamplingParams


def gpu_ms(fn: Callable[[], Any]) -> float:
    return 1e3 * time_cuda(fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="sampler-out")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()
    n, v = args.rows, args.vocab
    logits = torch.randn(n, v, device="cuda") * 3
    cases = {
        "greedy": SamplingParams(temperature=0.0),
        "temperature 0.8": SamplingParams(temperature=0.8),
        "top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
        "top_k 50": SamplingParams(temperature=0.8, top_k=50),
        "top_k 50 + top_p 0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
        "min_p 0.05": SamplingParams(temperature=0.8, min_p=0.05),
        "top_p 0.95, seeded": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
        "logprobs 5": SamplingParams(temperature=0.0, logprobs=5),
    }
    sampler = Sampler()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out: list[dict[str, Any]] = []
    for name, params in cases.items():
        rows = [SamplingRow(params, [1, 2, 3], []) for _ in range(n)]
        md = SamplingMetadata.build(rows, v, "cuda", gen)
        ms = gpu_ms(lambda md=md: sampler.launch(logits, md).token_ids)
        rows_out.append({"case": name, "ms": round(ms, 3)})
        print(json.dumps(rows_out[-1]), flush=True)
    top_p = torch.full((n,), 0.95, device="cuda")
    flat = torch.randn(n, v, device="cuda") * 0.1  # no 1024 tokens hold 0.95: the search
    pieces: dict[str, Callable[[], Any]] = {
        "copy to float32": lambda: logits.to(torch.float32, copy=True),
        "sort (stable)": lambda: logits.sort(dim=-1, stable=True),
        "sort (not stable)": lambda: logits.sort(dim=-1),
        "topk 1024": lambda: logits.topk(1024, dim=-1),
        "softmax": lambda: logits.softmax(dim=-1),
        "cumsum": lambda: logits.cumsum(dim=-1),
        "apply_top_k_top_p (candidates)": lambda: apply_top_k_top_p(logits, None, top_p),
        "apply_top_k_top_p (flat rows: search)": lambda: apply_top_k_top_p(flat, None, top_p),
        "apply_top_k_top_p_sorted": lambda: apply_top_k_top_p_sorted(logits, None, top_p),
        "exponential_": lambda: torch.empty_like(logits).exponential_(generator=gen),
        "argmax": lambda: logits.argmax(dim=-1),
    }
    for name, fn in pieces.items():
        rows_out.append({"piece": name, "ms": round(gpu_ms(fn), 3)})
        print(json.dumps(rows_out[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler.json").write_text(json.dumps({"rows": n, "vocab": v, "cases": rows_out}))


if __name__ == "__main__":
    main()

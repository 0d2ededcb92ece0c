#!/usr/bin/env python3
"""The base model's matrix products on a GPU: each llama-3.1-8b projection at decode and
prefill sizes, timed in the forms the engine could call them.

For each (tokens, layer): ``F.linear(x, W)`` (the base model's call), ``y.addmm_(x, W.t())``
onto a delta (the shrink kernel's path with adapters, beta = 1), ``F.linear(x, [W; A])``
with every adapter slot's A stacked under W (``--rows-a`` rows per slice: the engine's
product for small steps), and the first two on a weight stored transposed (``x @ Wt``),
each under cuBLAS and cuBLASLt (``--blas``). Timed with CUDA events over a CUDA graph of 20
calls on 4 rotating weight copies (L2-cold, no launch gaps); the median of 7 replays. Run on
the device machine::

    PYTHONUNBUFFERED=1 python3 scripts/gpu_gemm_shapes.py --out $OUT/gemm

Writes ``gemm.json`` and prints one line per case.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_lora_kernels import graph_us  # the same timing: one CUDA graph, rotating copies

# llama-3.1-8b: (in_features, out_features) of each projection, and the vocabulary head.
SLICES = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1, "lm_head": 0}
LAYERS = {
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 28672),
    "down_proj": (14336, 4096),
    "lm_head": (4096, 128256),
}


def time_layer(
    tokens: int, name: str, k: int, n: int, rows_a: int, libs: list[str]
) -> list[dict[str, object]]:
    copies = 2 if name == "lm_head" else 4
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    # [W; A]: every slot's A under W, the engine's stacked product for small steps.
    extra = rows_a * SLICES[name]
    wsa = [torch.randn(n + extra, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
    wts = [w.t().contiguous() for w in ws]  # [k, n]: the weight stored transposed
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16) * 0.01
    ys = [torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
    pairs = list(zip(ws, wts, ys, strict=True))
    forms: dict[str, list[Callable[[], object]]] = {
        "linear": [functools.partial(F.linear, x, w) for w in ws],
        "stacked_a": [functools.partial(F.linear, x, w) for w in wsa],
        "addmm_delta": [lambda w=w, y=y: y.copy_(delta).addmm_(x, w.t()) for w, _, y in pairs],
        "copy_delta_only": [functools.partial(torch.Tensor.copy_, y, delta) for y in ys],
        "mm_wt": [functools.partial(torch.mm, x, wt) for wt in wts],
        "addmm_delta_wt": [lambda wt=wt, y=y: y.copy_(delta).addmm_(x, wt) for _, wt, y in pairs],
    }
    rows: list[dict[str, object]] = []
    for lib in libs:
        torch.backends.cuda.preferred_blas_library(lib)
        row: dict[str, object] = {"tokens": tokens, "layer": name, "blas": lib, "rows_a": extra}
        for form, fns in forms.items():
            us = graph_us(fns, calls=20)
            row[f"{form}_us"] = round(us, 2)
            if form != "copy_delta_only":
                width = n + extra if form == "stacked_a" else n
                row[f"{form}_tflops"] = round(2 * tokens * k * width / us / 1e6, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="gemm-out")
    p.add_argument("--tokens", default="256,8192")
    p.add_argument(
        "--rows-a",
        type=int,
        default=512,
        help="rows of A per slice stacked under W: max_loras x max_rank (32 x 16)",
    )
    p.add_argument("--blas", default="cublas,cublaslt")
    args = p.parse_args()
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, (k, n) in LAYERS.items():
            rows += time_layer(tokens, name, k, n, args.rows_a, args.blas.split(","))
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out / "gemm.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

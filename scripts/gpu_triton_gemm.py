#!/usr/bin/env python3
"""Is there room left in the decode step's matrix products? cuBLAS against a Triton GEMM
on Hopper's tensor-memory accelerator (TMA), persistent or one tile per program, with
optional split-K, over a sweep of tile shapes; the llama-3.1-8b projections at decode
sizes. Each case is timed like ``gpu_gemm_shapes.py``: a CUDA graph of 20 calls over 4
rotating weight copies (L2-cold), the median of 7 replays. The configurations compile in
parallel worker processes first (Triton's cache is on disk), so the sweep stays short.
Run on the device machine::

    PYTHONUNBUFFERED=1 python3 scripts/gpu_triton_gemm.py --out $OUT/tgemm

Writes ``tgemm.json``; prints each layer's cuBLAS time and its best Triton configurations.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_lora_kernels import graph_us  # the same timing as gpu_gemm_shapes.py
from triton.tools.tensor_descriptor import TensorDescriptor

# llama-3.1-8b (in_features, out_features); "+a" forms carry 32 slots x rank 16 of A rows
# per slice under W, as the engine's stacked product with adapters does.
LAYERS = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "qkv+a": (4096, 6144 + 3 * 512),
    "o+a": (4096, 4096 + 512),
    "gate_up+a": (4096, 28672 + 2 * 512),
    "down+a": (14336, 4096 + 512),
}


SMEM_BYTES = 220 * 1024  # of the H200's 227 KiB per block, some left for the compiler


@triton.jit
def _mm(
    a_desc,
    b_desc,
    c_desc,
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PROGRAMS: tl.constexpr,
    WS: tl.constexpr,
):
    """C[s*M + m, n] = sum over split s's K range of A[m, k] * B[n, k] (B is W: [N, K])."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_per = tl.cdiv(tl.cdiv(K, BK), SPLIT_K)
    tiles = num_m * num_n * SPLIT_K
    per_group = GROUP_M * num_n
    for t in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True, warp_specialize=WS):
        s = t % SPLIT_K
        mn = t // SPLIT_K
        first_m = (mn // per_group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (mn % per_group) % size_m
        pid_n = (mn % per_group) // size_m
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_per):
            k = (s * k_per + kk) * BK
            a = a_desc.load([pid_m * BM, k])
            b = b_desc.load([pid_n * BN, k])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([s * M + pid_m * BM, pid_n * BN], acc.to(c_desc.dtype))


def configs(n: int, m: int) -> list[dict[str, int]]:
    tiles = [
        (64, 128, 128), (128, 128, 64), (128, 256, 64), (256, 128, 64), (64, 256, 64),
        (128, 128, 128),
    ]  # fmt: skip
    if m <= 64:
        tiles = [(64, 128, 128), (64, 256, 64), (64, 64, 128)]
    out = []
    for (bm, bn, bk), ws, persistent in itertools.product(tiles, (0, 1), (1, 0)):
        warps = 8 if bm * bn >= 128 * 256 else 4
        for split in (1, 2, 4) if n <= 8192 else (1,):
            # Shared memory: the pipeline's stages of A and B tiles, and the output tile.
            epilogue = bm * bn * (2 if split == 1 else 4)
            stages = max(2, min(5, (SMEM_BYTES - epilogue) // ((bm + bn) * bk * 2)))
            cfg = {"BM": bm, "BN": bn, "BK": bk, "split": split, "persistent": persistent}
            out.append({**cfg, "ws": ws, "stages": stages, "warps": warps, "group": 8})
    return out


def make_call(x: torch.Tensor, w: torch.Tensor, cfg: dict[str, int]) -> Any:
    """A closure computing x @ w.T into a fresh-per-closure output with configuration cfg."""
    m, k = x.shape
    n = w.shape[0]
    split = cfg["split"]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    c = torch.empty(split * m, n, device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    out = c if split == 1 else torch.empty(m, n, device=x.device, dtype=x.dtype)
    a_d = TensorDescriptor.from_tensor(x, [bm, bk])
    b_d = TensorDescriptor.from_tensor(w, [bn, bk])
    c_d = TensorDescriptor.from_tensor(c, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn) * split
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = min(sms, tiles) if cfg["persistent"] else tiles

    def call() -> torch.Tensor:
        _mm[(programs,)](
            a_d, b_d, c_d, m, n, k,
            BM=bm, BN=bn, BK=bk, GROUP_M=cfg["group"], SPLIT_K=split, PROGRAMS=programs,
            WS=bool(cfg["ws"]), num_warps=cfg["warps"], num_stages=cfg["stages"],
        )  # fmt: skip
        if split > 1:
            torch.sum(c.view(split, m, n), dim=0, out=out)
        return out

    return call


def _alloc(size: int, alignment: int, stream: Any) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def compile_some(jobs: list[tuple[int, int, int, dict[str, int]]]) -> list[str | None]:
    """Worker: launch each configuration once (compiling it into the on-disk cache)."""
    triton.set_allocator(_alloc)
    errors: list[str | None] = []
    for m, k, n, cfg in jobs:
        try:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            make_call(x, w, cfg)()
            torch.cuda.synchronize()
            errors.append(None)
        except Exception as e:  # a configuration Triton cannot build is reported, not fatal
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="tgemm-out")
    p.add_argument("--tokens", default="256")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--workers", type=int, default=12)
    args = p.parse_args()
    triton.set_allocator(_alloc)
    tokens = [int(t) for t in args.tokens.split(",")]
    layers = args.layers.split(",")
    jobs = [
        (m, *LAYERS[name], cfg)
        for m in tokens
        for name in layers
        for cfg in configs(LAYERS[name][1], m)
    ]
    t0 = time.time()
    chunks = [jobs[i :: args.workers] for i in range(args.workers)]
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(compile_some, chunks))
    failed: dict[str, str] = {}
    for chunk, errs in zip(chunks, results, strict=True):
        for (m, k, n, cfg), e in zip(chunk, errs, strict=True):
            if e is not None:
                failed[json.dumps([m, k, n, cfg])] = e
    print(
        f"compiled {len(jobs)} configurations in {time.time() - t0:.0f} s, {len(failed)} failed",
        flush=True,
    )
    for key, e in list(failed.items())[:8]:
        print("  failed", key, e, flush=True)
    rows: list[dict[str, Any]] = []
    for m in tokens:
        for name in layers:
            k, n = LAYERS[name]
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            cublas = graph_us([lambda w=w, x=x: F.linear(x, w) for w in ws], calls=20)
            flops = 2 * m * k * n
            res = []
            for cfg in configs(n, m):
                if json.dumps([m, k, n, cfg]) in failed:
                    continue
                calls = [make_call(x, w, cfg) for w in ws]
                err = (calls[0]().float() - ref.float()).abs().max().item()
                us = graph_us(calls, calls=20)
                res.append({"cfg": cfg, "us": round(us, 2), "max_err": err})
            res.sort(key=lambda r: r["us"])
            row = {
                "tokens": m, "layer": name, "k": k, "n": n, "cublas_us": round(cublas, 2),
                "cublas_tflops": round(flops / cublas / 1e6, 1), "best": res[:5],
                "best_tflops": round(flops / res[0]["us"] / 1e6, 1) if res else None,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "best"}), flush=True)
            for r in res[:3]:
                print("   ", json.dumps(r), flush=True)
            del ws
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "rows": rows, "failed": failed}  # fmt: skip
    (out / "tgemm.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

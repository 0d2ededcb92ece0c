#!/usr/bin/env python3
"""The paged-attention decode kernel on a GPU: a sweep of its launch parameters.

One layer of the llama-3.1-8b shape (32 query heads, 8 KV heads, head_dim 128, bf16,
16-token pages scattered over the cache), decode batches at a few context lengths. For
each cache layout (the engine's positions-then-heads, or heads first, where one head's page
is 4 KB in a row) and each (BLOCK_N, num_warps, num_stages) the kernel is checked against
the float32 torch reference once and timed with CUDA events (median of 50 launches); the
K/V bytes it must read give the achieved bandwidth. Run on the device machine::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.kernels.attention --out $OUT/attention

Writes ``attention.json`` and prints one line per configuration, the best per case last.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from engine.config import LaunchConfig
from engine.kernels.attention import attention_blocks, paged_attention_reference
from engine.kernels.attention_triton import launch_config, paged_attention_triton
from engine.model.metadata import AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def decode_case(
    num_seqs: int, context: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    pages_per_seq = -(-context // PAGE)
    num_blocks = num_seqs * pages_per_seq + 1
    cache = torch.randn(2, num_blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(
        torch.bfloat16
    )
    # Pages in random order, as a busy block manager hands them out.
    perm = torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1
    tables = perm.view(num_seqs, pages_per_seq).to(torch.int32)
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
    seq_lens = [context] * num_seqs
    qsl = list(range(num_seqs + 1))
    attn = AttentionMetadata(
        slot_mapping=torch.full((num_seqs,), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        max_query_len=1,
        max_seq_len=context,
    )
    return q, cache, attn


def time_ms(fn: Any, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="attention-out")
    p.add_argument("--cases", default="256x192,256x1024,64x2048,32x192")
    p.add_argument(
        "--layouts",
        default="nhd,hnd",
        help="cache layouts: nhd = [blocks, page, Hkv, Dh] (the engine's), hnd = heads first",
    )
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    scale = HEAD_DIM**-0.5
    for case in args.cases.split(","):
        num_seqs, context = (int(v) for v in case.split("x"))
        q, cache_nhd, attn = decode_case(num_seqs, context, gen)
        ref = paged_attention_reference(q.float(), cache_nhd.float(), attn, scale)
        nbytes = 2 * num_seqs * context * KV_HEADS * HEAD_DIM * 2
        launch = LaunchConfig()  # the engine's defaults (a device's table may differ)
        block_n = attention_blocks(HEADS // KV_HEADS, 1, launch.attention_decode_block_n)[2]
        default = ("nhd", block_n, *launch_config(1, launch))
        caches = {
            "nhd": cache_nhd,
            # Same values stored heads-first (each page of one head is 4 KB in a row), seen
            # through the engine's [2, blocks, page, Hkv, Dh] view.
            "hnd": cache_nhd.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4),
        }
        for layout, block_n, warps, stages in itertools.product(
            args.layouts.split(","), (16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4)
        ):
            cache = caches[layout]
            run = functools.partial(
                paged_attention_triton,
                q,
                cache,
                attn,
                scale,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
            )

            try:
                err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                ms = time_ms(run)
            except Exception as e:  # a config the compiler rejects (shared memory, ...)
                rows.append(
                    {"case": case, "layout": layout, "block_n": block_n, "error": str(e)[:200]}
                )
                continue
            row = {
                "case": case,
                "layout": layout,
                "block_n": block_n,
                "num_warps": warps,
                "num_stages": stages,
                "default": (layout, block_n, warps, stages) == default,
                "ms": ms,
                "tb_s": nbytes / ms / 1e9,
                "rel_err": err,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if err < 2e-2 and (case not in best or ms < best[case]["ms"]):
                best[case] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps({"rows": rows, "best": best}, indent=2))
    for case, row in best.items():
        dflt = next((r for r in rows if r["case"] == case and r.get("default")), None)
        print(f"best {case}: {row}  default: {dflt}")


if __name__ == "__main__":
    main()

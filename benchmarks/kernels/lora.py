#!/usr/bin/env python3
"""The batched LoRA kernels on a GPU: the CUDA test sweep, then timings.

One command for the device machine (everything writes under ``$OUT``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.kernels.lora

1. ``pytest tests/lora/test_kernels.py`` on CUDA (``pytest.log``);
2. for the llama-3.1-8b layers (hidden 4096, q 4096, k/v 1024, intermediate 14336), bf16,
   32 adapters of rank 16: decode (256 tokens, one per sequence, adapters spread over the
   batch) and prefill (4096 tokens, 32 segments of 128), the fused shrink + expand against
   the torch reference and against the layer's base matmul; a few more rank mixes; a small
   sweep of kernel parameters (``--sweep``); and the host cost of building metadata and of
   launching. Decode is timed as it runs in the engine: on static graph metadata (tile
   capacity for 32 slots, so 47 tiles of which the step uses 32, or 16 for ``decode-one``),
   replayed in a CUDA graph, over four rotating copies of each layer so that L2 holds none
   of the weights; prefill with ``triton.testing.do_bench`` medians (it flushes L2 before
   every run).

Writes ``results.json`` and ``table.txt``; prints the table last.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# llama-3.1-8b: (in_features, output slices) of each LoRA-capable projection.
LAYERS: dict[str, tuple[int, list[int]]] = {
    "qkv_proj": (4096, [4096, 1024, 1024]),
    "o_proj": (4096, [4096]),
    "gate_up_proj": (4096, [14336, 14336]),
    "down_proj": (14336, [4096]),
}
NUM_ADAPTERS = 32
DEVICE = "cuda"
SMOKE = os.environ.get("LORA_BENCH_SMOKE") == "1"
if SMOKE:  # a CPU dry run of this script's logic (Triton interpreter, tiny shapes)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    DEVICE = "cpu"
    LAYERS = {k: (in_f // 128, [n // 128 for n in ns]) for k, (in_f, ns) in LAYERS.items()}


def run_tests(out: Path, workers: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/lora/test_kernels.py",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    (out / "pytest.log").write_text(log)
    tail = log.strip().splitlines()[-1] if log.strip() else ""
    print(f"pytest rc={proc.returncode} in {time.monotonic() - t0:.0f}s: {tail}", flush=True)
    return {"returncode": proc.returncode, "summary": tail, "seconds": time.monotonic() - t0}


def bench(fn: Callable[[], object]) -> float:
    """Median microseconds (do_bench flushes L2 before each run)."""
    from triton.testing import do_bench

    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return float(do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e3


def make_layer(in_f: int, slices: list[int], ranks: list[int], max_rank: int) -> Any:
    from engine.lora import LoRALinear

    layer = LoRALinear(
        in_f, slices, [f"s{i}" for i in range(len(slices))], dtype=torch.bfloat16, device=DEVICE
    )
    layer.weight.normal_(0, 0.02)
    layer.create_lora_buffers(NUM_ADAPTERS, max_rank, torch.bfloat16)
    for slot in range(NUM_ADAPTERS):
        r = ranks[slot % len(ranks)]
        for s, n in enumerate(slices):
            a = torch.randn(r, in_f, device=DEVICE, dtype=torch.bfloat16) / in_f**0.5
            b = torch.randn(n, r, device=DEVICE, dtype=torch.bfloat16) / r**0.5
            layer.set_lora(slot, s, a, b)
    return layer


def scenario_slots(name: str, rng: random.Random) -> list[int]:
    seqs, prompt = (256, 128) if not SMOKE else (64, 8)
    if name == "decode-one":  # every sequence on one adapter
        return [0] * seqs
    if name.startswith("decode"):  # 256 sequences, 8 per adapter, interleaved
        slots = [i % NUM_ADAPTERS for i in range(seqs)]
        rng.shuffle(slots)
        return slots
    assert name == "prefill"  # 32 prompts of 128 tokens, one adapter each
    return [i // prompt for i in range(NUM_ADAPTERS * prompt)]


def lora_bytes(layer: Any, slots: list[int], rank_of: Callable[[int], int]) -> int:
    """Fewest bytes the LoRA part moves: each active adapter's A and B rows up to its rank,
    x once, y read and written for tokens with an adapter, h negligible."""
    in_f, n = layer.in_features, layer.out_features
    s = len(layer.out_slices)
    active = set(slots) - {-1}
    w = sum(rank_of(a) * (s * in_f + n) for a in active) * 2
    t = sum(1 for x in slots if x >= 0)
    return w + t * in_f * 2 + t * n * 2 * 2


@dataclass
class Case:
    """One layer with its adapters, inputs and metadata on the GPU."""

    layer: Any
    slots: list[int]
    x: torch.Tensor
    y: torch.Tensor
    meta: Any

    @classmethod
    def make(
        cls,
        lname: str,
        scen: str,
        ranks: list[int],
        max_rank: int,
        rng: random.Random,
        block_m: int | None = None,
    ) -> Case:
        from engine.lora import allocate_static_lora_metadata, build_lora_metadata

        in_f, slices = LAYERS[lname]
        layer = make_layer(in_f, slices, ranks, max_rank)
        slots = scenario_slots(scen, rng)
        x = torch.randn(len(slots), in_f, device=DEVICE, dtype=torch.bfloat16)
        if scen.startswith("decode"):  # the CUDA graph's buffers, as the runner fills them
            static = allocate_static_lora_metadata(
                len(slots), NUM_ADAPTERS, DEVICE, block_m=block_m or 16
            )
            meta = build_lora_metadata(slots, torch.device(DEVICE), out=static)
        else:
            meta = build_lora_metadata(slots, torch.device(DEVICE), block_m=block_m)
        return cls(layer, slots, x, torch.nn.functional.linear(x, layer.weight), meta)

    def bufs(self) -> tuple[Any, ...]:
        lay = self.layer
        return (
            lay.lora_a_stacked,
            lay.lora_b_stacked,
            lay.lora_ranks,
            lay.slice_offsets,
            lay.out_slices,
        )

    def shrink(self, **kw: Any) -> torch.Tensor:
        from engine.kernels.lora_shrink_triton import lora_shrink

        return lora_shrink(
            self.x, self.layer.lora_a_stacked, self.layer.lora_ranks, self.meta, **kw
        )

    def expand(self, h: torch.Tensor, **kw: Any) -> None:
        from engine.kernels.lora_expand_triton import lora_expand

        lay = self.layer
        lora_expand(
            self.y,
            h,
            lay.lora_b_stacked,
            lay.lora_ranks,
            lay.slice_offsets,
            lay.out_slices,
            self.meta,
            **kw,
        )

    def add_lora(self) -> None:
        from engine.kernels.dispatch import Kernels

        Kernels().triton.add_lora(self.y, self.x, *self.bufs(), self.meta)

    def reference(self) -> None:
        from engine.kernels.lora import add_lora_reference

        lay = self.layer
        add_lora_reference(self.y, self.x, lay.lora_a, lay.lora_b, lay.out_slices, self.meta)

    def base(self) -> torch.Tensor:
        return torch.nn.functional.linear(self.x, self.layer.weight)

    def forward(self) -> torch.Tensor:
        return self.layer(self.x, self.meta)


SCENARIOS = [
    # (name, per-adapter ranks, max_rank)
    ("decode", [16], 16),
    ("prefill", [16], 16),
    ("decode-one", [16], 16),
    ("decode-rank64", [64], 64),
    ("decode-mixed8-64", [8, 16, 32, 64], 64),
]


def graph_us(fns: list[Callable[[], object]], calls: int = 24) -> float:
    """Median microseconds per call of ``fns`` (round-robin) replayed in one CUDA graph:
    no launch gaps, as decode steps run; the copies rotate so L2 holds no one's weights."""
    if SMOKE:
        return bench(fns[0])
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def time_case(
    scen: str, ranks: list[int], max_rank: int, lname: str, rng: random.Random
) -> dict[str, Any]:
    """Decode scenarios under CUDA graphs (4 rotating copies of the layer: L2-cold);
    prefill with do_bench (launches are negligible there, do_bench flushes L2)."""
    graphs = scen.startswith("decode")
    copies = [Case.make(lname, scen, ranks, max_rank, rng) for _ in range(4 if graphs else 1)]
    c = copies[0]
    hs = [k.shrink() for k in copies]

    def timed(fns: list[Callable[[], object]]) -> float:
        return graph_us(fns) if graphs else bench(fns[0])

    row: dict[str, Any] = {
        "scenario": scen,
        "layer": lname,
        "timing": "cuda_graph" if graphs else "do_bench",
        "tokens": len(c.slots),
        "ranks": ranks,
        "max_rank": max_rank,
        "block_m": c.meta.block_m,
        "tiles": c.meta.max_tiles,
        "base_us": timed([k.base for k in copies]),
        "lora_us": timed([k.add_lora for k in copies]),
        "shrink_us": timed([k.shrink for k in copies]),
        "expand_us": timed(
            [functools.partial(k.expand, h) for k, h in zip(copies, hs, strict=True)]
        ),
        "layer_us": timed([k.forward for k in copies]),
        "torch_ref_us": bench(c.reference),
    }
    row["overhead"] = row["layer_us"] / row["base_us"] - 1
    row["lora_bytes"] = lora_bytes(c.layer, c.slots, lambda a: ranks[a % len(ranks)])
    row["lora_GBps"] = row["lora_bytes"] / row["lora_us"] / 1e3
    row["speedup_vs_torch"] = row["torch_ref_us"] / row["lora_us"]
    del copies, hs
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def run_bench(out: Path, results: dict[str, Any], quick: bool) -> None:
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for (scen, ranks, max_rank), lname in itertools.product(SCENARIOS, LAYERS):
        if quick and scen == "decode-one":
            continue
        row = time_case(scen, ranks, max_rank, lname, rng)
        rows.append(row)
        print(
            f"{scen:17s} {lname:13s} base {row['base_us']:8.1f}us lora {row['lora_us']:7.1f}us "
            f"(shrink {row['shrink_us']:6.1f} expand {row['expand_us']:6.1f}) "
            f"torch {row['torch_ref_us']:8.1f}us layer {100 * row['overhead']:+5.1f}% "
            f"{row['lora_GBps']:6.0f} GB/s",
            flush=True,
        )
        results["rows"] = rows
        (out / "results.json").write_text(json.dumps(results, indent=1))


def sweep_case(
    scen: str, lname: str, block_m: int, rng: random.Random, shrink: bool = True
) -> list[dict[str, Any]]:
    c = Case.make(lname, scen, [16], 16, rng, block_m=block_m)
    h = c.shrink()
    rows: list[dict[str, Any]] = []
    key = {"scenario": scen, "layer": lname, "block_m": block_m}
    splits = (4, 8, 16, 32) if scen.startswith("decode") else (1, 2)
    for sk, bk, ns in itertools.product(splits, (64, 128, 256), (3, 4)) if shrink else ():
        us = bench(lambda sk=sk, bk=bk, ns=ns: c.shrink(split_k=sk, block_k=bk, num_stages=ns))
        rows.append(
            {**key, "kernel": "shrink", "split_k": sk, "block_k": bk, "stages": ns, "us": us}
        )
    # The engine's expand writes the delta for the GEMM to add onto (accumulate=False); the
    # in-place add serves layers with a bias.
    for bn, nw, acc in itertools.product((128, 256, 512, 1024), (4, 8), (False, True)):
        us = bench(
            lambda bn=bn, nw=nw, acc=acc: c.expand(h, block_n=bn, num_warps=nw, accumulate=acc)
        )
        kernel = "expand" if acc else "expand_store"
        rows.append({**key, "kernel": kernel, "block_n": bn, "num_warps": nw, "us": us})
    return rows


def run_sweep(out: Path, results: dict[str, Any], shrink: bool = True) -> None:
    """Kernel parameters around the heuristic's choice, for the two target scenarios."""
    rng = random.Random(1)
    sweep: list[dict[str, Any]] = []
    for scen, lname in itertools.product(("decode", "prefill"), LAYERS):
        for bm in (16, 32) if scen == "decode" else (32, 64):
            sweep += sweep_case(scen, lname, bm, rng, shrink)
        results["sweep"] = sweep
        (out / "results.json").write_text(json.dumps(results, indent=1))
    best: dict[str, Any] = {}
    for key, group in itertools.groupby(
        sorted(sweep, key=lambda r: (r["scenario"], r["layer"], r["kernel"])),
        key=lambda r: (r["scenario"], r["layer"], r["kernel"]),
    ):
        b = min(group, key=lambda r: r["us"])
        best["/".join(key)] = b
        print(
            "best",
            "/".join(key),
            {k: v for k, v in b.items() if k not in ("scenario", "layer", "kernel")},
            flush=True,
        )
    results["sweep_best"] = best


def run_fusion(out: Path, results: dict[str, Any]) -> None:
    """gate_up's activation: the plain SiLU kernel (the base model's cost), the expand then
    SiLU, and the fused expand + SiLU at a few launch settings, side by side."""
    from engine.kernels.elementwise_triton import silu_and_mul_triton
    from engine.kernels.lora_expand_triton import lora_expand_silu_and_mul

    rng = random.Random(3)
    rows: list[dict[str, Any]] = []
    for scen in ("decode", "prefill"):
        graphs = scen == "decode"
        copies = [Case.make("gate_up_proj", scen, [16], 16, rng) for _ in range(4 if graphs else 1)]
        hs = [k.shrink() for k in copies]
        pairs = list(zip(copies, hs, strict=True))

        def timed(fns: list[Callable[[], object]], graphs: bool = graphs) -> float:
            return graph_us(fns) if graphs else bench(fns[0])

        def unfused(k: Case, h: torch.Tensor) -> None:
            k.expand(h)
            silu_and_mul_triton(k.y)

        def fused(k: Case, h: torch.Tensor, **kw: Any) -> torch.Tensor:
            lay = k.layer
            return lora_expand_silu_and_mul(
                k.y, h, lay.lora_b_stacked, lay.lora_ranks, k.meta, **kw
            )

        row: dict[str, Any] = {
            "scenario": scen,
            "silu_us": timed([functools.partial(silu_and_mul_triton, k.y) for k in copies]),
            "expand_then_silu_us": timed([functools.partial(unfused, k, h) for k, h in pairs]),
            "fused_us": timed([functools.partial(fused, k, h) for k, h in pairs]),
        }
        for bn, nw in itertools.product((64, 128, 256, 512), (4, 8)):
            row[f"fused_bn{bn}_w{nw}_us"] = timed(
                [functools.partial(fused, k, h, block_n=bn, num_warps=nw) for k, h in pairs]
            )
        rows.append(row)
        print(scen, {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
        results["fusion"] = rows
        (out / "results.json").write_text(json.dumps(results, indent=1))
        del copies, hs, pairs
        torch.cuda.empty_cache()


def run_ncu_targets() -> None:
    """Each LoRA kernel of the target workload, launched twice (the first compiles), for a
    profiler: ``ncu -k regex:lora|silu ... gpu_lora_kernels.py --ncu-targets``. Decode on
    the graph's static metadata, prefill on 4096 tokens in 32 segments; for gate_up's
    prefill also the fused expand + SiLU and the SiLU alone."""
    from engine.kernels.elementwise_triton import silu_and_mul_triton
    from engine.kernels.lora_expand_triton import lora_expand_silu_and_mul

    rng = random.Random(4)
    for scen, lname in itertools.product(("decode", "prefill"), LAYERS):
        c = Case.make(lname, scen, [16], 16, rng)
        for _ in range(2):
            h = c.shrink()
            c.expand(h)
            if scen == "prefill" and lname == "gate_up_proj":
                lay = c.layer
                lora_expand_silu_and_mul(c.y, h, lay.lora_b_stacked, lay.lora_ranks, c.meta)
                silu_and_mul_triton(c.y)
            sync()
        print(scen, lname, "launched", flush=True)


def host_costs(results: dict[str, Any], profile_host: bool = False) -> None:
    """Host microseconds per build_lora_metadata and per launch (no sync); with
    ``profile_host``, a cProfile table of 200 eager forwards of a LoRA layer."""
    from engine.lora import build_lora_metadata

    costs: dict[str, float] = {}
    for scen in ("decode", "prefill"):
        slots = scenario_slots(scen, random.Random(2))
        build_lora_metadata(slots, torch.device(DEVICE))
        t0 = time.perf_counter()
        for _ in range(50):
            build_lora_metadata(slots, torch.device(DEVICE))
        costs[f"build_metadata_{scen}_{len(slots)}_us"] = (time.perf_counter() - t0) / 50 * 1e6
    c = Case.make("qkv_proj", "decode", [16], 16, random.Random(3))
    h = c.shrink()
    calls: dict[str, Callable[[], object]] = {
        "add_lora": c.add_lora,
        "shrink": c.shrink,
        "expand": functools.partial(c.expand, h),
        "layer_forward": c.forward,
        "base_linear": c.base,
        "torch_empty": functools.partial(torch.empty, 256, 48, device=DEVICE),
    }
    for name, fn in calls.items():
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        us = (time.perf_counter() - t0) / 100 * 1e6
        costs["add_lora_host_launch_us" if name == "add_lora" else f"{name}_host_us"] = us
        sync()
    if profile_host:  # where a layer's eager forward spends its host time
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            c.forward()
        prof.disable()
        sync()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), flush=True)
    if DEVICE == "cuda":
        # 32 calls in one CUDA graph, as a decode step of 32 layers replays them (L2 warm).
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(32):
                c.add_lora()
        g.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            g.replay()
        sync()
        costs["add_lora_in_graph_us_per_call_L2_warm"] = (time.perf_counter() - t0) / 640 * 1e6
    results["host"] = costs
    print("host", {k: round(v, 1) for k, v in costs.items()}, flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    if SMOKE:
        return 0.0
    a = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    return 2 * a.numel() / us / 1e3  # GB/s, read + write


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['device']} | torch {results['torch']} | triton {results['triton']} | copy {results.get('copy_GBps', 0):.0f} GB/s",
        f"tests: {results.get('tests', {}).get('summary', 'not run')}",
        "",
        "decode rows: CUDA-graph replay, 4 rotating layer copies (L2-cold, no launch gaps);",
        "prefill rows: do_bench median (L2 flushed). torch ref: eager do_bench.",
        "",
        "| scenario | layer | T | base us | LoRA us (shrink+expand) | base+LoRA layer us | torch ref us | layer overhead | LoRA GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("rows", []):
        lines.append(
            f"| {r['scenario']} | {r['layer']} | {r['tokens']} | {r['base_us']:.1f} | {r['lora_us']:.1f} "
            f"({r['shrink_us']:.1f}+{r['expand_us']:.1f}) | {r['layer_us']:.1f} | {r['torch_ref_us']:.1f} "
            f"| {100 * r['overhead']:+.1f}% | {r['lora_GBps']:.0f} |"
        )
    by_scen: dict[str, list[dict[str, Any]]] = {}
    for r in results.get("rows", []):
        by_scen.setdefault(r["scenario"], []).append(r)
    lines.append("")
    for scen, rs in by_scen.items():
        base = sum(r["base_us"] for r in rs)
        lora = sum(r["lora_us"] for r in rs)
        fwd = sum(r["layer_us"] for r in rs)
        ref = sum(r["torch_ref_us"] for r in rs)
        lines.append(
            f"{scen}: 4 projections of a decoder layer: base {base:.0f} us, base+LoRA {fwd:.0f} us "
            f"(+{100 * (fwd / base - 1):.1f}%), LoRA kernels alone {lora:.0f} us; "
            f"torch reference {ref:.0f} us ({ref / lora:.1f}x the kernels)"
        )
    if "host" in results:
        lines.append("host: " + ", ".join(f"{k} {v:.1f}" for k, v in results["host"].items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel parameters")
    p.add_argument("--quick", action="store_true", help="leave out the decode-one scenario")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (0: none)")
    p.add_argument(
        "--fusion-only", action="store_true", help="only gate_up's expand + SiLU timings"
    )
    p.add_argument(
        "--ncu-targets", action="store_true", help="launch each kernel twice, for a profiler"
    )
    p.add_argument(
        "--sweep-only", action="store_true", help="only the sweep of the expand's parameters"
    )
    p.add_argument(
        "--host-only", action="store_true", help="only the host costs, with a cProfile table"
    )
    args = p.parse_args()
    if args.ncu_targets:
        run_ncu_targets()
        return
    if args.host_only:
        host_costs({}, profile_host=True)
        return
    out = Path(os.environ.get("OUT", "artifacts/gpu_lora_kernels"))
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep_only:
        swept: dict[str, Any] = {}
        run_sweep(out, swept, shrink=False)
        (out / "results.json").write_text(json.dumps(swept, indent=1))
        return
    import triton

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if args.fusion_only:
        run_fusion(out, results)
        return
    if not args.skip_tests:
        results["tests"] = run_tests(out, args.workers)
    results["copy_GBps"] = copy_bandwidth()
    run_bench(out, results, args.quick)
    run_fusion(out, results)
    host_costs(results)
    if args.sweep:
        run_sweep(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "table.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

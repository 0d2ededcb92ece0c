"""A/B timings of the CUDA-graph decode step under the engine's benchmark switches.

One engine with adapters (``bench.py``'s random-weight checkpoints) is built once; for each
combination of switch values the decode graphs are captured again and the step of
``--batch`` sequences at ``--context`` tokens, every sequence on its own adapter slot
(``--adapters`` of them, cycled; 0: an engine without LoRA), is timed two ways: with CUDA
events over replays queued back to back (GPU time), and from the host's launch to the
synchronize, one replay at a time (what an engine step waits for). The variants take
turns for ``--rounds`` rounds, so drift of the machine (clocks, heat) falls on all of them;
the report gives each variant's median over rounds and its ratio to the first variant.

A switch is ``FIELD=v1,v2`` naming a kernel setting of ``EngineArgs`` (``KernelConfig``:
the fusion switches, the stacking limits, ``kernel_launch.NAME`` for one launch setting);
each variant runs the loaded model under its ``KernelConfig`` (``ModelRunner.use_kernel_config``),
for example:

    python3 -m benchmarks.kernels.decode_step --shape llama-3.1-8b \\
        --switch kernel_launch.attention_decode_num_warps=2,4 --out $OUT/step

Writes ``decode_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import utils  # checkpoints, engines, timing


def time_synced(fn: Any, iters: int) -> float:
    """Median host seconds from launching ``fn`` to the GPU finishing it, one at a time: what
    an engine step that waits for its tokens sees (``utils.time_cuda`` queues the replays
    back to back, so it hides the launches)."""
    for _ in range(3):
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_replays(replay: Any, path: Path, n: int = 5) -> None:
    """The kernels of ``n`` graph replays (CUPTI reports a graph's kernels one by one),
    by total GPU time; divide by ``n`` for one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=list(utils.tiny.SHAPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--adapters", type=int, default=32, help="slots in use; 0: none")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="FIELD=v1,v2",
        help="a kernel setting of EngineArgs and its values, e.g. lora_fused_silu=0,1 or "
        "kernel_launch.lora_shrink_num_warps=4,8; repeatable (default: none)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="replays timed per round")
    p.add_argument("--profile", action="store_true", help="kernel table of each variant's replays")
    p.add_argument("--workdir", default="/tmp/lorastream-bench")
    p.add_argument("--out", default="decode-step-out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    switches = [utils.parse_override(s) for s in args.switch]
    num_adapters = max(args.adapters, 1)
    model_dir = utils.make_checkpoint(Path(args.workdir), args.shape, num_adapters, args.rank)
    loras = [
        utils.LoRARequest(path.name, i + 1, str(path))
        for i, path in enumerate(utils.adapter_paths(model_dir, args.rank, num_adapters))
    ]
    engine_args = argparse.Namespace(
        device="cuda",
        max_num_seqs=args.batch,
        input_len=args.context,
        output_len=8,
        max_num_batched_tokens=8192,
        enforce_eager=False,
        seed=0,
        rank=args.rank,
        num_adapters=num_adapters,
    )
    if args.adapters:
        llm = utils.make_llm(model_dir, engine_args, num_adapters)
        utils.warm_up(llm, loras, engine_args, max(num_adapters, 8))  # fills the slots
    else:  # the base model, LoRA off
        llm = utils.make_llm(model_dir, engine_args, None)
        utils.warm_up(llm, [], engine_args, 8)
    runner = llm.llm_engine.runner
    slots = [i % args.adapters for i in range(args.batch)] if args.adapters else None

    variants = list(itertools.product(*(values for _, values in switches)))
    names = [name for name, _ in switches]
    times: dict[tuple[Any, ...], list[float]] = {v: [] for v in variants}
    synced: dict[tuple[Any, ...], list[float]] = {v: [] for v in variants}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for i, v in enumerate(variants):
            overrides = utils.engine_overrides(dict(zip(names, v, strict=True)))
            runner.use_kernel_config(utils.EngineArgs(model="_", **overrides).kernel_config())
            replay, _eager = runner.synthetic_decode(args.batch, args.context, slots)
            times[v].append(1e3 * utils.time_cuda(replay, iters=args.iters))
            synced[v].append(1e3 * time_synced(replay, iters=args.iters))
            if args.profile and round_ == 0:
                profile_replays(replay, out / f"kernels_variant{i}.txt")

    first = statistics.median(times[variants[0]])
    rows: list[dict[str, Any]] = []
    for v in variants:
        med = statistics.median(times[v])
        rows.append(
            {
                "switches": dict(zip(names, map(str, v), strict=True)),
                "graph_step_ms_median": med,
                "graph_step_ms_rounds": times[v],
                "ratio_to_first": med / first,
                "synced_step_ms_median": statistics.median(synced[v]),
                "synced_step_ms_rounds": synced[v],
            }
        )
    result = {
        "args": vars(args),
        "versions": utils.versions(),
        "rows": rows,
    }
    (out / "decode_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| {' | '.join(names)} | graph step ms (median) | rounds | vs first "
        "| launch + step + sync ms (median) | rounds |"
    )
    print("|" + "---|" * (len(names) + 5))
    for r in rows:
        rounds = " ".join(f"{t:.3f}" for t in r["graph_step_ms_rounds"])
        rounds_synced = " ".join(f"{t:.3f}" for t in r["synced_step_ms_rounds"])
        print(
            f"| {' | '.join(r['switches'].values())} | {r['graph_step_ms_median']:.3f} "
            f"| {rounds} | {r['ratio_to_first']:.3f} | {r['synced_step_ms_median']:.3f} "
            f"| {rounds_synced} |"
        )
    utils.close_llm(llm)


if __name__ == "__main__":
    main()

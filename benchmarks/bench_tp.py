"""Tensor-parallel benchmark (issue 23): one engine over N GPUs of a host, multi-LoRA, with
``fully_sharded_loras`` off and on, and the all-reduce time per step against the bus
bandwidth the same machine measures.

For each N in ``--tp``, each ``--num-seqs`` S, each ``--ranks`` r and (N > 1) each
``--fully-sharded`` layout, an ``LLMEngine`` with ``tensor_parallel_size=N`` serves S requests
of ``--input-len`` random prompt tokens and ``--output-len`` greedy tokens (EOS ignored),
request i on adapter i mod ``--num-adapters`` (``max_loras`` = that many: every adapter on the
device), all added at once, after a warm-up run of the same shape. Each row: output tok/s,
inter-token latency p50 / p99 (per request, between consecutive tokens as the step loop
hands them out) and the mean step time.

For each N > 1, ``collectives`` runs in N processes of its own (NCCL on CUDA, gloo on CPU):

- the bus bandwidth: an all-reduce of ``--bw-mib`` MiB in the model dtype, timed over
  ``--collective-iters`` runs, as nccl-tests reports it (``busbw = 2 (N-1)/N x bytes / t``);
- per configuration, the collectives of one decode step of S sequences at their exact sizes
  (``engine.distributed.traffic.step_collectives``: the embedding's and every layer's o/down
  all-reduce, the logits gather, and the layout's LoRA collectives), timed back to back
  over ``--collective-iters`` steps, against ``bus bytes / busbw``.

Rows land in ``bench_tp.json`` and ``bench_tp.md`` under ``--out``; the all-reduce time of a
step is set beside that configuration's measured step time. Checkpoints and adapters are
random weights at real shapes (``benchmarks.utils.make_checkpoint``).

Example (the issue's runs, on an 8-GPU host; N=4 where lent):
    python -m benchmarks.bench_tp --shape llama-3.1-8b --tp 1,2,4 --num-seqs 32,256 \\
        --ranks 16,64 --fully-sharded off,on --num-adapters 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import utils
from engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams

log = logging.getLogger("bench_tp")
PROMPT_VOCAB = (10, 900)  # ids the tiny tokenizer knows, clear of its special tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", help="engine.testing.tiny.SHAPES key")
    p.add_argument("--device", default="cuda", help="cpu: a dry run (gloo, tiny shape)")
    p.add_argument("--tp", default="1,2", help="tensor_parallel_size values, comma-separated")
    p.add_argument("--num-seqs", default="32,256", help="sequences per run (= max_num_seqs)")
    p.add_argument("--ranks", default="16,64", help="adapter ranks (= max_lora_rank)")
    p.add_argument("--fully-sharded", default="off,on", help="layouts at N > 1: off, on")
    p.add_argument("--num-adapters", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--collective-iters", type=int, default=50)
    p.add_argument("--bw-mib", type=int, default=256, help="all-reduce size for the bandwidth")
    p.add_argument("--workdir", default="/tmp/lorastream-bench")
    p.add_argument("--out", default="bench-tp-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collectives-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--collectives-job", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ints(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v]


def dtype_name(args: argparse.Namespace) -> str:
    return "bfloat16" if args.device.startswith("cuda") else "float32"


# ----------------------------------------------------------------------------- engine runs


def run_engine(
    model_dir: Path, args: argparse.Namespace, tp: int, seqs: int, rank: int, sharded: bool
) -> dict[str, Any]:

    loras = [
        LoRARequest(p.name, i + 1, str(p))
        for i, p in enumerate(utils.adapter_paths(model_dir, rank, args.num_adapters))
    ]
    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=str(model_dir),
            device=args.device,
            dtype=dtype_name(args),
            tensor_parallel_size=tp,
            enable_lora=True,
            fully_sharded_loras=sharded,
            max_loras=args.num_adapters,
            max_cpu_loras=args.num_adapters,
            max_lora_rank=rank,
            max_num_seqs=seqs,
            max_num_batched_tokens=max(8192 if args.device.startswith("cuda") else 2048, seqs),
            max_model_len=args.input_len + args.output_len,
            seed=args.seed,
            disable_log_stats=True,
        )
    )
    try:
        prompts = make_prompts(seqs, args.input_len, args.seed)
        generate(engine, prompts, loras, args.output_len, "warm")
        t0 = time.perf_counter()
        times, steps = generate(engine, prompts, loras, args.output_len, "run")
        wall = time.perf_counter() - t0
    finally:
        engine.engine_core.core.close()
    gaps = [b - a for ts in times.values() for a, b in itertools.pairwise(ts)]
    return {
        "tp": tp,
        "num_seqs": seqs,
        "rank": rank,
        "fully_sharded": sharded,
        "output_tok_s": seqs * args.output_len / wall,
        "itl_ms_p50": 1e3 * statistics.median(gaps),
        "itl_ms_p99": 1e3 * quantile(gaps, 0.99),
        "steps": steps,
        "step_ms": 1e3 * wall / steps,
    }


def generate(
    engine: LLMEngine,
    prompts: list[list[int]],
    loras: list[LoRARequest],
    output_len: int,
    tag: str,
) -> tuple[dict[str, list[float]], int]:
    """Every prompt at once, request i on adapter i mod len(loras); per request the times
    its tokens came out, and the steps taken."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(
            f"{tag}-{i}", {"prompt_token_ids": ids}, params, lora_request=loras[i % len(loras)]
        )
    times: dict[str, list[float]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    counts = dict.fromkeys(times, 0)
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            n = len(o.outputs[0].token_ids)
            times[o.request_id].extend([now] * (n - counts[o.request_id]))
            counts[o.request_id] = n
    short = [rid for rid, n in counts.items() if n != output_len]
    if short:
        raise RuntimeError(f"requests {short[:4]} did not make {output_len} tokens")
    return times, steps


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*PROMPT_VOCAB) for _ in range(length)] for _ in range(n)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ----------------------------------------------------------------------------- collectives


def run_collectives(
    model_dir: Path, args: argparse.Namespace, tp: int, configs: list[tuple[int, int, bool]]
) -> dict[str, Any]:
    """Start ``collectives_worker`` on ``tp`` ranks; rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "world": tp,
                    "store": str(Path(tmp) / "store"),
                    "configs": configs,
                    "out": str(Path(tmp) / "result.json"),
                }
            )
        )
        argv = [
            sys.executable,
            "-m",
            "benchmarks.bench_tp",
            *sys.argv[1:],
            "--collectives-job",
            str(job),
        ]
        procs = [subprocess.Popen([*argv, "--collectives-rank", str(r)]) for r in range(tp)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"collective ranks exited with {codes}")
        result: dict[str, Any] = json.loads((Path(tmp) / "result.json").read_text())
        return result


def collectives_worker(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from engine.distributed.group import TPGroup
    from engine.distributed.traffic import step_bus_bytes, step_collectives

    job = json.loads(Path(args.collectives_job).read_text())
    rank, world = args.collectives_rank, job["world"]
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = TPGroup.create(job["store"], rank, world, device)
    dtype = getattr(torch, dtype_name(args))
    hf = AutoConfig.from_pretrained(job["model"], local_files_only=True)

    def timed(fn: Any, iters: int) -> float:
        """Seconds per call of ``fn``, after two warm-up calls."""
        for _ in range(2):
            fn()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters

    elem = torch.empty((), dtype=dtype).element_size()
    big = torch.ones((args.bw_mib << 20) // elem, dtype=dtype, device=device)
    t = timed(lambda: group.all_reduce(big), max(5, args.collective_iters // 5))
    nbytes = big.numel() * big.element_size()
    busbw = 2 * (world - 1) / world * nbytes / t
    rows = []
    for seqs, lora_rank, sharded in job["configs"]:
        plan = step_collectives(hf, world, seqs, seqs, big.element_size(), lora_rank, sharded)
        tensors = []
        for c in plan:
            elem = torch.float32 if c.elem_bytes == 4 else dtype
            shape = list(c.shape)
            if c.op != "all_reduce":
                shape[-1] //= world  # each rank brings its share of the gathered result
            tensors += [(c.op, torch.ones(shape, dtype=elem, device=device))] * c.count

        def step(tensors: list[tuple[str, torch.Tensor]] = tensors) -> None:
            for op, x in tensors:
                if op == "all_reduce":
                    group.all_reduce(x)
                elif op == "all_gather":
                    group.all_gather(x)
                else:
                    group.gather_to_leader(x)

        seconds = timed(step, args.collective_iters)
        bus = step_bus_bytes(plan, world)
        rows.append(
            {
                "num_seqs": seqs,
                "rank": lora_rank,
                "fully_sharded": sharded,
                "collectives": sum(c.count for c in plan),
                "bus_mib": bus / 2**20,
                "collective_ms": 1e3 * seconds,
                "at_busbw_ms": 1e3 * bus / busbw,
            }
        )
    if rank == 0:
        Path(job["out"]).write_text(json.dumps({"busbw_gb_s": busbw / 1e9, "rows": rows}))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.collectives_job is not None:
        collectives_worker(args)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layouts = {"off": False, "on": True}
    sharded_modes = [layouts[v] for v in args.fully_sharded.split(",") if v]
    rows: list[dict[str, Any]] = []
    collectives: dict[int, dict[str, Any]] = {}
    model_dirs = {
        r: utils.make_checkpoint(Path(args.workdir), args.shape, args.num_adapters, r)
        for r in ints(args.ranks)
    }
    for tp in ints(args.tp):
        configs = []
        for seqs in ints(args.num_seqs):
            for r in ints(args.ranks):
                for sharded in sharded_modes if tp > 1 else [False]:
                    log.info("tp=%d seqs=%d rank=%d fully_sharded=%s", tp, seqs, r, sharded)
                    rows.append(run_engine(model_dirs[r], args, tp, seqs, r, sharded))
                    configs.append((seqs, r, sharded))
        if tp > 1:
            collectives[tp] = run_collectives(model_dirs[ints(args.ranks)[0]], args, tp, configs)
            for row in rows:
                for c in collectives[tp]["rows"] if row["tp"] == tp else []:
                    key = (c["num_seqs"], c["rank"], c["fully_sharded"])
                    if key == (row["num_seqs"], row["rank"], row["fully_sharded"]):
                        row.update({k: c[k] for k in ("collective_ms", "at_busbw_ms", "bus_mib")})
                        row["busbw_gb_s"] = collectives[tp]["busbw_gb_s"]
    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
    }
    (out / "bench_tp.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (out / "bench_tp.md").write_text(table(rows))
    print(table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | seqs | rank | fully sharded | tok/s | ITL p50 / p99 ms | step ms "
        "| collectives ms / step | at bus bw ms | bus MiB / step |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        coll = (
            f"{r['collective_ms']:.3f} | {r['at_busbw_ms']:.3f} | {r['bus_mib']:.2f}"
            if "collective_ms" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['tp']} | {r['num_seqs']} | {r['rank']} | {'on' if r['fully_sharded'] else 'off'} "
            f"| {r['output_tok_s']:,.0f} | {r['itl_ms_p50']:.2f} / {r['itl_ms_p99']:.2f} "
            f"| {r['step_ms']:.2f} | {coll} |"
        )
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

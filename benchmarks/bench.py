"""Throughput benchmark on one GPU: lorastream against itself and Hugging Face + PEFT.

One command, one run, the same workload (random prompts of ``--input-len`` tokens,
``--output-len`` greedy output tokens each, EOS ignored) on:

(a) lorastream, base model (``enable_lora=False``);
(b) lorastream with ``--num-adapters`` adapters of rank ``--rank`` on all seven modules,
    ``max_loras=--max-loras``, under Punica's four patterns: ``distinct`` (request i uses
    adapter i mod N), ``uniform`` (uniformly random), ``skewed`` (Zipf, alpha 1.5) and
    ``identical`` (all the same adapter);
(a) and (b) run in one process, two engines up side by side, their timed runs taking turns
(``--repeats`` rounds of base, pattern 1, pattern 2, ...), so drift over the runs (the
GPU's clocks fall as it heats up) falls on all of them alike.
(c) lorastream with ``max_loras=1`` (uniform pattern; ``--max-loras-1-prompts`` prompts);
(d) Hugging Face transformers + PEFT mixed-adapter ``generate(adapter_names=...)`` (uniform
    pattern) and plain transformers: timed on one batch of ``--hf-batch`` prompts for
    1 and ``--hf-steps`` new tokens, then scaled to the whole workload
    (prefill time + (output_len - 1) x step time per batch).

Plus the decode step against the HBM roofline: a CUDA-graph decode step of
``--max-num-seqs`` sequences at the workload's mean decode context, timed with CUDA events,
against (weights + KV + adapter bytes read per step) / copy bandwidth measured in the same
run with a large device-to-device copy.

Checkpoints are random weights at real shapes (``engine.testing.tiny``), written once under
``--workdir`` with the random numbers drawn on the GPU. Writes ``bench.json`` (one row per
configuration) and ``bench.md`` (a table) under ``--out``; ``--profile`` adds a
torch.profiler table of the multi-LoRA decode steps.

``--mode tiny-check`` instead runs the tiny test checkpoints on CUDA in float32 and
bfloat16 against transformers + PEFT (greedy tokens, and logprob differences with the
engine's tokens forced into the reference) and writes ``tiny_check.json``.

Example (the issue's target workload):
    python -m benchmarks.bench --shape llama-3.1-8b --num-prompts 256 --input-len 128 \\
        --output-len 128 --num-adapters 32 --rank 16 --max-loras 32 --max-num-seqs 256
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.utils import (
    PATTERNS,
    adapter_paths,
    assign_adapters,
    close_llm,
    copy_bandwidth,
    engine_overrides,
    free_memory,
    log,
    make_checkpoint,
    make_llm,
    make_prompts,
    parse_override,
    request_params,
    sampling_params,
    sync,
    time_cuda,
    versions,
    warm_up,
)
from engine.llm import LLM
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.testing import tiny


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("bench", "tiny-check"), default="bench")
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(tiny.SHAPES))
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (tiny shape)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--output-len-range",
        default=None,
        metavar="LO,HI",
        help="each request's output length drawn uniformly from LO..HI (seeded) instead of "
        "--output-len, with more prompts than --max-num-seqs: requests end at different "
        "steps and waiting ones take their place, so most steps mix prefill and decode, as "
        "in a server with steady arrivals",
    )
    p.add_argument("--num-adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset")
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--skip-max-loras-1", action="store_true")
    p.add_argument("--max-loras-1-prompts", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-batch", type=int, default=128)
    p.add_argument("--hf-steps", type=int, default=8, help="new tokens in the timed HF decode")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument(
        "--max-cudagraph-capture-size",
        type=int,
        default=None,
        help="the engines' max_cudagraph_capture_size (default: the engine's); 0: steps that "
        "mix prefill and decode run eagerly",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engines' enable_prefix_caching (default: on, the engine's default); every "
        "timed run starts with an empty prefix cache, so runs of the same prompts reuse "
        "nothing from each other",
    )
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="the first N of every prompt's --input-len tokens are the same (a system prompt): "
        "with prefix caching, requests of one adapter reuse its KV blocks (default 0)",
    )
    p.add_argument(
        "--max-num-mixed-prefill-tokens",
        type=int,
        default=None,
        help="the engines' max_num_mixed_prefill_tokens: prompt tokens in a step that also "
        "decodes (default: the engine's, 512); --max-num-batched-tokens or more: no cap",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="lorastream's requests sample at this temperature (0: greedy, the default)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature above 0")
    p.add_argument(
        "--multiprocessing",
        action="store_true",
        help="also run base and the first pattern with enable_multiprocessing=True",
    )
    p.add_argument(
        "--async-scheduling",
        choices=("off", "on", "both"),
        default="on",
        help="the engines' async_scheduling (on: the engine's default); both: each "
        "configuration runs both ways, in turns on the same engines, and the rows of the "
        "async runs end in ' async' (the profile, if any, is of an async run)",
    )
    p.add_argument(
        "--guided-json-share",
        type=float,
        default=0.0,
        help="structured output: also run the base model with this share of the requests "
        "(every k-th) under a JSON schema (GUIDED_SCHEMA), side by side with the same "
        "requests unconstrained; the row compares the constrained requests' decode rates "
        "(default 0: not run)",
    )
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler on multi-LoRA decode steps"
    )
    p.add_argument("--workdir", default="/tmp/lorastream-bench")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs of the base model and of each pattern, taking turns; rows keep the "
        "median run",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an EngineArgs field for every engine of the run (it travels to the engine-core "
        "process with the rest), e.g. lora_fused_silu=0, kernel_backend=torch or "
        "kernel_launch.attention_decode_num_warps=4 (one launch setting); repeatable",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- workload


@dataclass
class StepLog:
    """Host wall time per engine step, split by phase (engine methods wrapped in place)."""

    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    decode_steps: int = 0
    decode_step_s: float = 0.0
    decode_times: list[float] = field(default_factory=list)
    gc_s: float = 0.0
    gc_collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Python's cyclic garbage collector during the run: pauses (seconds) and collections
    per generation. A full (generation 2) collection walks every tracked object."""

    def summary(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        rest = self.step_s - self.schedule_s - self.execute_s - self.update_s
        times = sorted(self.decode_times)
        return {
            "steps": self.steps,
            "decode_steps": self.decode_steps,
            "step_ms": 1e3 * self.step_s / n,
            "schedule_ms": 1e3 * self.schedule_s / n,
            "execute_ms": 1e3 * self.execute_s / n,
            "update_ms": 1e3 * self.update_s / n,
            "detokenize_and_outputs_ms": 1e3 * rest / n,
            "decode_step_ms_mean": 1e3 * self.decode_step_s / max(self.decode_steps, 1),
            "decode_step_ms_median": 1e3 * times[len(times) // 2] if times else 0.0,
            "decode_step_ms_p90": 1e3 * times[len(times) * 9 // 10] if times else 0.0,
            # (index among the decode steps, ms) of the slowest few, slowest first: where a
            # mean above the median comes from.
            "decode_steps_slowest": [
                (i, round(1e3 * t, 2))
                for i, t in sorted(enumerate(self.decode_times), key=lambda it: -it[1])[:5]
            ],
            "gc_ms_per_step": 1e3 * self.gc_s / n,
            "gc_collections": list(self.gc_collections),
        }


@contextlib.contextmanager
def instrument(llm: LLM, on_step: Callable[[], None] | None = None) -> Iterator[StepLog]:
    eng = llm.llm_engine
    rec = StepLog()
    sched, launch, upd, step = (
        eng.scheduler.schedule,
        eng.runner.launch,
        eng.scheduler.update_from_output,
        eng.step,
    )
    decode = [False]

    def timed(fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(rec, attr, getattr(rec, attr) + time.perf_counter() - t)

        return wrapper

    def launch_step(s: Any, previous: Any = None) -> Any:
        # With async scheduling a call launches one step and collects the one before: the
        # call counts as a decode step when the step it launches is one. "execute" is the
        # launch plus the wait for the tokens, as in a step without async scheduling.
        decode[0] = bool(s.scheduled) and all(x.num_new_tokens == 1 for x in s.scheduled)
        handle = timed(launch, "execute_s")(s, previous)
        handle.wait = timed(handle.wait, "execute_s")
        return handle

    def engine_step() -> Any:
        decode[0] = False
        t = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t
        rec.step_s += dt
        rec.steps += 1
        if on_step is not None:
            on_step()
        if decode[0]:
            rec.decode_steps += 1
            rec.decode_step_s += dt
            rec.decode_times.append(dt)
        return out

    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            rec.gc_s += time.perf_counter() - gc_start[0]
            rec.gc_collections[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    eng.scheduler.schedule = timed(sched, "schedule_s")  # type: ignore[method-assign]
    eng.runner.launch = launch_step  # type: ignore[method-assign]
    eng.scheduler.update_from_output = timed(upd, "update_s")  # type: ignore[method-assign]
    eng.step = engine_step  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        gc.callbacks.remove(on_gc)
        for name in ("schedule", "update_from_output"):
            eng.scheduler.__dict__.pop(name, None)
        eng.runner.__dict__.pop("launch", None)
        eng.__dict__.pop("step", None)


# ----------------------------------------------------------------------------- lorastream


def run_multiprocess(
    model_dir: Path,
    prompts: list[list[int]],
    loras: list[LoRARequest],
    pattern: str | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The same workload with the engine core in its own process: the step loop there,
    detokenizing and outputs here. Host times come from ``get_step_timings``."""
    llm = make_llm(model_dir, args, args.max_loras if pattern else None, mp=True)
    try:
        adapters = (
            assign_adapters(pattern, len(prompts), args.num_adapters, args.seed)
            if pattern
            else None
        )
        warm_up(llm, loras if pattern else [], args, len(prompts), adapters)
        params = request_params(args, len(prompts))
        reqs = [loras[a] for a in adapters] if adapters is not None else None
        before = llm.llm_engine.get_step_timings()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, reqs)
        elapsed = time.perf_counter() - t0
        after = llm.llm_engine.get_step_timings()
        # What the core process runs: --set's fields reached it.
        kernel_config = llm.llm_engine.get_kernel_config()
    finally:
        close_llm(llm)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(p.max_tokens for p in params), "a request stopped early"
    name = f"lorastream {pattern or 'base'} (multiprocessing)"
    row = {
        "config": name,
        "num_prompts": len(prompts),
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "distinct_adapters": len(set(adapters)) if adapters is not None else 0,
        "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outs),
        "step_timings_ms": after,
        "step_timings_before_ms": before,
        "kernel_config": kernel_config,
    }
    log.info("%s: %.0f output tok/s (%.1f s); %s", name, row["output_tok_s"], elapsed, after)
    return row


GUIDED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["id", "name", "tags", "score"],
    "additionalProperties": False,
}
"""The schema of --guided-json-share's requests: unbounded strings and arrays, so a
constrained request can run as long as the others."""


def guided_rows(n: int, share: float) -> list[int]:
    """Which of ``n`` requests are constrained: every k-th, ``share`` of them."""
    if share <= 0:
        return []
    k = max(1, round(1 / share))
    return list(range(0, n, k))


def run_lorastream(
    llm: LLM,
    name: str,
    prompts: list[list[int]],
    adapters: list[int] | None,
    loras: list[LoRARequest],
    args: argparse.Namespace,
    profile_dir: Path | None = None,
    guided: list[int] | None = None,
) -> dict[str, Any]:
    """One timed run. ``guided``: requests under GUIDED_SCHEMA (they may end early, when
    their JSON is complete)."""
    params = request_params(args, len(prompts))
    for i in guided or []:
        params[i] = dataclasses.replace(params[i], guided_json=GUIDED_SCHEMA)
    reqs = [loras[a] for a in adapters] if adapters is not None else None
    inputs: list[Any] = [{"prompt_token_ids": p} for p in prompts]
    runner = llm.llm_engine.runner
    # Runs take turns on the same prompts: none may find another's (or the warm-up's) KV.
    llm.llm_engine.core.reset_prefix_cache()
    before = _copy_timings(runner.timings)
    sync()
    with _profiler(profile_dir) as hook, instrument(llm, hook) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, reqs)
        sync()
        elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    constrained = set(guided or [])
    assert all(
        len(o.outputs[0].token_ids) == p.max_tokens
        for i, (o, p) in enumerate(zip(outs, params, strict=True))
        if i not in constrained
    ), "a request stopped early"
    t = runner.timings
    steps = max(t.steps - before.steps, 1)
    row: dict[str, Any] = {
        "config": name,
        "num_prompts": len(prompts),
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "total_tok_s": (n_out + sum(map(len, prompts))) / elapsed,
        "distinct_adapters": len(set(adapters)) if adapters is not None else 0,
        "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outs),
        "graph_steps": t.graph_steps - before.graph_steps,
        "mixed_graph_steps": t.mixed_graph_steps - before.mixed_graph_steps,
        "runner_prepare_ms": 1e3 * (t.prepare_s - before.prepare_s) / steps,
        "runner_forward_launch_ms": 1e3 * (t.forward_s - before.forward_s) / steps,
        "runner_sample_ms": 1e3 * (t.sample_s - before.sample_s) / steps,
        "runner_wait_ms": 1e3 * (t.wait_s - before.wait_s) / steps,
        **rec.summary(),
        "kernel_config": llm.llm_engine.get_kernel_config(),
        "decode_tok_s_per_request": _decode_rates(outs),
    }
    log.info("%s: %.0f output tok/s (%.1f s)", name, row["output_tok_s"], elapsed)
    return row


def _decode_rates(outs: list[RequestOutput]) -> list[float]:
    """Each request's tokens per second from its first token to its last."""
    rates = []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        span = m.get("finished_time", 0.0) - m.get("first_token_time", 0.0)
        rates.append((n - 1) / span if n > 1 and span > 0 else 0.0)
    return rates


def bench_guided(
    model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    """The base model with ``--guided-json-share`` of its requests under GUIDED_SCHEMA,
    taking turns with the same requests all unconstrained, ``--repeats`` times. The row's
    ratio is the constrained requests' mean decode rate (tokens per second while each
    runs) over the same requests' in the unconstrained runs: what masking costs a token,
    whatever the requests' lengths (a constrained one ends when its JSON is complete)."""
    guided = guided_rows(len(prompts), args.guided_json_share)
    llm = make_llm(model_dir, args, None)
    try:
        warm_up(llm, [], args, len(prompts))
        llm.generate(  # compiles the schema once: later requests find it cached
            [{"prompt_token_ids": prompts[0]}],
            dataclasses.replace(sampling_params(args, 3), guided_json=GUIDED_SCHEMA),
        )
        plain_runs, guided_runs = [], []
        for _ in range(args.repeats):
            plain_runs.append(
                run_lorastream(llm, "lorastream base (plain)", prompts, None, [], args)
            )
            guided_runs.append(
                run_lorastream(
                    llm, f"lorastream base guided {args.guided_json_share:g}", prompts, None, [],
                    args, guided=guided,
                )
            )  # fmt: skip
        plain, row = median_row(plain_runs), median_row(guided_runs)

        def mean_rate(r: dict[str, Any]) -> float:
            rates = [r["decode_tok_s_per_request"][i] for i in guided]
            return sum(rates) / max(len(rates), 1)

        row["guided_requests"] = len(guided)
        row["guided_decode_tok_s"] = mean_rate(row)
        row["plain_decode_tok_s"] = mean_rate(plain)
        row["guided_vs_plain"] = row["guided_decode_tok_s"] / max(row["plain_decode_tok_s"], 1e-9)
        rows.extend([plain, row])
    finally:
        close_llm(llm)


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the median run (by output tok/s), with every run's output tok/s. Host work
    per step varies from run to run (detokenizing alone took 2 to 7 ms per step on one H200
    machine), so one run's ratio can be off by 10 %."""
    rounds = [r["output_tok_s"] for r in runs]  # in the order they ran
    runs = sorted(runs, key=lambda r: r["output_tok_s"])
    row = runs[len(runs) // 2]
    row["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
    row["output_tok_s_rounds"] = rounds
    return row


def _copy_timings(t: Any) -> Any:
    return type(t)(**vars(t))


@contextlib.contextmanager
def _profiler(out_dir: Path | None) -> Iterator[Callable[[], None] | None]:
    """Profiles engine steps 40..43 of the run (decode steps at the workload's sizes),
    graphs included (their kernels show as one launch each);
    yields the per-step hook, None when not profiling."""
    if out_dir is None:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    out_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(p: Any) -> None:
        for key in ("cuda_time_total", "cpu_time_total"):
            table = p.key_averages().table(sort_by=key, row_limit=25)
            (out_dir / f"profile_{key.split('_')[0]}.txt").write_text(table)
        # The timeline (chrome://tracing, Perfetto): where the GPU waits for the host.
        trace = out_dir / "trace.json"
        p.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()

    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=40, warmup=2, active=4, repeat=1),
        on_trace_ready=on_ready,
    ) as p:
        yield p.step


# ----------------------------------------------------------------------------- roofline


@contextlib.contextmanager
def section(name: str, rows: list[dict[str, Any]]) -> Iterator[None]:
    """Run one part of the benchmark; a failure becomes an error row, the rest still runs."""
    try:
        yield
    except Exception as e:  # a benchmark reports what broke and carries on
        log.exception("%s failed", name)
        rows.append({"config": f"error: {name}", "error": f"{type(e).__name__}: {e}"})


def decode_bytes(
    llm: LLM, batch: int, context: int, lora_slots: list[int] | None
) -> dict[str, int]:
    """Bytes one decode step must read: every weight once (the embedding only for its rows
    unless tied to lm_head), K and V of every context token, each used adapter's A and B."""
    runner = llm.llm_engine.runner
    model = runner.model
    weights = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") and not model.tie_word_embeddings:
            weights += batch * p.shape[1] * p.element_size()
        else:
            weights += p.numel() * p.element_size()
    kv = 2 * batch * context * model.num_layers * model.num_kv_heads * model.head_dim
    kv *= torch.empty((), dtype=model.dtype).element_size()
    lora = 0
    if lora_slots is not None and runner.lora_manager is not None:
        used = {s for s in lora_slots if s >= 0}
        for layer in model.lora_layers().values():
            per_slot = 0
            for a, b in zip(layer.lora_a, layer.lora_b, strict=True):
                per_slot += a[0].numel() * a.element_size() + b[0].numel() * b.element_size()
            lora += per_slot * len(used)
    return {"weights": weights, "kv": kv, "lora": lora}


def roofline_row(
    llm: LLM,
    name: str,
    args: argparse.Namespace,
    bw: float,
    lora_slots: list[int] | None,
    profile_path: Path | None = None,
) -> dict[str, Any] | None:
    runner = llm.llm_engine.runner
    batch = args.max_num_seqs
    if batch not in runner.graphs:
        return None
    context = args.input_len + args.output_len // 2
    replay, eager = runner.synthetic_decode(batch, context, lora_slots)
    graph_s = time_cuda(replay)
    eager_s = time_cuda(eager, iters=5)
    if profile_path is not None:  # kernels of one eager decode step (a graph hides them)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                eager()
            sync()
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(p.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    nbytes = decode_bytes(llm, batch, context, lora_slots)
    ideal_s = sum(nbytes.values()) / bw
    return {
        "config": f"roofline {name}",
        "batch": batch,
        "context": context,
        "graph_step_ms": 1e3 * graph_s,
        "eager_step_ms": 1e3 * eager_s,
        "bytes_gb": {k: v / 1e9 for k, v in nbytes.items()},
        "roofline_ms": 1e3 * ideal_s,
        "fraction_of_roofline": ideal_s / graph_s,
    }


# ----------------------------------------------------------------------------- Hugging Face


def run_hf(
    model_dir: Path, prompts: list[list[int]], adapters: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map=args.device
    )
    base.eval()
    paths = adapter_paths(model_dir, args.rank, args.num_adapters)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(p, adapter_name=f"a{i}")
    model.eval()
    log.info("HF + PEFT loaded in %.1f s", time.perf_counter() - t0)
    batch = min(args.hf_batch, len(prompts))
    ids = torch.tensor(prompts[:batch], device=args.device)
    names = [f"a{a}" for a in adapters[:batch]]

    def gen(n: int, peft: bool) -> float:
        kw: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": n,
            "min_new_tokens": n,
            "do_sample": False,
            "pad_token_id": 0,
        }
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            if peft:
                model.generate(**kw, adapter_names=names)
            else:
                with model.disable_adapter():
                    model.generate(**kw)
        sync()
        return time.perf_counter() - t

    rows = []
    for peft in (True, False):
        gen(2, peft)  # warm-up
        t1 = gen(1, peft)
        tn = gen(args.hf_steps, peft)
        step = (tn - t1) / (args.hf_steps - 1)
        batches = math.ceil(len(prompts) / batch)
        projected = batches * (t1 + (args.output_len - 1) * step)
        rows.append(
            {
                "config": "HF transformers + PEFT (mixed adapters)"
                if peft
                else "HF transformers (base)",
                "batch": batch,
                "prefill_s": t1,
                "decode_step_ms": 1e3 * step,
                "projected_elapsed_s": projected,
                "output_tok_s": len(prompts) * args.output_len / projected,
                "distinct_adapters": len(set(adapters[:batch])) if peft else 0,
            }
        )
        log.info("%s: %.0f output tok/s", rows[-1]["config"], rows[-1]["output_tok_s"])
    return rows  # the caller frees the models (gc, empty_cache)


# ----------------------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {}
    for spec in args.set:
        name, values = parse_override(spec)
        if len(values) != 1:
            raise SystemExit(f"--set {spec!r}: one value")
        settings[name] = values[0]
    args.engine_overrides = engine_overrides(settings)
    model_dir = make_checkpoint(Path(args.workdir), args.shape, args.num_adapters, args.rank)
    loras = [
        LoRARequest(p.name, i + 1, str(p))
        for i, p in enumerate(adapter_paths(model_dir, args.rank, args.num_adapters))
    ]
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed, args.shared_prefix_len)
    patterns = [p for p in args.patterns.split(",") if p]
    bw = copy_bandwidth() if args.device == "cuda" else 1e12
    log.info("device-to-device copy: %.2f TB/s", bw / 1e12)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "args": vars(args),
        "versions": versions(),
        "copy_bandwidth_tb_s": bw / 1e12,
        "rows": rows,
    }

    def save() -> None:
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench.md").write_text(table(result) + "\n")

    if patterns or not args.skip_base:
        with section("base and adapters", rows):
            bench_side_by_side(model_dir, prompts, loras, patterns, args, bw, rows, out, save)
        free_memory()
        save()
    if args.guided_json_share > 0:
        with section("structured output", rows):
            bench_guided(model_dir, prompts, args, rows)
        free_memory()
        save()
    if args.multiprocessing:
        for pattern in (None, *patterns[:1]):
            with section(f"multiprocessing {pattern or 'base'}", rows):
                rows.append(run_multiprocess(model_dir, prompts, loras, pattern, args))
            free_memory()
            save()
    if not args.skip_max_loras_1:
        with section("max_loras=1", rows):
            llm = make_llm(model_dir, args, 1)
            n = min(args.max_loras_1_prompts, len(prompts))
            warm_up(llm, loras[:1], args, n)
            adapters = assign_adapters("uniform", n, args.num_adapters, args.seed)
            name = "lorastream max_loras=1 (uniform)"
            rows.append(run_lorastream(llm, name, prompts[:n], adapters, loras, args))
            close_llm(llm)
            del llm
        free_memory()
        save()
    if not args.skip_hf:
        with section("hf", rows):
            adapters = assign_adapters("uniform", len(prompts), args.num_adapters, args.seed)
            rows.extend(run_hf(model_dir, prompts, adapters, args))
            save()  # before the (slow) teardown of the HF models
        free_memory()
        save()

    summarize(result)
    save()
    return result


def bench_side_by_side(
    model_dir: Path,
    prompts: list[list[int]],
    loras: list[LoRARequest],
    patterns: list[str],
    args: argparse.Namespace,
    bw: float,
    rows: list[dict[str, Any]],
    out: Path,
    save: Callable[[], None],
) -> None:
    """(a) base and (b) each pattern, ``--repeats`` timed runs each, taking turns: base,
    pattern 1, pattern 2, ..., base, ... Two engines (one without LoRA, one with it) stay
    up side by side, so whatever drifts over the runs (the GPU's clocks fall as it heats
    up, host noise) falls on every configuration alike instead of on whichever runs last.
    Each row is its configuration's median run. Then one roofline row per engine."""
    engines: dict[str, LLM] = {}
    try:
        if not args.skip_base:
            engines["base"] = make_llm(model_dir, args, None)
            warm_up(engines["base"], [], args, len(prompts))
        assignments: dict[str, list[int] | None] = {} if args.skip_base else {"base": None}
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.async_scheduling]
        if patterns:
            engines["lora"] = make_llm(model_dir, args, args.max_loras)
            warm_up(engines["lora"], loras, args, len(prompts))
            for pattern in patterns:
                assigned = assign_adapters(pattern, len(prompts), args.num_adapters, args.seed)
                warm_up(engines["lora"], loras, args, len(prompts), assigned, add=False)
                assignments[pattern] = assigned

        def label(name: str, on: bool) -> str:
            return name + (" async" if on and len(modes) > 1 else "")

        runs: dict[str, list[dict[str, Any]]] = {
            label(name, on): [] for name in assignments for on in modes
        }
        for _ in range(args.repeats):
            for name, adapters in assignments.items():
                llm = engines["base" if adapters is None else "lora"]
                for on in modes:
                    llm.llm_engine.core.async_scheduling = on
                    runs[label(name, on)].append(
                        run_lorastream(
                            llm, f"lorastream {label(name, on)}", prompts, adapters, loras, args
                        )
                    )
        rows.extend(median_row(r) for r in runs.values())
        save()
        profile_dir = out / "profile"
        # The adapters' step with every slot in use, tokens spread over them (the distinct
        # pattern).
        all_slots = [i % args.max_loras for i in range(args.max_num_seqs)]
        roofs = (("base", "base", None), ("lora", f"{args.max_loras} adapters", all_slots))
        for key, name, slots in roofs:
            if key not in engines:
                continue
            prof = profile_dir / f"decode_kernels_{key}.txt" if args.profile else None
            with section(f"roofline {name}", rows):
                if (r := roofline_row(engines[key], name, args, bw, slots, prof)) is not None:
                    rows.append(r)
        if args.profile and "lora" in engines:
            # An extra, untimed run: the profiler slows the steps it records.
            with section("profile", rows):
                llm, first = engines["lora"], assignments[patterns[0]]
                run_lorastream(llm, "profile", prompts, first, loras, args, profile_dir)
    finally:
        for llm in engines.values():
            close_llm(llm)


def _round_ratios(row: dict[str, Any], base: dict[str, Any]) -> list[float]:
    """Each round's tok/s over the base's in the same round (none unless both ran the same
    number of rounds, more than one)."""
    mine, theirs = row.get("output_tok_s_rounds", []), base.get("output_tok_s_rounds", [])
    if len(mine) < 2 or len(mine) != len(theirs):
        return []
    return [m / t for m, t in zip(mine, theirs, strict=True)]


def summarize(result: dict[str, Any]) -> None:
    """Ratios against the issue's targets."""
    by = {r["config"]: r for r in result["rows"]}
    base = by.get("lorastream base", {}).get("output_tok_s")
    peft = by.get("HF transformers + PEFT (mixed adapters)", {}).get("output_tok_s")
    targets: dict[str, Any] = {}
    mp_base = by.get("lorastream base (multiprocessing)", {}).get("output_tok_s")
    for pattern in PATTERNS:
        mp_row = by.get(f"lorastream {pattern} (multiprocessing)")
        if mp_row is not None and mp_base:
            targets[f"{pattern} / base, multiprocessing (>= 0.90)"] = (
                mp_row["output_tok_s"] / mp_base
            )
        for mode in ("", " async"):
            row = by.get(f"lorastream {pattern}{mode}")
            base_row = by.get(f"lorastream base{mode}")
            if row is None:
                continue
            if base_row:
                name = f"{pattern}{mode} / base{mode}"
                targets[f"{name} (>= 0.90)"] = row["output_tok_s"] / base_row["output_tok_s"]
                # Side by side, round i of each configuration ran next to the others' round
                # i: the ratio within a round leaves out what drifts between rounds.
                paired = _round_ratios(row, base_row)
                if paired:
                    targets[f"{name}, median of the rounds' ratios"] = statistics.median(paired)
            if peft:
                targets[f"{pattern}{mode} / HF PEFT (>= 50)"] = row["output_tok_s"] / peft
    base_async = by.get("lorastream base async", {}).get("output_tok_s")
    if base and base_async:
        targets["base async / base"] = base_async / base
    for r in result["rows"]:
        if "guided_vs_plain" in r:
            targets[f"{r['config']}: constrained / unconstrained decode rate (>= 0.90)"] = r[
                "guided_vs_plain"
            ]
        if r["config"].startswith("roofline"):
            targets[f"{r['config']} fraction (>= 0.65)"] = r["fraction_of_roofline"]
    result["targets"] = targets


def table(result: dict[str, Any]) -> str:
    lines = [
        "| config | prompts | output tok/s | elapsed s | decode step ms (median) | "
        "host ms/step: schedule / execute / update / detok | graph steps (mixed) / steps | GC ms/step (full GCs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    roof = [
        "",
        "| roofline | batch | context | graph step ms | eager step ms | GB read (w/kv/lora) | roofline ms | fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r["config"]
        if c.startswith("roofline"):
            gb = r["bytes_gb"]
            roof.append(
                f"| {c} | {r['batch']} | {r['context']} | {r['graph_step_ms']:.2f} | "
                f"{r['eager_step_ms']:.2f} | {gb['weights']:.2f} / {gb['kv']:.2f} / {gb['lora']:.2f} | "
                f"{r['roofline_ms']:.2f} | {r['fraction_of_roofline']:.2f} |"
            )
        elif c.startswith("HF"):
            lines.append(
                f"| {c} (batch {r['batch']}, projected) | | {r['output_tok_s']:.0f} | "
                f"{r['projected_elapsed_s']:.1f} | {r['decode_step_ms']:.1f} | | | |"
            )
        elif c.endswith("(multiprocessing)"):
            lines.append(
                f"| {c} | {r['num_prompts']} | {r['output_tok_s']:.0f} | {r['elapsed_s']:.2f} | "
                f"| (core process; see step_timings_ms in bench.json) | | |"
            )
        elif c.startswith("error"):
            lines.append(f"| {c} | | | | | {r['error'][:200]} | | |")
        else:
            lines.append(
                f"| {c} | {r['num_prompts']} | {r['output_tok_s']:.0f} | {r['elapsed_s']:.2f} | "
                f"{r['decode_step_ms_median']:.2f} | {r['schedule_ms']:.2f} / {r['execute_ms']:.2f} / "
                f"{r['update_ms']:.2f} / {r['detokenize_and_outputs_ms']:.2f} | {r['graph_steps']} "
                f"({r.get('mixed_graph_steps', 0)}) / {r['steps']} "
                f"| {r['gc_ms_per_step']:.2f} ({r['gc_collections'][2]}) |"
            )
    targets = ["", "| target | value |", "|---|---|"] + [
        f"| {k} | {v:.3f} |" for k, v in result.get("targets", {}).items()
    ]
    head = f"copy bandwidth: {result['copy_bandwidth_tb_s']:.2f} TB/s; " + ", ".join(
        f"{k} {v}" for k, v in result["versions"].items()
    )
    return "\n".join([head, "", *lines, *roof, *targets])


# ----------------------------------------------------------------------------- tiny check


def tiny_check(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny checkpoints on CUDA vs transformers + PEFT, float32 and bfloat16."""
    import tempfile

    from transformers import AutoTokenizer

    root = Path(tempfile.mkdtemp(prefix="tiny-check-"))
    prompts = [
        "The quick brown fox jumps over the lazy dog",
        "Once upon a time",
        "In the beginning the model said that the answer to everything was",
        "Serving many users at once is a different problem.",
    ]
    max_tokens = 16
    result: dict[str, Any] = {"versions": versions(), "runs": []}
    for arch, seed in (("llama", 0), ("qwen2", 1), ("mistral", 2)):
        model_dir = tiny.make_tiny_model(root / arch, num_adapters=4, arch=arch, seed=seed)
        adapters = sorted(p for p in (model_dir / "adapters").iterdir() if p.is_dir())
        loras: list[LoRARequest | None] = [None] + [
            LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(adapters)
        ]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ref32 = _peft_model(model_dir, adapters, torch.float32, args.device)
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            ref = (
                ref32
                if dtype == torch.float32
                else _peft_model(model_dir, adapters, dtype, args.device)
            )
            llm = LLM(
                str(model_dir),
                device=args.device,
                dtype=dtype_name,
                enable_lora=True,
                max_loras=4,
                max_lora_rank=32,
                max_num_seqs=16,
            )
            params = SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5
            )
            jobs = [(p, lo) for p in prompts for lo in loras]
            outs = llm.generate([p for p, _ in jobs], params, [lo for _, lo in jobs])
            match = identical = 0
            max_lp = max_lp_hf = 0.0
            for (prompt, lora), o in zip(jobs, outs, strict=True):
                ids = tokenizer.encode(prompt)
                got = o.outputs[0].token_ids
                # Greedy tokens against the reference in the same dtype.
                greedy = _hf_greedy(ref, ids, lora, max_tokens)
                match += sum(a == b for a, b in zip(got, greedy, strict=True))
                identical += got == greedy
                # Logprobs against float32 PEFT, teacher-forced along the engine's tokens.
                lp_ref = _hf_logprobs(ref32, ids, got, lora)  # [n, V]
                # The same for PEFT in this dtype: how far it is itself from float32.
                lp_hf = _hf_logprobs(ref, ids, got, lora) if ref is not ref32 else lp_ref
                for step, entry in enumerate(o.outputs[0].logprobs or []):
                    for tid, lp in entry.items():
                        max_lp = max(max_lp, abs(lp.logprob - float(lp_ref[step, tid])))
                        hf_diff = abs(float(lp_hf[step, tid]) - float(lp_ref[step, tid]))
                        max_lp_hf = max(max_lp_hf, hf_diff)
            result["runs"].append(
                {
                    "arch": arch,
                    "dtype": dtype_name,
                    "tokens_matching": match,
                    "tokens_total": max_tokens * len(jobs),
                    "sequences_identical": identical,
                    "sequences": len(jobs),
                    "max_abs_logprob_diff_vs_fp32_peft_top5": max_lp,
                    "peft_same_dtype_max_abs_logprob_diff_vs_fp32_top5": max_lp_hf,
                    "graph_steps": llm.llm_engine.runner.timings.graph_steps,
                }
            )
            log.info("tiny %s %s: %s", arch, dtype_name, result["runs"][-1])
            close_llm(llm)
            del llm
            if ref is not ref32:
                del ref
            gc.collect()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _peft_model(model_dir: Path, adapters: list[Path], dtype: torch.dtype, device: str) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device).eval()
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0].name)
    for a in adapters[1:]:
        model.load_adapter(a, adapter_name=a.name)
    return model.eval()


def _hf_context(model: Any, lora: LoRARequest | None) -> Any:
    if lora is None:
        return model.disable_adapter()
    model.set_adapter(lora.lora_name)
    return contextlib.nullcontext()


@torch.inference_mode()
def _hf_greedy(model: Any, ids: list[int], lora: LoRARequest | None, n: int) -> list[int]:
    out: list[int] = []
    with _hf_context(model, lora):
        for _ in range(n):
            logits = model(torch.tensor([ids + out], device=model.device)).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


@torch.inference_mode()
def _hf_logprobs(
    model: Any, ids: list[int], got: list[int], lora: LoRARequest | None
) -> torch.Tensor:
    with _hf_context(model, lora):
        logits = model(torch.tensor([ids + got], device=model.device)).logits[0].float()
    return torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(got)], dim=-1).cpu()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA device (or --device cpu for a dry run)")
    if args.mode == "tiny-check":
        tiny_check(args)
        return
    result = bench(args)
    print(table(result))


if __name__ == "__main__":
    main()

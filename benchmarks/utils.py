"""What the benchmarks share: random-weight checkpoints at real shapes, prompts and adapter
patterns, the engines they build (with ``--set``'s EngineArgs overrides), warm-up, CUDA
timing and the versions a result records."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import platform
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineArgs
from engine.llm import LLM
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.testing import tiny

PATTERNS = ("distinct", "uniform", "skewed", "identical")


ZIPF_ALPHA = 1.5


PROMPT_VOCAB = (10, 900)  # ids the tiny tokenizer knows, clear of its special tokens

log = logging.getLogger("bench")


def parse_override(spec: str) -> tuple[str, list[Any]]:
    """``FIELD=v1,v2`` -> (field, values): an ``EngineArgs`` field (``kernel_launch.NAME``:
    one launch setting), values parsed as the field's default's type (bool as 0/1)."""
    from engine.config import LaunchConfig

    name, _, values = spec.partition("=")
    if not (name and values):
        raise SystemExit(f"{spec!r}: expected FIELD=v1,v2 (an EngineArgs field)")
    field_name, _, launch = name.partition(".")
    defaults = EngineArgs(model="_")
    if field_name == "kernel_launch" and launch:
        if launch not in {f.name for f in dataclasses.fields(LaunchConfig)}:
            raise SystemExit(f"{spec!r}: LaunchConfig has no field {launch!r}")
        kind: type = int
    elif launch or not hasattr(defaults, field_name) or field_name == "model":
        raise SystemExit(f"{spec!r}: EngineArgs has no field {name!r}")
    else:
        kind = type(getattr(defaults, field_name))

    def parse(v: str) -> Any:
        if kind is bool:
            return bool(int(v))
        if kind is type(None):
            return int(v) if v.lstrip("-").isdigit() else v
        return kind(v)

    return name, [parse(v) for v in values.split(",")]


def engine_overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """``{FIELD or kernel_launch.NAME: value}`` -> EngineArgs keyword arguments."""
    kwargs: dict[str, Any] = {}
    for name, value in settings.items():
        field_name, _, launch = name.partition(".")
        if launch:
            kwargs.setdefault(field_name, {})[launch] = value
        else:
            kwargs[field_name] = value
    return kwargs


class _CudaRandn:
    """Stands in for ``torch`` inside ``engine.testing.tiny`` while it writes a checkpoint:
    ``randn`` draws on the GPU (the CPU generator is single-threaded: minutes for 8B)."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def randn(self, *size: Any, generator: Any = None, **kwargs: Any) -> torch.Tensor:
        del generator  # one CUDA generator for everything
        if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
            size = tuple(size[0])
        return torch.randn(size, generator=self._gen, device=self._device, **kwargs).cpu()


@contextlib.contextmanager
def gpu_random(seed: int) -> Iterator[None]:
    saved = tiny.torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny.torch = _CudaRandn(dev, seed)  # type: ignore[assignment]
    try:
        yield
    finally:
        tiny.torch = saved


def make_checkpoint(workdir: Path, shape: str, num_adapters: int, rank: int) -> Path:
    """A random bf16 checkpoint with ``num_adapters`` rank-``rank`` adapters on all modules
    (under ``adapters/lora<i>``); reused when already written."""
    from transformers import AutoConfig

    out = workdir / shape
    done = out / ".complete"
    if not done.exists():
        t0 = time.perf_counter()
        with gpu_random(0):
            tiny.make_random_model(out, shape=shape, num_adapters=0, dtype=torch.bfloat16)
        log.info("wrote %s in %.1f s", out, time.perf_counter() - t0)
        done.write_text("ok\n")
    cfg = AutoConfig.from_pretrained(out, local_files_only=True)
    spec = tiny.AdapterSpec(r=rank, lora_alpha=2.0 * rank, target_modules=tiny.LORA_MODULES)
    t0 = time.perf_counter()
    with gpu_random(1):
        for i in range(num_adapters):
            path = out / "adapters" / f"r{rank}-{i}"
            if not (path / "adapter_config.json").exists():
                tiny.write_adapter(path, cfg, spec, seed=i, dtype=torch.bfloat16)
    log.info("adapters ready in %.1f s", time.perf_counter() - t0)
    return out


def adapter_paths(model_dir: Path, rank: int, n: int) -> list[Path]:
    return [model_dir / "adapters" / f"r{rank}-{i}" for i in range(n)]


def make_prompts(n: int, length: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``n`` random prompts of ``length`` tokens, the first ``shared`` of them the same."""
    rng = random.Random(seed)
    start = [rng.randrange(*PROMPT_VOCAB) for _ in range(min(shared, length))]
    return [
        start + [rng.randrange(*PROMPT_VOCAB) for _ in range(length - len(start))] for _ in range(n)
    ]


def assign_adapters(pattern: str, n: int, num_adapters: int, seed: int) -> list[int]:
    """Adapter index (0-based) of each of ``n`` requests under a Punica pattern."""
    rng = random.Random(seed)
    if pattern == "distinct":
        return [i % num_adapters for i in range(n)]
    if pattern == "uniform":
        return [rng.randrange(num_adapters) for _ in range(n)]
    if pattern == "skewed":
        weights = [1.0 / (k + 1) ** ZIPF_ALPHA for k in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=n)
    if pattern == "identical":
        return [0] * n
    raise ValueError(f"pattern={pattern!r} is invalid: allowed {', '.join(PATTERNS)}")


def make_llm(
    model_dir: Path, args: argparse.Namespace, max_loras: int | None, *, mp: bool = False
) -> LLM:
    kwargs: dict[str, Any] = {
        "dtype": "bfloat16",
        "device": args.device,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.input_len + max_output_len(args),
        "max_num_batched_tokens": max(args.max_num_batched_tokens, args.max_num_seqs),
        "enforce_eager": args.enforce_eager,
        # Other scripts build their own namespaces (gpu_decode_step.py): engine defaults.
        "max_cudagraph_capture_size": getattr(args, "max_cudagraph_capture_size", None),
        "enable_prefix_caching": getattr(args, "enable_prefix_caching", True),
        "max_num_mixed_prefill_tokens": getattr(args, "max_num_mixed_prefill_tokens", None),
        "gpu_memory_utilization": 0.85,
        "seed": args.seed,
    }
    # --set: EngineArgs fields for every engine (other scripts' namespaces have none).
    kwargs.update(getattr(args, "engine_overrides", {}))
    if max_loras is not None:
        kwargs.update(
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max(args.rank, 8),
            max_cpu_loras=max(args.num_adapters, max_loras),
        )
    return LLM(str(model_dir), enable_multiprocessing=mp, **kwargs)


def close_llm(llm: LLM) -> None:
    """Stop the adapter loader (or the core process); the caller drops its reference, then
    ``free_memory()``."""
    if llm.llm_engine.is_multiprocess:
        llm.shutdown()
        return
    manager = llm.llm_engine.runner.lora_manager
    if manager is not None:
        manager.close()


def free_memory() -> None:
    gc.collect()
    sync()
    torch.cuda.empty_cache()


def sampling_params(args: argparse.Namespace, max_tokens: int) -> SamplingParams:
    """Every lorastream request's: ``max_tokens`` exactly (``ignore_eos``), greedy unless
    ``--temperature`` says otherwise (other scripts' namespaces may lack it: greedy)."""
    temperature = getattr(args, "temperature", 0.0)
    return SamplingParams(
        temperature=temperature,
        top_p=getattr(args, "top_p", 1.0) if temperature > 0 else 1.0,
        max_tokens=max_tokens,
        ignore_eos=True,
    )


def output_lens(args: argparse.Namespace, n: int) -> list[int]:
    """Each request's output length: ``--output-len``, or drawn from ``--output-len-range``
    (the same draw in every run, so base and adapters get the same workload)."""
    if args.output_len_range is None:
        return [args.output_len] * n
    lo, hi = parse_range(args.output_len_range)
    rng = random.Random(args.seed + 1)
    return [rng.randint(lo, hi) for _ in range(n)]


def parse_range(spec: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--output-len-range {spec!r}: expected LO,HI") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"--output-len-range {spec!r}: needs 1 <= LO <= HI")
    return lo, hi


def max_output_len(args: argparse.Namespace) -> int:
    spec = getattr(args, "output_len_range", None)  # absent in other scripts' namespaces
    return parse_range(spec)[1] if spec else args.output_len


def request_params(args: argparse.Namespace, n: int) -> list[SamplingParams]:
    return [sampling_params(args, k) for k in output_lens(args, n)]


def warm_up(
    llm: LLM,
    loras: list[LoRARequest],
    args: argparse.Namespace,
    n: int,
    adapters: list[int] | None = None,
    *,
    add: bool = True,
) -> None:
    """Adapters read from disk and every kernel compiled at the workload's shapes (prefill
    chunks, decode batches) before any timing: ``n`` prompts, 3 output tokens each, on
    ``adapters`` (default: request i on adapter i mod N). The LoRA kernels compile a variant
    per launch shape class (tile height, split-K), and the pattern decides those, so each
    pattern is warmed with its own assignment. ``add=False``: the adapters are loaded."""
    for lora in loras if add else []:
        llm.llm_engine.add_lora(lora)
    prompts = make_prompts(n, args.input_len, seed=12345)
    params = sampling_params(args, 3)
    if adapters is None and loras:
        adapters = [i % len(loras) for i in range(n)]
    reqs = [loras[a] for a in adapters[:n]] if adapters is not None and loras else None
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, reqs)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def time_cuda(fn: Callable[[], Any], iters: int = 20) -> float:
    """Median seconds of ``fn`` on the GPU (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def versions() -> dict[str, str]:
    import transformers
    import triton

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with contextlib.suppress(ImportError):
        import peft

        out["peft"] = peft.__version__
    return out

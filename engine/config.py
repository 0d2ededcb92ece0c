"""Engine configuration.

``EngineArgs`` is the flat, user-facing layer with vLLM's field names, defaults and CLI
flags; every bad value raises ``ValueError`` at construction naming the field, the value
and what is allowed. ``EngineArgs.create_engine_config()`` resolves it (reads the model's
config.json, picks device and dtype) into a frozen ``EngineConfig`` that the engine reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a dtype or device is resolved, so that
    import torch  # `lorastream serve --help` answers without loading it

MIXED_GRAPH_TOKENS = 1024
"""Default ``max_cudagraph_capture_size``. An eager step costs the host about the same
whatever its size (the kernel launches), and at a few hundred tokens that cost is a
multiple of the step's GPU time as a graph (docs/benchmark-log.md). A step's GPU time grows
with its tokens and, past about a thousand, covers those launches (an estimate from the
matrix products' rate)."""

MIXED_PREFILL_TOKENS = 512
"""Default ``max_num_mixed_prefill_tokens``. At llama-3.1-8b's prefill rate
(docs/benchmark-log.md, issue 20) 512 prompt tokens keep a step with prompts within about
2.5 decode steps of 256 sequences, inside the inter-token target (p99 at most 4 x p50),
where a full 8,192-token budget held every running decode for some 25 decode steps. 512
tokens with 256 decodes (768) also fit the default ``max_cudagraph_capture_size`` (1024),
so such steps replay a graph. An estimate, not a measurement: the GPU benchmark tunes it."""

KERNEL_BACKENDS = ("auto", "triton", "torch")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HAS_TRITON = importlib.util.find_spec("triton") is not None

BENCHMARK_FIELDS = frozenset(
    {
        "kernel_exact_silu",
        "lora_fused_silu",
        "lora_fused_silu_min_block_m",
        "lora_fused_silu_stacked",
        "lora_delta_into_gemm",
        "lora_fused_qkv_rope",
        "lora_stack_a_max",
        "lora_stack_a_max_bytes",
        "kernel_launch",
    }
)
"""EngineArgs fields that benchmarks compare and users leave alone: no CLI flags."""

_DTYPES = {  # the names EngineArgs accepts -> torch's
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float": "float32",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of ``_DTYPES``'s names."""
    import torch

    dtype: torch.dtype = getattr(torch, _DTYPES[name])
    return dtype


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str

    @classmethod
    def parse(cls, spec: str | LoRAModulePath) -> LoRAModulePath:
        if isinstance(spec, LoRAModulePath):
            return spec
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules entry {spec!r} is invalid: expected name=path")
        return cls(name.strip(), path.strip())


@dataclass
class EngineArgs:
    """Arguments for ``LLMEngine`` with vLLM's names. One docstring per field."""

    model: str
    """The checkpoint: a Hugging Face directory (config.json, *.safetensors, tokenizer files), a
    GGUF file or a directory holding one (weights dequantized to dtype; config, tokenizer and
    chat template from its metadata), or a Hugging Face Hub repo id (org/name, or
    org/name/FILE.gguf for one file of a repo) downloaded into the Hub cache."""
    tokenizer: str | None = None
    """Tokenizer: a directory, a GGUF file or a Hub repo id; defaults to ``model``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a model given as a repo id; default: main."""
    download_dir: str | None = None
    """Hub cache directory for models given as a repo id; default: huggingface_hub's
    (HF_HUB_CACHE, or HF_HOME/hub)."""
    dtype: str = "auto"
    """Weights and activations: auto (the checkpoint's torch_dtype; float32 on CPU for float16) | float16 | bfloat16 | float32."""
    device: str = "auto"
    """auto (cuda when available) | cuda | cpu."""
    seed: int = 0
    """Seed for requests that do not bring their own."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the model's max_position_embeddings."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (chunked prefill splits longer prompts); default 8192 on cuda, 2048 on cpu."""
    max_num_seqs: int = 256
    """Most sequences running at once."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of device memory the engine may use (weights, activations, KV cache)."""
    num_gpu_blocks_override: int | None = None
    """Exact number of KV-cache blocks, ignoring gpu_memory_utilization (tests use it to force preemption)."""
    kv_cache_space_gb: float = 4.0
    """KV-cache size on cpu, in GiB (on cuda gpu_memory_utilization decides)."""
    enforce_eager: bool = False
    """Never capture CUDA graphs."""
    max_cudagraph_capture_size: int | None = None
    """Largest step, in tokens, that mixes prompts with decodes and still replays a CUDA graph (vLLM's compilation_config.max_cudagraph_capture_size); larger mixed steps run eagerly. Default 1024; capped at max_num_batched_tokens; 0 captures graphs for decode-only steps alone, which get one for every batch size up to max_num_seqs either way."""
    tensor_parallel_size: int = 1
    """Ranks (devices of one host) the model is split over, Megatron-style: one process per
    rank, started by the engine (NCCL on CUDA, gloo on CPU). Must divide the attention heads,
    the key/value heads (or be a multiple of them: those are then replicated) and the
    intermediate size. Default 1."""
    enable_chunked_prefill: bool = True
    """Split long prompts over steps so decodes keep flowing."""
    max_num_mixed_prefill_tokens: int | None = None
    """Most prompt tokens (prefill chunks and recomputation) in a step that also runs decodes
    (Sarathi-Serve's stall-free batching): a step's time, and so every running request's
    inter-token latency, stays bounded while prompts are admitted. Lower: steadier
    inter-token latency, later first tokens under load; higher: the reverse. Steps without
    decodes take prompts up to max_num_batched_tokens, the hard cap either way. Default 512
    (capped at max_num_batched_tokens; a value of max_num_batched_tokens or more turns the cap
    off). Needs chunked prefill."""
    enable_prefix_caching: bool = True
    """On by default: reuse the KV cache of full blocks (block_size tokens) across requests
    whose tokens agree from the start and that use the same adapter (never across adapters,
    nor between an adapter and the base model); cached blocks no request holds are evicted
    least recently used first when fresh blocks are needed. --no-enable-prefix-caching turns
    it off."""
    async_scheduling: bool = True
    """Schedule and launch each step before the previous one's tokens reach the host, so host
    work overlaps the GPU; a request may compute one token past its stop, which is dropped.
    --no-async-scheduling turns it off."""
    enable_lora: bool = False
    """Serve LoRA adapters."""
    max_loras: int = 1
    """Most distinct adapters in one step (device slots)."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted."""
    max_cpu_loras: int | None = None
    """Adapters kept in host memory (LRU); defaults to max_loras, or to the number of
    lora_modules when more are preloaded; must not be smaller than either."""
    lora_dtype: str | torch.dtype = "auto"
    """auto (= model dtype) | float16 | bfloat16 | float32 | a torch.dtype."""
    fully_sharded_loras: bool = False
    """With tensor_parallel_size > 1, shard LoRA A on column-parallel layers too (S-LoRA's
    layout: an all-gather of the shrink output per layer) and B on row-parallel ones (the delta
    joins the layer's all-reduce): less adapter memory and compute per rank, more bytes moved
    (docs/architecture.md). Needs max_lora_rank divisible by tensor_parallel_size. No effect
    at tensor_parallel_size 1. Default off."""
    lora_modules: list[LoRAModulePath] = field(default_factory=list)
    """Adapters preloaded at start, as name=path."""
    lora_target_modules: list[str] | None = None
    """Restrict the modules adapters may touch; default all of q/k/v/o/gate/up/down."""
    max_lora_wait_steps: int = 64
    """Steps the oldest waiting request may be bypassed by requests of other adapters before the
    scheduler stops admitting them so its adapter gets a slot (bounded wait)."""
    disable_log_stats: bool = False
    """Do not install the default logging stat logger."""
    served_model_name: str | list[str] | None = None
    """The name(s) the model is served under (``EngineConfig.served_model_name`` is the first); defaults to model."""
    tokenizer_mode: str = "auto"
    """auto | hf: the checkpoint's fast (Rust) tokenizer; slow, mistral and custom tokenizers are refused."""
    load_format: str = "auto"
    """auto | safetensors: the formats the loader reads."""
    trust_remote_code: bool = False
    """Accepted for architectures lorastream implements (it never runs a checkpoint's own code); refused for any other."""
    quantization: str | None = None
    """Only None: weights run in dtype (float16, bfloat16 or float32)."""
    kv_cache_dtype: str = "auto"
    """Only auto: the KV cache holds the model's dtype."""
    swap_space: float = 4
    """GiB of host swap per GPU in vLLM; accepted, unused: a preempted request is recomputed, never swapped (vLLM V1 does the same)."""
    cpu_offload_gb: float = 0
    """Only 0: weights stay on the device."""
    pipeline_parallel_size: int = 1
    """Only 1 is supported."""
    kernel_backend: str = "auto"
    """Every kernel of the model (norms, RoPE, SiLU, attention, LoRA): auto (Triton on CUDA
    tensors, the pure-torch references elsewhere) | triton (Triton everywhere; on CPU only
    under TRITON_INTERPRET=1, for tests) | torch (the references, on CUDA too: debugging)."""
    kernel_exact_silu: bool = False
    """SiLU with torch's own expf and IEEE division (as torch's CUDA kernel computes it)
    instead of the hardware's approximate exp and division, a few float32 ulps apart; the
    exact form made the fused LoRA expand + SiLU bound by its instructions. A benchmark
    setting (EngineArgs only, no CLI flag)."""
    lora_fused_silu: bool = True
    """gate_up's LoRA expand and the SiLU in one kernel; False runs them apart. A benchmark
    setting (EngineArgs only)."""
    lora_fused_silu_min_block_m: int = 32
    """Without the stacked product, the fused expand + SiLU runs for LoRA tiles at least this
    tall (prefill tiles): on decode tiles the two kernels were faster in the engine's graph
    step. A benchmark setting (EngineArgs only)."""
    lora_fused_silu_stacked: bool = True
    """With the stacked product, gate_up's expand and the SiLU run as one kernel at any tile
    height. A benchmark setting (EngineArgs only)."""
    lora_delta_into_gemm: bool = True
    """On the kernel path, the expand writes each token's delta and the base GEMM
    accumulates onto it; False adds the delta to the GEMM's output in place. Layers with a
    bias always take the second way. A benchmark setting (EngineArgs only)."""
    lora_fused_qkv_rope: bool = True
    """With the stacked product, the q/k/v layer's expand, RoPE and the KV-cache write run
    as one kernel instead of three. A benchmark setting (EngineArgs only)."""
    lora_stack_a_max: int = 256 * 2048
    """Steps of T tokens whose T x (rows of A over all slots) is at most this run the LoRA
    shrink inside the base GEMM over A stored under W, then one expand; larger ones (prefill)
    launch the shrink kernel, which reads each adapter's A once per tile instead of
    multiplying every token by every slot's A. 0 turns the stacked product off. A benchmark
    setting (EngineArgs only)."""
    lora_stack_a_max_bytes: int = 16 * 2**20
    """...and only in layers whose A of all slots takes at most this many bytes: the stacked
    GEMM reads every slot's A up to max_lora_rank whether or not the step uses it, the shrink
    kernel only the step's adapters at their ranks (reading 16 MiB takes about as long as a
    shrink launch's fixed cost). A benchmark setting (EngineArgs only)."""
    kernel_launch: dict[str, int] | None = None
    """Triton launch settings over the device's table (engine/kernels/configs/<GPU
    name>.json, else LaunchConfig's defaults), by LaunchConfig field name, e.g.
    {"attention_decode_num_warps": 4}. A benchmark setting (EngineArgs only)."""

    def __post_init__(self) -> None:
        self.lora_modules = [LoRAModulePath.parse(m) for m in (self.lora_modules or [])]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self._validate()

    # Validation lives here, in one place.
    def _validate(self) -> None:
        import torch

        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"EngineArgs.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.model, str | os.PathLike) or not str(self.model):
            bad("model", "must be a checkpoint directory, a GGUF file or a Hub repo id")
        if self.dtype not in ("auto", *_DTYPES):
            bad("dtype", f"allowed: auto, {', '.join(_DTYPES)}")
        if self.device not in ("auto", "cuda", "cpu") and not str(self.device).startswith("cuda:"):
            bad("device", "allowed: auto, cuda, cuda:N, cpu")
        if not _is_int(self.seed):
            bad("seed", "must be an integer")
        if self.max_model_len is not None and (
            not _is_int(self.max_model_len) or self.max_model_len < 1
        ):
            bad("max_model_len", "must be an integer >= 1 or None")
        if self.max_num_batched_tokens is not None and (
            not _is_int(self.max_num_batched_tokens) or self.max_num_batched_tokens < 1
        ):
            bad("max_num_batched_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.max_num_seqs) or self.max_num_seqs < 1:
            bad("max_num_seqs", "must be an integer >= 1")
        if self.max_cudagraph_capture_size is not None and (
            not _is_int(self.max_cudagraph_capture_size) or self.max_cudagraph_capture_size < 0
        ):
            bad("max_cudagraph_capture_size", "must be an integer >= 0 or None")
        if (
            self.max_num_batched_tokens is not None
            and self.max_num_batched_tokens < self.max_num_seqs
        ):
            # Every running sequence must be able to decode one token per step.
            bad("max_num_batched_tokens", f"must be >= max_num_seqs ({self.max_num_seqs})")
        if self.block_size not in (1, 8, 16, 32, 64, 128):
            bad("block_size", "allowed: 1, 8, 16, 32, 64, 128")
        if (
            not isinstance(self.gpu_memory_utilization, int | float)
            or not 0 < self.gpu_memory_utilization <= 1
        ):
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.num_gpu_blocks_override is not None and (
            not _is_int(self.num_gpu_blocks_override) or self.num_gpu_blocks_override < 1
        ):
            bad("num_gpu_blocks_override", "must be an integer >= 1 or None")
        if not isinstance(self.kv_cache_space_gb, int | float) or self.kv_cache_space_gb <= 0:
            bad("kv_cache_space_gb", "must be > 0")
        if not _is_int(self.tensor_parallel_size) or not 1 <= self.tensor_parallel_size <= 64:
            bad("tensor_parallel_size", "must be an integer from 1 to 64")
        if self.pipeline_parallel_size != 1:
            bad("pipeline_parallel_size", "allowed: 1 (pipeline parallelism is not supported)")
        if self.quantization is not None:
            bad(
                "quantization",
                "lorastream runs unquantized weights only: leave it unset and pick dtype "
                "(float16, bfloat16 or float32)",
            )
        if self.kv_cache_dtype != "auto":
            bad("kv_cache_dtype", "allowed: auto (the KV cache holds the model's dtype; no fp8)")
        if self.cpu_offload_gb not in (0, 0.0) or isinstance(self.cpu_offload_gb, bool):
            bad("cpu_offload_gb", "allowed: 0 (weights are not offloaded to host memory)")
        if not isinstance(self.swap_space, int | float) or self.swap_space < 0:
            bad("swap_space", "must be a number >= 0 (accepted, unused: preemption recomputes)")
        if self.tokenizer_mode not in ("auto", "hf"):
            bad(
                "tokenizer_mode",
                "allowed: auto, hf (the checkpoint's fast tokenizer; slow, mistral and custom "
                "tokenizers are not supported)",
            )
        if self.load_format not in ("auto", "safetensors", "gguf"):
            bad("load_format", "allowed: auto, safetensors, gguf (the formats lorastream reads)")
        if not isinstance(self.trust_remote_code, bool):
            bad("trust_remote_code", "must be true or false")
        names = self.served_model_name
        if isinstance(names, str):
            names = [names]
        if names is not None and (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            bad("served_model_name", "must be a non-empty name, a list of them, or None")
        if not _is_int(self.max_loras) or self.max_loras < 1:
            bad("max_loras", "must be an integer >= 1")
        if self.max_lora_rank not in LORA_RANKS:
            bad("max_lora_rank", f"allowed: {', '.join(map(str, LORA_RANKS))}")
        if self.max_cpu_loras is not None:
            if not _is_int(self.max_cpu_loras):
                bad("max_cpu_loras", "must be an integer or None")
            if self.max_cpu_loras < self.max_loras:
                bad("max_cpu_loras", f"must be >= max_loras ({self.max_loras})")
            if self.max_cpu_loras < len(self.lora_modules):
                # Host memory holds every preloaded adapter; fewer entries would evict some
                # of them while the others load.
                bad(
                    "max_cpu_loras",
                    f"must be >= the number of lora_modules ({len(self.lora_modules)}), "
                    "which are all loaded into host memory at start",
                )
        if not isinstance(self.lora_dtype, torch.dtype) and self.lora_dtype not in (
            "auto",
            *_DTYPES,
        ):
            bad("lora_dtype", f"allowed: auto, {', '.join(_DTYPES)} or a torch.dtype")
        if isinstance(self.lora_dtype, torch.dtype) and self.lora_dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
        ):
            bad("lora_dtype", "allowed torch dtypes: float16, bfloat16, float32")
        if self.lora_target_modules is not None:
            unknown = [m for m in self.lora_target_modules if m not in LORA_TARGET_MODULES]
            if unknown or not self.lora_target_modules:
                bad("lora_target_modules", f"allowed: {', '.join(LORA_TARGET_MODULES)}")
        if self.max_num_mixed_prefill_tokens is not None and (
            not _is_int(self.max_num_mixed_prefill_tokens) or self.max_num_mixed_prefill_tokens < 1
        ):
            bad("max_num_mixed_prefill_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.max_lora_wait_steps) or self.max_lora_wait_steps < 0:
            bad("max_lora_wait_steps", "must be an integer >= 0")
        if self.kernel_backend not in KERNEL_BACKENDS:
            bad("kernel_backend", f"allowed: {', '.join(KERNEL_BACKENDS)}")
        for name in (
            "kernel_exact_silu",
            "lora_fused_silu",
            "lora_fused_silu_stacked",
            "lora_delta_into_gemm",
            "lora_fused_qkv_rope",
        ):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        for name in ("lora_fused_silu_min_block_m", "lora_stack_a_max", "lora_stack_a_max_bytes"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        launch_fields = {f.name for f in dataclasses.fields(LaunchConfig)}
        if self.kernel_launch is not None and (
            not isinstance(self.kernel_launch, dict)
            or not set(self.kernel_launch) <= launch_fields
            or not all(_is_int(v) and v >= 1 for v in self.kernel_launch.values())
        ):
            bad(
                "kernel_launch",
                f"must map LaunchConfig fields ({', '.join(sorted(launch_fields))}) to "
                "integers >= 1, or be None",
            )
        if self.lora_modules and not self.enable_lora:
            bad("lora_modules", "needs enable_lora=True")
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names):
            bad("lora_modules", "adapter names must be unique")

    # ----- CLI -----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add vLLM-named flags (--enable-lora, --max-loras, ...) to ``parser``."""
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(EngineArgs):
            flag = "--" + f.name.replace("_", "-")
            # The field's own default: building an EngineArgs would validate, and load torch.
            default = None if f.default is dataclasses.MISSING else f.default
            doc = _FIELD_DOCS.get(f.name, "")
            if f.name in BENCHMARK_FIELDS:
                continue  # EngineArgs only: benchmarks set them (benchmarks/bench.py --set)
            if f.name == "model":
                # Checked in from_cli_args, so a script's parser.set_defaults(model=...) works.
                group.add_argument(flag, default=None, help=doc + " (required)")
            elif f.name == "served_model_name":
                group.add_argument(flag, nargs="+", default=None, metavar="NAME", help=doc)
            elif isinstance(default, bool):
                action = argparse.BooleanOptionalAction if default else "store_true"
                group.add_argument(flag, action=action, default=default, help=doc)
            elif f.name == "lora_modules":
                group.add_argument(flag, nargs="+", default=[], metavar="NAME=PATH", help=doc)
            elif f.name == "kernel_backend":
                group.add_argument(flag, default=default, choices=KERNEL_BACKENDS, help=doc)
            elif f.name == "lora_target_modules":
                group.add_argument(
                    flag, nargs="+", default=None, choices=LORA_TARGET_MODULES, help=doc
                )
            else:
                group.add_argument(flag, type=_cli_type(f.name), default=default, help=doc)
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        if getattr(ns, "model", None) is None:
            raise ValueError("EngineArgs.model is missing: pass --model (a checkpoint directory)")
        kwargs = {
            f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)
        }
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        import torch

        device = _resolve_device(self.device)
        model = resolve_checkpoint("model", str(self.model), self.revision, self.download_dir)
        tokenizer = (
            resolve_checkpoint("tokenizer", str(self.tokenizer), self.revision, self.download_dir)
            if self.tokenizer
            else model
        )
        hf_config = _load_hf_config(model)
        if self.trust_remote_code:
            from engine.model.llama import SUPPORTED_ARCHITECTURES

            archs = list(getattr(hf_config, "architectures", None) or [])
            if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
                raise ValueError(
                    f"EngineArgs.trust_remote_code=True is invalid for {self.model!r} "
                    f"(architectures {archs}): lorastream never runs a checkpoint's own code; "
                    f"it implements {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        served = self.served_model_name
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        lora_dtype = (
            dtype
            if self.lora_dtype == "auto"
            else (
                self.lora_dtype
                if isinstance(self.lora_dtype, torch.dtype)
                else torch_dtype(self.lora_dtype)
            )
        )
        model_len_cap = int(getattr(hf_config, "max_position_embeddings", 2048))
        max_model_len = self.max_model_len or model_len_cap
        if max_model_len > model_len_cap:
            raise ValueError(
                f"EngineArgs.max_model_len={max_model_len} is invalid: the model supports at most {model_len_cap}"
            )
        self._check_parallel(hf_config, device)
        budget = self.max_num_batched_tokens or (8192 if device.type == "cuda" else 2048)
        if not self.enable_chunked_prefill and budget < max_model_len:
            budget = max_model_len
        return EngineConfig(
            model=model,
            tokenizer=tokenizer,
            hf_config=hf_config,
            dtype=dtype,
            device=device,
            seed=self.seed,
            max_model_len=max_model_len,
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_blocks_override=self.num_gpu_blocks_override,
                cpu_space_bytes=int(self.kv_cache_space_gb * (1 << 30)),
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=budget,
                max_model_len=max_model_len,
                max_loras=self.max_loras if self.enable_lora else 0,
                max_lora_wait_steps=self.max_lora_wait_steps,
                enable_chunked_prefill=self.enable_chunked_prefill,
                async_scheduling=self.async_scheduling,
                max_num_mixed_prefill_tokens=min(
                    budget, self.max_num_mixed_prefill_tokens or MIXED_PREFILL_TOKENS
                ),
            ),
            lora=LoRAConfig(
                max_loras=self.max_loras,
                max_lora_rank=self.max_lora_rank,
                max_cpu_loras=self.max_cpu_loras or max(self.max_loras, len(self.lora_modules)),
                lora_dtype=lora_dtype,
                fully_sharded_loras=self.fully_sharded_loras,
                target_modules=tuple(self.lora_target_modules or LORA_TARGET_MODULES),
                preload=tuple(self.lora_modules),
            )
            if self.enable_lora
            else None,
            kernel=self.kernel_config(),
            enforce_eager=self.enforce_eager,
            max_cudagraph_capture_size=min(
                budget,
                MIXED_GRAPH_TOKENS
                if self.max_cudagraph_capture_size is None
                else self.max_cudagraph_capture_size,
            ),
            log_stats=not self.disable_log_stats,
            served_model_name=(served if isinstance(served, str) else served[0])
            if served
            else str(self.model),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
        )

    def _check_parallel(self, hf_config: Any, device: torch.device) -> None:
        """What ``tensor_parallel_size`` needs of the model and the machine."""
        n = self.tensor_parallel_size
        if n == 1:
            return
        import torch

        from engine.model.parallel import check_tensor_parallel

        check_tensor_parallel(hf_config, n)
        if self.enable_lora and self.fully_sharded_loras and self.max_lora_rank % n:
            raise ValueError(
                f"EngineArgs.max_lora_rank={self.max_lora_rank} is invalid with "
                f"fully_sharded_loras: it must be a multiple of tensor_parallel_size={n}"
            )
        if device.type == "cuda":
            first = device.index or 0
            if first + n > torch.cuda.device_count():
                raise ValueError(
                    f"EngineArgs.tensor_parallel_size={n} is invalid here: it needs devices "
                    f"cuda:{first}..cuda:{first + n - 1}, and {torch.cuda.device_count()} "
                    "are visible"
                )

    def kernel_config(self) -> KernelConfig:
        """The kernel settings of these arguments (no device needed: launch settings are
        looked up where the kernels run, ``KernelConfig.launch_for``)."""
        return KernelConfig(
            backend=self.kernel_backend,
            exact_silu=self.kernel_exact_silu,
            lora_fused_silu=self.lora_fused_silu,
            lora_fused_silu_min_block_m=self.lora_fused_silu_min_block_m,
            lora_fused_silu_stacked=self.lora_fused_silu_stacked,
            lora_delta_into_gemm=self.lora_delta_into_gemm,
            lora_fused_qkv_rope=self.lora_fused_qkv_rope,
            lora_stack_a_max=self.lora_stack_a_max,
            lora_stack_a_max_bytes=self.lora_stack_a_max_bytes,
            launch_overrides=tuple(sorted((self.kernel_launch or {}).items())),
        )


class AsyncEngineArgs(EngineArgs):
    """vLLM's name for the arguments of ``AsyncLLMEngine``: the same as ``EngineArgs``."""


class FlexibleArgumentParser(argparse.ArgumentParser):
    """vLLM's parser: ``--max_loras`` and ``--max-loras`` name the same flag (underscores in
    a flag's name become dashes; values are left alone)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args([_dashed(a) for a in argv], namespace)


def _dashed(arg: str) -> str:
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    num_blocks_override: int | None
    cpu_space_bytes: int
    enable_prefix_caching: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_loras: int
    """0 when LoRA is off."""
    max_lora_wait_steps: int = 64
    enable_chunked_prefill: bool = True
    async_scheduling: bool = False
    max_num_mixed_prefill_tokens: int | None = None
    """Most prompt tokens in a step that also runs decodes (with chunked prefill); None: no
    cap below max_num_batched_tokens."""


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    lora_dtype: torch.dtype
    fully_sharded_loras: bool = False
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    preload: tuple[LoRAModulePath, ...] = ()


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks the model is split over (``EngineArgs.tensor_parallel_size``)."""


@dataclass(frozen=True)
class LaunchConfig:
    """Triton launch settings that were tuned on a GPU. The defaults are the ones measured
    on an H200 with llama-3.1-8b (docs/benchmark-log.md); a device whose table
    (``engine/kernels/configs/<GPU name>.json``) exists takes its values instead, and
    ``EngineArgs.kernel_launch`` overrides either. Every field is an integer >= 1."""

    attention_decode_block_n: int = 64
    """Context tokens a decode attention program reads per tile."""
    attention_decode_num_warps: int = 2
    attention_decode_num_stages: int = 2
    lora_shrink_num_warps: int = 4
    lora_shrink_num_stages: int = 3
    lora_shrink_programs_per_sm: int = 3
    """Programs per SM the shrink's split of K aims for (decode steps have few tiles)."""
    lora_expand_decode_block_n: int = 512
    """Output columns an expand program writes on decode tiles (16 tall)."""
    lora_expand_decode_num_warps: int = 8
    """Warps of the expand on decode tiles, and of the fused q/k/v expand + RoPE."""
    lora_silu_decode_block_n: int = 128
    """Columns of gate (and of up) a fused expand + SiLU program covers on decode tiles."""
    lora_silu_decode_num_warps: int = 4


KERNEL_CONFIGS_DIR = Path(__file__).parent / "kernels" / "configs"


@functools.cache
def launch_table(device_name: str) -> LaunchConfig:
    """The tuned launch settings of a GPU by its name (``torch.cuda.get_device_name``):
    ``engine/kernels/configs/<name, spaces as underscores>.json``, else the defaults."""
    path = KERNEL_CONFIGS_DIR / (device_name.replace(" ", "_") + ".json")
    if not path.is_file():
        return LaunchConfig()
    data = json.loads(path.read_text())
    return LaunchConfig(**{k: v for k, v in data.items() if not k.startswith("_")})


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels run and how they are launched (``EngineArgs``' kernel fields resolved).
    Part of ``EngineConfig``, so it reaches the engine-core process with the rest."""

    backend: str = "auto"
    """auto | triton | torch (``EngineArgs.kernel_backend``)."""
    exact_silu: bool = False
    lora_fused_silu: bool = True
    lora_fused_silu_min_block_m: int = 32
    lora_fused_silu_stacked: bool = True
    lora_delta_into_gemm: bool = True
    lora_fused_qkv_rope: bool = True
    lora_stack_a_max: int = 256 * 2048
    lora_stack_a_max_bytes: int = 16 * 2**20
    launch_overrides: tuple[tuple[str, int], ...] = ()
    """``EngineArgs.kernel_launch`` as sorted (field, value) pairs."""

    def use_triton(self, device: torch.device) -> bool:
        """Whether kernels on ``device`` run Triton (else the torch references)."""
        if self.backend == "auto":
            return device.type == "cuda" and HAS_TRITON
        return self.backend == "triton"

    def launch_for(self, device: torch.device | str | None) -> LaunchConfig:
        """The launch settings on ``device``: its GPU's table, then the overrides. Asks CUDA
        for the GPU's name, so call it where the kernels run (the engine-core process)."""
        import torch

        device = torch.device(device or "cpu")
        if device.type == "cuda":
            base = launch_table(torch.cuda.get_device_name(device))
        else:
            base = LaunchConfig()
        return dataclasses.replace(base, **dict(self.launch_overrides))


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """A local checkpoint directory or GGUF file (``EngineArgs.model`` resolved)."""
    tokenizer: str
    hf_config: Any
    dtype: torch.dtype
    device: torch.device
    seed: int
    max_model_len: int
    cache: CacheConfig
    scheduler: SchedulerConfig
    lora: LoRAConfig | None
    enforce_eager: bool
    log_stats: bool
    kernel: KernelConfig = field(default_factory=KernelConfig)
    """Kernel choices and launch settings (``EngineArgs.kernel_backend`` and the rest)."""
    max_cudagraph_capture_size: int = 0
    """Largest mixed prefill + decode step (tokens) with a CUDA graph; 0: none."""
    served_model_name: str = ""
    """The model's name for clients (``EngineArgs.served_model_name``, else ``model``)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def resolve_checkpoint(name: str, spec: str, revision: str | None, download_dir: str | None) -> str:
    """The local path of a checkpoint: ``spec`` itself when it exists here (a directory's only
    GGUF file when it holds one and no config.json), else a Hugging Face Hub download into its
    cache (``org/name``: the checkpoint's safetensors, configs and tokenizer files;
    ``org/name/FILE.gguf``: that file)."""
    from engine.model.gguf import find_gguf

    path = Path(spec).expanduser()
    if path.exists():
        gguf = find_gguf(path)
        if gguf is not None:
            return str(gguf)
        if not path.is_dir():
            raise ValueError(
                f"EngineArgs.{name}={spec!r} is invalid: a file, but not a .gguf checkpoint"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"EngineArgs.{name}={spec!r} is invalid: the directory has no config.json "
                "(a Hugging Face checkpoint) and no .gguf file"
            )
        return str(path)
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts) or spec.startswith(("/", ".", "~")):
        raise ValueError(
            f"EngineArgs.{name}={spec!r} is invalid: no such file or directory, and not a "
            "Hugging Face Hub repo id (org/name or org/name/FILE.gguf)"
        )
    return _download(name, spec, revision, download_dir)


# What a Hub download of a safetensors checkpoint fetches: not the repo's other formats.
_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
]


def _download(name: str, spec: str, revision: str | None, download_dir: str | None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, filename = spec.rpartition("/") if spec.count("/") == 2 else (spec, "", "")
    if filename and not filename.endswith(".gguf"):
        raise ValueError(
            f"EngineArgs.{name}={spec!r} is invalid: a file of a Hub repo must be a .gguf"
        )
    try:
        if filename:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=download_dir)
        local = snapshot_download(
            repo_id, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_PATTERNS
        )
    except (OSError, ValueError, EntryNotFoundError) as e:
        # Not found, offline with nothing cached, network: OSErrors; a bad id: a ValueError.
        raise ValueError(
            f"EngineArgs.{name}={spec!r}: not a local path, and the Hugging Face Hub download "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return resolve_checkpoint(name, str(local), None, None)


def _load_hf_config(path: str) -> Any:
    if path.endswith(".gguf"):
        from engine.model.gguf import gguf_config

        return gguf_config(path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"EngineArgs.device={device!r} is invalid: CUDA is not available here")
    return torch.device(device)


def _resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    import torch

    if dtype != "auto":
        return torch_dtype(dtype)
    cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = torch_dtype(cfg) if cfg in _DTYPES else torch.float32
    if not isinstance(cfg, torch.dtype) or cfg not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        cfg = torch.float32
    if device.type == "cpu" and cfg == torch.float16:
        return torch.float32  # float16 matmuls are slow and lossy on CPU
    return cfg


def _cli_type(name: str) -> Any:
    if name in (
        "max_model_len",
        "max_num_batched_tokens",
        "num_gpu_blocks_override",
        "max_cpu_loras",
        "max_cudagraph_capture_size",
        "max_num_mixed_prefill_tokens",
    ):
        return int
    if name in ("gpu_memory_utilization", "kv_cache_space_gb", "swap_space", "cpu_offload_gb"):
        return float
    if name in (
        "max_num_seqs",
        "block_size",
        "tensor_parallel_size",
        "max_loras",
        "max_lora_rank",
        "seed",
        "max_lora_wait_steps",
        "pipeline_parallel_size",
    ):
        return int
    return str


def _field_docs() -> dict[str, str]:
    """Field docstrings, read from the source so --help shows them."""
    import ast
    import inspect

    src = inspect.getsource(EngineArgs)
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    prev: str | None = None
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            prev = node.target.id
        elif prev and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev] = " ".join(str(node.value.value).split()).replace("%", "%%")
            prev = None
    return docs


_FIELD_DOCS = _field_docs()

"""The one place where Python lists become tensors: builds a step's inputs from the
scheduler's output, runs the model, samples. Owns the model, the KV cache and the
adapter manager; holds no scheduling policy.

Inputs. A step's integer inputs (token ids, positions, KV slots, query starts, context
lengths, block tables, the rows to sample) are packed with numpy into one preallocated
(pinned, on CUDA) int64 staging buffer and reach the device in one copy; the int32 part
of the attention metadata is cast there. The per-token work is vectorized; the Python loop
runs once per sequence.

CUDA graphs. Unless ``enforce_eager``, steps replay graphs captured at start:

- decode-only steps (every sequence has one new token), in the graph of the smallest
  batch-size bucket that holds them (``graph_batch_sizes``, up to ``max_num_seqs``); the
  padding rows of a bucket run as one-token sequences;
- steps that mix prompt chunks with decodes, of up to ``max_cudagraph_capture_size`` tokens,
  in the graph of the smallest token-count bucket that holds them (``mixed_graph_sizes``).
  Those graphs always have ``max_num_seqs + 1`` sequences: the step's own, then one that
  holds the padding tokens, then empty ones. Attention finds each token's sequence on the
  device (``engine.kernels.attention_triton``), so one graph serves every split of its tokens into
  sequences. Without them, a server whose requests arrive while others decode (nearly every
  step mixes then) would launch every kernel from Python each step.

The graphs read their inputs from static device buffers: token ids, positions and KV slots,
query starts (fixed 0..B for decode graphs), context lengths and block tables. A step copies
its packed inputs into them. Padding tokens write no KV (slot -1), use no adapter (slot -1),
read block 0 and their outputs are dropped. Adapter weights sit in fixed per-slot buffers,
so a change of adapters needs no re-capture; the per-token LoRA slots go through a static
``LoRAMetadata`` (see ``_static_lora``).

Launch and wait. ``launch`` runs a step up to its sampling and returns a ``StepHandle``
without waiting for the device; ``StepHandle.wait`` brings the tokens to the host. With
async scheduling the engine launches the next step before waiting: a request whose last
token is still a ``PLACEHOLDER`` takes it from the previous handle's sampled tokens, on the
device (``pack_step``'s fills). Every copy and kernel runs on one stream, so a step never
sees buffers the next one rewrites.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.config import EngineConfig, KernelConfig, LoRAConfig
from engine.core.scheduler import PLACEHOLDER, ScheduledRequest, SchedulerOutput
from engine.kernels.dispatch import Kernels
from engine.kernels.utils import pinned
from engine.lora import LoRAMetadata, allocate_static_lora_metadata, build_lora_metadata
from engine.lora.manager import LoRAManager
from engine.lora.warmup import warm_up_lora_kernels
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import load_model
from engine.model.metadata import AttentionMetadata, ForwardBatch
from engine.outputs import SampleLogprobs
from engine.sampling.sampler import (
    SampledTokens,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    TokenLogprobs,
    pack_token_logprobs,
    unpack_token_logprobs,
)
from engine.sequence import Request

logger = logging.getLogger("lorastream.runner")


# Rows of prompt positions whose logprobs one launch computes at a time: [rows, V] float32
# logits (a 128k vocabulary makes 128 MiB of them).
_PROMPT_LOGPROBS_ROWS = 256


@dataclass
class RunnerOutput:
    """Sampled token (and logprobs) per request that sampled this step."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs]
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    """Per request with ``prompt_logprobs``: (index of the first prompt token this step
    scored, one entry per prompt token from there)."""


GrammarFill = Callable[[list[Request], bool], torch.Tensor]
"""Fills the structured-output bitmasks of constrained requests ([R, ceil(V / 32)] int32 in
host memory; pinned when the flag says the device is CUDA)."""


@dataclass
class _DeferredSample:
    """A launched step whose sampling waits for its constrained rows' last tokens."""

    logits: torch.Tensor
    num_outputs: list[int]
    """Each row's output tokens at launch (its sampler row reads these)."""
    constrained: list[int]
    previous: StepHandle | None


class _PromptLogprobs:
    """A step's prompt logprobs on their way to the host (``pack_token_logprobs`` rows)."""

    def __init__(self, packed: torch.Tensor, spans: list[tuple[str, int, int, int]]) -> None:
        self.spans = spans
        """(request id, first prompt index, count, top-n) in the rows' order."""
        self._done: torch.cuda.Event | None = None
        if packed.is_cuda:
            self._host = packed.to("cpu", non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = packed

    def result(self) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        if self._done is not None:
            self._done.synchronize()
        rows = self._host.tolist()
        out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        at = 0
        for request_id, first, count, n in self.spans:
            out[request_id] = (
                first,
                [unpack_token_logprobs(row, n) for row in rows[at : at + count]],
            )
            at += count
        return out


@dataclass
class StepTimings:
    """Host seconds spent in each part of ``execute_model``, summed over steps."""

    prepare_s: float = 0.0
    """Packing inputs, the host-to-device copy, LoRA slot mapping."""
    forward_s: float = 0.0
    """Launching the model (a graph replay or eager kernels; the GPU runs on asynchronously)."""
    sample_s: float = 0.0
    """Logits, sampling metadata and the sampling launch."""
    wait_s: float = 0.0
    """Waiting for the sampled tokens (GPU time the host work did not hide)."""
    steps: int = 0
    graph_steps: int = 0
    """Steps that replayed a graph, mixed ones included."""
    mixed_graph_steps: int = 0
    """Steps mixing prefill and decode that replayed a graph."""

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {
            "prepare_ms": 1e3 * self.prepare_s / n,
            "forward_launch_ms": 1e3 * self.forward_s / n,
            "sample_ms": 1e3 * self.sample_s / n,
            "wait_ms": 1e3 * self.wait_s / n,
        }


# ----------------------------------------------------------------------------- pure helpers


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets that get a decode graph: 1, 2, 4, 8, then every 8 up to
    ``max_num_seqs`` (which is always the last bucket)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets that get a graph for steps mixing prefill and decode: every 16
    up to 256, every 32 up to 512, every 64 beyond, and ``max_tokens`` itself (always the
    last). None below 2 tokens, the smallest step that can mix."""
    if max_tokens < 2:
        return []
    steps = itertools.chain(range(16, 257, 16), range(288, 513, 32), range(576, max_tokens, 64))
    return [*(s for s in steps if s < max_tokens), max_tokens]


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``num_seqs`` sequences (or tokens); None if none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class PackedInputs:
    """One step's integer inputs, laid out back to back in one int64 buffer.

    Layout: ``input_ids [T] | positions [T] | slot_mapping [T] | logits_rows [N] |
    query_start_loc [B + 1] | seq_lens [B] | block_tables [B, W] | fill_rows [F] |
    fill_sources [F]``; query starts, lengths and tables go to the device as int32, each
    starting at a multiple of 4 elements (gaps unused). The fills are the token rows whose
    id is a ``PLACEHOLDER`` and, for each, its row in the previous step's sampled tokens.
    Rows past ``num_real_seqs`` are padding (see the module docstring).
    """

    num_tokens: int
    num_seqs: int
    num_real_seqs: int
    num_real_tokens: int
    width: int
    """W: block-table columns of this step (the longest table)."""
    num_logits: int
    total: int
    """Elements of the buffer used."""
    max_seq_len: int
    fills_offset: int
    num_fills: int
    query_start_loc: np.ndarray = field(repr=False)
    seq_lens: np.ndarray = field(repr=False)
    token_slots_lora: np.ndarray | None = field(default=None, repr=False)
    """[T] int64 LoRA device slot per token (-1: none); None when LoRA is off."""

    @property
    def int32_offset(self) -> int:
        return 3 * self.num_tokens + self.num_logits

    @property
    def seq_lens_offset(self) -> int:
        """Of ``seq_lens`` inside the int32 part (16-byte aligned, see ``_align4``)."""
        return _align4(self.num_seqs + 1)

    @property
    def block_tables_offset(self) -> int:
        return self.seq_lens_offset + _align4(self.num_seqs)


def _align4(n: int) -> int:
    # int32 views handed to Triton start on 16-byte boundaries whatever the batch size:
    # Triton specializes kernels on pointer alignment, and a step must not trigger a compile.
    return -(-n // 4) * 4


def pack_step(
    out: np.ndarray,
    scheduled: list[ScheduledRequest],
    block_size: int,
    num_seqs: int | None = None,
    seq_lora_slots: list[int] | None = None,
    previous_rows: dict[str, int] | None = None,
    num_tokens: int | None = None,
) -> PackedInputs:
    """Pack the step's inputs into ``out`` (int64, large enough); see ``PackedInputs``.

    ``num_seqs`` > ``len(scheduled)`` pads the batch to a graph bucket with one-token
    sequences (token 0 at position 0, KV slot -1, block table of zeros, context length 1).
    With ``num_tokens`` (a mixed-step graph's bucket) the padding sequences are empty instead,
    except the first, which holds the tokens up to ``num_tokens`` (token 0 at positions 0, 1,
    ..., KV slot -1, block table of zeros).
    ``seq_lora_slots`` gives each real sequence's adapter slot (-1: none).
    ``previous_rows``: each request's row in the previous step's sampled tokens, where a
    ``PLACEHOLDER`` token is taken from.
    """
    n = len(scheduled)
    b = num_seqs if num_seqs is not None else n
    if b < n:
        raise ValueError(f"num_seqs={b} is smaller than the {n} scheduled sequences")
    starts = np.zeros(b, dtype=np.int64)
    counts = np.ones(b, dtype=np.int64)
    starts[:n] = [s.start_position for s in scheduled]
    counts[:n] = [s.num_new_tokens for s in scheduled]
    if num_tokens is not None:
        counts[n:] = 0
        pad = num_tokens - int(counts[:n].sum())
        if pad < 0:
            raise ValueError(f"num_tokens={num_tokens} is below the {num_tokens - pad} scheduled")
        if pad and b == n:
            raise ValueError(f"num_seqs={b} leaves no padding sequence for {pad} tokens")
        if pad:
            counts[n] = pad
    tables = [s.request.block_table for s in scheduled]
    width = max((len(t) for t in tables), default=1)

    qsl = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(counts, out=qsl[1:])
    t = int(qsl[-1])
    t_real = int(qsl[n])
    sample_rows = [int(qsl[i + 1]) - 1 for i, s in enumerate(scheduled) if s.sample]
    nl = len(sample_rows)
    ids = out[:t]
    pos = out[t : 2 * t]
    slots = out[2 * t : 3 * t]
    out[3 * t : 3 * t + nl] = sample_rows
    o = 3 * t + nl
    out[o : o + b + 1] = qsl
    o_lens = o + _align4(b + 1)
    o_bt = o_lens + _align4(b)
    seq_lens = out[o_lens : o_lens + b]
    np.add(starts, counts, out=seq_lens)
    bt = out[o_bt : o_bt + b * width].reshape(b, width)
    bt[:] = 0
    for i, table in enumerate(tables):
        bt[i, : len(table)] = table

    # Per token: its sequence row, position and KV slot, without a per-token Python loop.
    rows = np.repeat(np.arange(b), counts)
    np.add(np.arange(t) - qsl[rows], starts[rows], out=pos)
    real_pos = pos[:t_real]
    np.add(
        bt[rows[:t_real], real_pos // block_size] * block_size,
        real_pos % block_size,
        out=slots[:t_real],
    )
    slots[t_real:] = -1
    ids[t_real:] = 0
    if n:
        ids[:t_real] = [
            tok
            for s in scheduled
            for tok in s.request.token_ids_slice(
                s.start_position, s.start_position + s.num_new_tokens
            )
        ]
    lora = None
    if seq_lora_slots is not None:
        per_seq = np.full(b, -1, dtype=np.int64)
        per_seq[:n] = seq_lora_slots
        lora = per_seq[rows]
    end = o_bt + b * width
    holes = np.flatnonzero(ids[:t_real] == PLACEHOLDER)
    if len(holes):
        ids[holes] = 0
        owners = [scheduled[r].request_id for r in rows[holes]]
        if previous_rows is None or any(rid not in previous_rows for rid in owners):
            raise ValueError(
                f"placeholder tokens of {owners} are not among the previous step's samples"
            )
        sources = [previous_rows[rid] for rid in owners]
        out[end : end + len(holes)] = holes
        out[end + len(holes) : end + 2 * len(holes)] = sources
    return PackedInputs(
        num_tokens=t,
        num_seqs=b,
        num_real_seqs=n,
        num_real_tokens=t_real,
        width=width,
        num_logits=nl,
        total=end + 2 * len(holes),
        max_seq_len=int(seq_lens.max()) if b else 0,
        query_start_loc=qsl,
        seq_lens=seq_lens.copy(),
        token_slots_lora=lora,
        num_fills=len(holes),
        fills_offset=end,
    )


def prompt_logprob_rows(
    scheduled: list[ScheduledRequest], packed: PackedInputs
) -> tuple[list[tuple[str, int, int, int]], list[int], list[int]]:
    """The prompt tokens this step's chunks predict, for requests that asked
    (``prompt_logprobs``): the logits at position p give prompt token p + 1. Positions
    already scored (before a preemption) are skipped. Returns (spans: request id, first
    prompt index, count, top-n; the hidden rows to score; the prompt tokens they predict)."""
    spans: list[tuple[str, int, int, int]] = []
    rows: list[int] = []
    targets: list[int] = []
    for i, s in enumerate(scheduled):
        req = s.request
        if req.prompt_logprobs is None:
            continue
        start = max(s.start_position, len(req.prompt_logprobs) - 1)
        end = min(s.start_position + s.num_new_tokens, req.num_prompt_tokens - 1)
        if start >= end:
            continue
        base = int(packed.query_start_loc[i]) - s.start_position
        rows.extend(range(base + start, base + end))
        targets.extend(req.prompt_token_ids[start + 1 : end + 1])
        n = req.sampling_params.prompt_logprobs
        assert n is not None
        spans.append((req.request_id, start + 1, end - start, n))
    return spans, rows, targets


def _is_plain_greedy(req: Request) -> bool:
    """Greedy with nothing that changes the logits or asks for logprobs: argmax is all."""
    p = req.sampling_params
    return (
        p.greedy
        and p.logprobs is None
        and not p.changes_logits
        and len(req.output_token_ids) >= p.min_tokens
    )


def _fill_tokens(
    ids: torch.Tensor, dev: torch.Tensor, p: PackedInputs, fills: torch.Tensor | None
) -> None:
    """Write the previous step's sampled tokens into the rows of ``ids`` that were
    placeholders (``dev``: the packed step on the device)."""
    if not p.num_fills:
        return
    assert fills is not None
    o, f = p.fills_offset, p.num_fills
    ids.index_copy_(0, dev[o : o + f], fills.index_select(0, dev[o + f : o + 2 * f]))


# ----------------------------------------------------------------------------- runner


class StepHandle:
    """A launched step: its sampled tokens, on the device and on their way to the host."""

    def __init__(
        self,
        requests: list[Request],
        tokens: SampledTokens | None,
        timings: StepTimings,
        prompt_logprobs: _PromptLogprobs | None = None,
    ) -> None:
        self.tokens = tokens
        self.rows = {r.request_id: i for i, r in enumerate(requests)}
        """Each sampling request's row in ``tokens``."""
        self._timings = timings
        self._prompt_logprobs = prompt_logprobs
        self.deferred: _DeferredSample | None = None
        """Set while the sampling waits for ``ModelRunner.sample_deferred``."""
        self._requests: list[Request] = requests

    def wait(self) -> RunnerOutput:
        if self.deferred is not None:
            raise RuntimeError("the step's sampling was deferred and never launched")
        prompt = self._prompt_logprobs.result() if self._prompt_logprobs is not None else {}
        if self.tokens is None:
            return RunnerOutput({}, {}, prompt)
        t0 = time.perf_counter()
        out = self.tokens.result()
        self._timings.wait_s += time.perf_counter() - t0
        ids = dict(zip(self.rows, out.token_ids, strict=True))
        logprobs: dict[str, TokenLogprobs] = {}
        if out.logprobs is not None:
            for rid, lp in zip(self.rows, out.logprobs, strict=True):
                if lp is not None:
                    logprobs[rid] = lp
        return RunnerOutput(ids, logprobs, prompt)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [T, D] output of the captured forward
    batch: ForwardBatch
    """The static inputs it reads (an eager forward of the same batch gives the same)."""
    lora: LoRAMetadata | None
    """Static LoRA buffers the graph reads; None: captured without adapters."""
    mixed: bool = False
    """Captured for steps mixing prefill and decode (``max_num_seqs + 1`` sequences over
    ``hidden.shape[0]`` tokens) rather than for one token per sequence."""

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        self.model = self._load_model()
        self.vocab_size = int(config.hf_config.vocab_size)
        self.lora_manager: LoRAManager | None = None
        if config.lora is not None:
            self.lora_manager = self._make_lora_manager(config.lora)
        self.num_blocks = self._determine_num_blocks()
        shape = self.model.kv_cache_shape(self.num_blocks, self.block_size)
        self.kv_caches = [
            torch.zeros(shape, dtype=config.dtype, device=self.device)
            for _ in range(self.model.num_layers)
        ]
        self.model.bind_kv_caches(self.kv_caches)
        self.sampler = Sampler()
        self.grammar_fill: GrammarFill | None = None
        """Set by the engine core: fills the bitmasks of constrained requests."""
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.timings = StepTimings()

        sched = config.scheduler
        self.max_num_seqs = sched.max_num_seqs
        self.max_blocks_per_seq = math.ceil(config.max_model_len / self.block_size)
        cuda = self.device.type == "cuda"
        cap = 4 * sched.max_num_batched_tokens + 5 * sched.max_num_seqs + 12
        cap += sched.max_num_seqs * self.max_blocks_per_seq
        self._stage = torch.empty(cap, dtype=torch.int64, pin_memory=cuda)
        self._stage_np: np.ndarray = self._stage.numpy()
        self._scratch = torch.empty(cap, dtype=torch.int64, device=self.device) if cuda else None
        # Set after each host-to-device copy: the staging buffer is not rewritten before it.
        self._copied = torch.cuda.Event() if cuda else None

        self.graphs: dict[int, _Graph] = {}
        self.graph_sizes: list[int] = []
        self.mixed_graphs: dict[int, _Graph] = {}
        self.mixed_sizes: list[int] = []
        # Per graph, the token slots its static LoRA metadata holds now: a decode batch
        # keeps its adapters from step to step, and then the metadata is not built again.
        self._static_lora_slots: dict[object, tuple[str, bytes]] = {}
        if cuda and self.lora_manager is not None and config.kernel.use_triton(self.device):
            self._warm_up_lora()
        if cuda and not config.enforce_eager:
            self._capture_graphs()
        logger.info(
            "model %s on %s (%s): %d KV blocks of %d tokens; %d decode graphs, %d mixed-step",
            config.model,
            self.device,
            config.dtype,
            self.num_blocks,
            self.block_size,
            len(self.graphs),
            len(self.mixed_graphs),
        )

    def _load_model(self) -> LlamaForCausalLM:
        return load_model(self.config)

    def _make_lora_manager(self, lora_config: LoRAConfig) -> LoRAManager:
        return LoRAManager(lora_config, self.model.lora_layers(), self.device)

    def shutdown(self) -> None:
        """Stop what runs beside the step loop (other tensor-parallel ranks); idempotent."""

    def _determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        per_block = self.model.kv_bytes_per_block(self.block_size)
        sched = self.config.scheduler
        needed = sched.max_num_seqs * math.ceil(sched.max_model_len / self.block_size)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            in_use = total - free
            # Activations of a full step, estimated generously: a few copies of the widest
            # per-token tensors times the token budget, plus logits for every sequence.
            hf = self.config.hf_config
            width = max(int(hf.intermediate_size) * 2, int(hf.hidden_size) * 4)
            act = sched.max_num_batched_tokens * width * 4 * 4
            act += sched.max_num_seqs * self.vocab_size * 4 * 3
            budget = int(total * cache.gpu_memory_utilization) - in_use - act
            num = budget // per_block
        else:
            num = cache.cpu_space_bytes // per_block
        num = min(num, needed)
        if num < 1:
            raise ValueError(
                "no memory left for the KV cache: raise gpu_memory_utilization or lower "
                "max_num_batched_tokens / max_num_seqs"
            )
        return int(num)

    # ------------------------------------------------------------------ step
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        return self.launch(sched).wait()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, previous: StepHandle | None = None) -> StepHandle:
        """Run one step up to its sampling, without waiting for the device. ``previous``:
        the step launched before, whose sampled tokens fill this one's placeholders.

        ``grammar_fill`` fills the structured-output bitmasks of constrained rows (requests
        with a ``grammar``). A constrained row whose last token is still on the device
        cannot have its mask yet: then the whole step's sampling waits
        (``StepHandle.deferred``) until the caller has that token and calls
        ``sample_deferred``; the forward pass is launched either way, so the mask is
        computed while the device runs it."""
        grammar = self.grammar_fill
        t0 = time.perf_counter()
        scheduled = sched.scheduled
        seq_lora = self._lora_slots(sched)
        graph = self._pick_graph(scheduled, seq_lora)
        packed = pack_step(
            self._stage_np_ready(),
            scheduled,
            self.block_size,
            num_seqs=graph.batch.attn.seq_lens.shape[0] if graph is not None else None,
            seq_lora_slots=seq_lora,
            previous_rows=previous.rows if previous is not None else None,
            num_tokens=graph.hidden.shape[0] if graph is not None and graph.mixed else None,
        )
        fills = None
        if packed.num_fills:
            assert previous is not None
            assert previous.tokens is not None
            fills = previous.tokens.token_ids
        self._before_forward(scheduled, packed, graph, previous)
        if graph is not None:
            logits_rows = self._load_graph_inputs(packed, graph, fills)
            t2 = time.perf_counter()
            graph.graph.replay()
            hidden = graph.hidden
            self.timings.graph_steps += 1
            self.timings.mixed_graph_steps += graph.mixed
        else:
            batch, logits_rows = self._eager_inputs(packed, fills)
            t2 = time.perf_counter()
            hidden = self.model(batch)  # [T, D]
        t3 = time.perf_counter()
        prompt_logprobs = self._prompt_logprobs(hidden, scheduled, packed)
        sample_reqs = [s.request for s in scheduled if s.sample]
        tokens = None
        deferred = None
        if sample_reqs:
            if packed.num_logits == packed.num_seqs == packed.num_tokens:
                selected = hidden  # decode without padding: every row samples
            elif packed.num_logits == packed.num_real_seqs == packed.num_real_tokens:
                selected = hidden[: packed.num_logits]  # padded decode
            else:
                selected = hidden.index_select(0, logits_rows)
            logits = self.model.compute_logits(selected)  # [N, V] float32
            constrained = [i for i, r in enumerate(sample_reqs) if r.grammar is not None]
            if constrained and grammar is None:
                raise ValueError("constrained requests but no grammar to fill their masks")
            waiting = any(
                sample_reqs[i].output_token_ids[-1:] == [PLACEHOLDER] for i in constrained
            )
            if waiting:
                deferred = _DeferredSample(
                    logits,
                    [len(r.output_token_ids) for r in sample_reqs],
                    constrained,
                    previous,
                )
            else:
                masks = self._masks(sample_reqs, constrained, grammar)
                tokens = self._sample(logits, sample_reqs, previous, masks)
        t4 = time.perf_counter()
        tm = self.timings
        tm.prepare_s += t2 - t0
        tm.forward_s += t3 - t2
        tm.sample_s += t4 - t3
        tm.steps += 1
        handle = StepHandle(sample_reqs, tokens, self.timings, prompt_logprobs)
        handle.deferred = deferred
        handle._requests = sample_reqs
        return handle

    def _before_forward(
        self,
        scheduled: list[ScheduledRequest],
        packed: PackedInputs,
        graph: _Graph | None,
        previous: StepHandle | None,
    ) -> None:
        """Called once the step's inputs are packed, before its forward pass (tensor
        parallelism sends the other ranks the step's plan here)."""

    @torch.inference_mode()
    def sample_deferred(self, handle: StepHandle) -> None:
        """Launch the sampling a ``launch`` deferred, now that the constrained rows' last
        tokens are known (their matchers have accepted them)."""
        d = handle.deferred
        if d is None:
            return
        grammar = self.grammar_fill
        t0 = time.perf_counter()
        reqs = handle._requests
        masks = self._masks(reqs, d.constrained, grammar)
        # The rows' outputs as they were at launch (later steps may have added placeholders).
        handle.tokens = self._sample(d.logits, reqs, d.previous, masks, d.num_outputs)
        handle.deferred = None
        self.timings.sample_s += time.perf_counter() - t0

    def _masks(
        self, reqs: list[Request], constrained: list[int], grammar: GrammarFill | None
    ) -> tuple[list[int], torch.Tensor] | None:
        if not constrained:
            return None
        assert grammar is not None
        cuda = self.device.type == "cuda"
        return constrained, grammar([reqs[i] for i in constrained], cuda)

    def _stage_np_ready(self) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the staging buffer is done
        return self._stage_np

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[Request],
        previous: StepHandle | None,
        masks: tuple[list[int], torch.Tensor] | None = None,
        num_outputs: list[int] | None = None,
    ) -> SampledTokens:
        if masks is None and all(_is_plain_greedy(r) for r in reqs):
            return SampledTokens(logits.argmax(dim=-1))
        pending = previous.rows if previous is not None else {}
        lengths = num_outputs or [len(r.output_token_ids) for r in reqs]
        rows = [
            SamplingRow(
                sampling_params=r.sampling_params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids[:n],
                eos_token_id=r.eos_token_id,
                pending_row=pending.get(r.request_id),
            )
            for r, n in zip(reqs, lengths, strict=True)
        ]
        tokens = previous.tokens.token_ids if previous and previous.tokens else None
        meta = SamplingMetadata.build(
            rows, self.vocab_size, self.device, self.generator, pending_tokens=tokens, grammar=masks
        )
        return self.sampler.launch(logits, meta)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, scheduled: list[ScheduledRequest], packed: PackedInputs
    ) -> _PromptLogprobs | None:
        """Score the prompt tokens this step's chunks predict, for requests that asked
        (``prompt_logprobs``; see ``prompt_logprob_rows``)."""
        spans, rows, targets = prompt_logprob_rows(scheduled, packed)
        if not spans:
            return None
        k = max(n for *_, n in spans)
        # From pinned memory: a copy from pageable memory would wait for the step in flight.
        dev = self.device
        index = pinned(torch.tensor(rows, dtype=torch.int64), dev).to(dev, non_blocking=True)
        target = pinned(torch.tensor(targets, dtype=torch.int64), dev).to(dev, non_blocking=True)
        parts = []
        for a in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            b = a + _PROMPT_LOGPROBS_ROWS
            logits = self.model.compute_logits(hidden.index_select(0, index[a:b]))  # [R, V]
            parts.append(pack_token_logprobs(torch.log_softmax(logits, -1), target[a:b], k))
        return _PromptLogprobs(torch.cat(parts), spans)

    # ------------------------------------------------------------------ inputs
    def _lora_slots(self, sched: SchedulerOutput) -> list[int] | None:
        """Each scheduled sequence's adapter slot (-1: base model); None when LoRA is off."""
        if self.lora_manager is None:
            return None
        active = sched.active_lora_ids
        slots = self.lora_manager.activate(active) if active else {}
        return [slots[i] if (i := s.request.lora_int_id) else -1 for s in sched.scheduled]

    def _pick_graph(
        self, scheduled: list[ScheduledRequest], seq_lora: list[int] | None
    ) -> _Graph | None:
        """The graph that runs this step, or None for eager."""
        if not scheduled or len(scheduled) > self.max_num_seqs:
            return None
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        if num_tokens == len(scheduled):  # decode only
            size = padded_batch_size(num_tokens, self.graph_sizes)
            graph = self.graphs.get(size) if size is not None else None
        else:
            size = padded_batch_size(num_tokens, self.mixed_sizes)
            graph = self.mixed_graphs.get(size) if size is not None else None
        if graph is None:
            return None
        if not graph.uses_lora and seq_lora and max(seq_lora) >= 0:
            return None  # no static LoRA metadata: adapter tokens run eagerly
        return graph

    def _eager_inputs(
        self, p: PackedInputs, fills: torch.Tensor | None
    ) -> tuple[ForwardBatch, torch.Tensor]:
        host = self._stage[: p.total]
        if self._scratch is not None:
            dev = self._scratch[: p.total]
            dev.copy_(host, non_blocking=True)
            assert self._copied is not None
            self._copied.record()
        else:
            dev = host.clone()  # the staging buffer is rewritten next step
        t, nl, b, w = p.num_tokens, p.num_logits, p.num_seqs, p.width
        _fill_tokens(dev[:t], dev, p, fills)
        i32 = dev[p.int32_offset : p.fills_offset].to(torch.int32)
        attn = AttentionMetadata(
            slot_mapping=dev[2 * t : 3 * t],
            query_start_loc=i32[: b + 1],
            seq_lens=i32[p.seq_lens_offset : p.seq_lens_offset + b],
            block_tables=i32[p.block_tables_offset :].view(b, w),
            query_start_loc_cpu=p.query_start_loc.tolist(),
            seq_lens_cpu=p.seq_lens.tolist(),
            max_query_len=int(np.diff(p.query_start_loc).max()) if b else 0,
            max_seq_len=p.max_seq_len,
        )
        batch = ForwardBatch(
            input_ids=dev[:t],
            positions=dev[t : 2 * t],
            attn=attn,
            lora=self._lora_metadata(p),
        )
        return batch, dev[3 * t : 3 * t + nl]

    def _lora_metadata(self, p: PackedInputs) -> LoRAMetadata | None:
        if p.token_slots_lora is None:
            return None
        return build_lora_metadata(p.token_slots_lora, self.device)

    def _load_graph_inputs(
        self, p: PackedInputs, graph: _Graph, fills: torch.Tensor | None
    ) -> torch.Tensor:
        """Copy the packed step into the graph's static buffers; returns the logits rows."""
        assert self._scratch is not None
        assert self._copied is not None
        dev = self._scratch[: p.total]
        dev.copy_(self._stage[: p.total], non_blocking=True)
        self._copied.record()
        t, b, w, o = p.num_tokens, p.num_seqs, p.width, p.int32_offset
        # ids | positions | slots are contiguous [3, T] in both buffers.
        self._g_tokens[:, :t].copy_(dev[: 3 * t].view(3, t))
        _fill_tokens(self._g_tokens[0], dev, p, fills)
        if graph.mixed:  # decode graphs' query starts are fixed
            self._m_qsl.copy_(dev[o : o + b + 1])
        lens, bt = o + p.seq_lens_offset, o + p.block_tables_offset
        self._g_seq_lens[:b].copy_(dev[lens : lens + b])
        self._g_block_tables[:b, :w].copy_(dev[bt : bt + b * w].view(b, w))
        if graph.lora is not None and p.token_slots_lora is not None:
            self._copy_static_lora(p.token_slots_lora, graph.lora, (graph.mixed, t))
        return dev[3 * t : 3 * t + p.num_logits]

    # ------------------------------------------------------------------ CUDA graphs
    def _static_lora(self, num_tokens: int) -> LoRAMetadata | None:
        """Static LoRA metadata for a graph of ``num_tokens`` tokens, when LoRA is on."""
        if self.lora_manager is None or self.config.lora is None:
            return None
        return allocate_static_lora_metadata(num_tokens, self.config.lora.max_loras, self.device)

    def _copy_static_lora(
        self, token_slots: np.ndarray, static: LoRAMetadata, graph_key: object
    ) -> None:
        """Fill the static LoRA metadata of the graph ``graph_key`` names for
        ``token_slots``: one host-to-device copy (build_lora_metadata's ``out=``), or none
        when it holds these slots already."""
        key = (token_slots.dtype.str, token_slots.tobytes())
        if self._static_lora_slots.get(graph_key) == key:
            return
        build_lora_metadata(token_slots, self.device, out=static)
        self._static_lora_slots[graph_key] = key

    def kernel_settings(self) -> dict[str, object]:
        """The kernel settings the model runs with, launch settings resolved."""
        return self.model.kernels.describe()

    def use_kernel_config(self, kernel: KernelConfig) -> None:
        """Run the loaded model with other kernel settings and capture its CUDA graphs again
        (benchmarks that compare settings without loading the weights once per setting)."""
        self.model.set_kernels(Kernels(kernel, self.device))
        self.graphs.clear()
        self.mixed_graphs.clear()
        self._static_lora_slots.clear()
        if self.device.type == "cuda" and not self.config.enforce_eager:
            torch.cuda.empty_cache()
            self._capture_graphs()

    def _warm_up_lora(self) -> None:
        """Compile the LoRA kernel variants of eager steps now, not in the first request
        that needs each (``engine.lora.warmup``)."""
        assert self.config.lora is not None
        t0 = time.perf_counter()
        launches = warm_up_lora_kernels(
            self.model.lora_layers(),
            self.config.scheduler.max_num_batched_tokens,
            self.config.lora.max_loras,
        )
        launches += self.model.warm_up_lora_fusions()
        torch.cuda.synchronize(self.device)
        logger.info(
            "compiled the LoRA kernels for %d launch shapes in %.1f s",
            launches,
            time.perf_counter() - t0,
        )

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        bmax, dev = self.max_num_seqs, self.device
        self.graph_sizes = graph_batch_sizes(bmax)
        self.mixed_sizes = mixed_graph_sizes(self.config.max_cudagraph_capture_size)
        tmax = max([bmax, *self.mixed_sizes])
        seqs = bmax + 1  # a mixed graph's: the step's, one of padding tokens, empty ones
        # rows: token ids, positions, KV slots (static, [3, tmax] int64)
        self._g_tokens = torch.zeros(3, tmax, dtype=torch.int64, device=dev)
        self._g_tokens[2].fill_(-1)
        self._g_qsl = torch.arange(bmax + 1, dtype=torch.int32, device=dev)
        self._m_qsl = torch.zeros(seqs + 1, dtype=torch.int32, device=dev)
        self._g_seq_lens = torch.ones(seqs, dtype=torch.int32, device=dev)
        # Wide enough for a capture's one sequence of all tmax tokens.
        width = max(self.max_blocks_per_seq, -(-tmax // self.block_size))
        self._g_block_tables = torch.zeros(seqs, width, dtype=torch.int32, device=dev)
        self._static_lora_slots.clear()  # new static buffers hold no slots yet
        pool = torch.cuda.graph_pool_handle()
        # Largest first, mixed before decode: later graphs reuse the pool's blocks.
        for t in reversed(self.mixed_sizes):
            # Captured with one sequence of all t tokens writing no KV, then empty ones.
            self._m_qsl.fill_(t)
            self._m_qsl[0] = 0
            self._g_seq_lens.zero_()
            self._g_seq_lens[0] = t
            batch = ForwardBatch(
                input_ids=self._g_tokens[0, :t],
                positions=self._g_tokens[1, :t],
                attn=AttentionMetadata(
                    slot_mapping=self._g_tokens[2, :t],
                    query_start_loc=self._m_qsl,
                    seq_lens=self._g_seq_lens,
                    block_tables=self._g_block_tables,
                    query_start_loc_cpu=[0] + [t] * seqs,
                    seq_lens_cpu=[t] + [0] * (seqs - 1),
                    max_query_len=t,  # > 1: attention's prefill layout, whatever the step
                    max_seq_len=width * self.block_size,
                ),
                lora=self._static_lora(t),
            )
            self.mixed_graphs[t] = self._capture(batch, pool, mixed=True)
        self._g_seq_lens.fill_(1)
        for b in reversed(self.graph_sizes):
            lora = self._static_lora(b)  # all slots -1 until a step fills it
            batch = ForwardBatch(
                input_ids=self._g_tokens[0, :b],
                positions=self._g_tokens[1, :b],
                attn=AttentionMetadata(
                    slot_mapping=self._g_tokens[2, :b],
                    query_start_loc=self._g_qsl[: b + 1],
                    seq_lens=self._g_seq_lens[:b],
                    block_tables=self._g_block_tables[:b],
                    query_start_loc_cpu=list(range(b + 1)),
                    seq_lens_cpu=[1] * b,
                    max_query_len=1,
                    max_seq_len=self.max_blocks_per_seq * self.block_size,
                ),
                lora=lora,
            )
            self.graphs[b] = self._capture(batch, pool)
        torch.cuda.synchronize(dev)
        logger.info(
            "captured %d decode graphs (batch sizes up to %d) and %d mixed-step graphs "
            "(up to %d tokens) in %.1f s",
            len(self.graphs),
            bmax,
            len(self.mixed_graphs),
            self.mixed_sizes[-1] if self.mixed_sizes else 0,
            time.perf_counter() - t0,
        )

    def _capture(self, batch: ForwardBatch, pool: Any, *, mixed: bool = False) -> _Graph:
        self.model(batch)  # warm-up: compiles kernels, sizes workspaces
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model(batch)
        return _Graph(graph, hidden, batch, batch.lora, mixed=mixed)

    def synthetic_decode(
        self, batch_size: int, context_len: int, lora_slots: list[int] | None = None
    ) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
        """Fill the graph buffers of ``batch_size`` with a decode step of that many sequences,
        each ``context_len`` tokens long on blocks of its own (wrapping around the cache if it
        is too small), and ``lora_slots`` per sequence; for benchmarks, after serving is done
        (the step writes K/V into the cache). Returns (graph replay, eager forward)."""
        with torch.inference_mode():  # the static buffers are inference tensors
            self._fill_synthetic(batch_size, context_len, lora_slots)
        g = self.graphs[batch_size]

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return self.model(g.batch)

        return g.graph.replay, eager

    def _fill_synthetic(
        self, batch_size: int, context_len: int, lora_slots: list[int] | None
    ) -> None:
        g = self.graphs[batch_size]
        bs, nb = self.block_size, -(-context_len // self.block_size)
        blocks = (np.arange(batch_size * nb) % self.num_blocks).reshape(batch_size, nb)
        pos = context_len - 1
        self._g_tokens[0, :batch_size] = 1
        self._g_tokens[1, :batch_size] = pos
        slots = blocks[:, pos // bs] * bs + pos % bs
        self._g_tokens[2, :batch_size].copy_(torch.from_numpy(slots))
        self._g_seq_lens[:batch_size] = context_len
        self._g_block_tables[:batch_size, :nb].copy_(torch.from_numpy(blocks))
        if g.lora is not None:
            slots_np = np.asarray(lora_slots if lora_slots is not None else [-1] * batch_size)
            self._copy_static_lora(slots_np.astype(np.int64), g.lora, (False, batch_size))
        torch.cuda.synchronize(self.device)


__all__ = [
    "ModelRunner",
    "PackedInputs",
    "RunnerOutput",
    "SampleLogprobs",
    "StepTimings",
    "graph_batch_sizes",
    "mixed_graph_sizes",
    "pack_step",
    "padded_batch_size",
]

"""The one place where Python lists become tensors: builds a step's inputs from the
scheduler's output, runs the model, samples. Owns the model, the KV cache and the
adapter manager; holds no scheduling policy."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.lora.layers import build_lora_metadata
from engine.lora.manager import LoRAManager
from engine.model.loader import load_model
from engine.model.metadata import AttentionMetadata, ForwardBatch, LoRAMetadata
from engine.outputs import SampleLogprobs
from engine.sampling.sampler import Sampler, SamplingMetadata, SamplingRow

logger = logging.getLogger("lorastream.runner")


@dataclass
class RunnerOutput:
    """Sampled token (and logprobs) per request that sampled this step."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, dict[int, float]]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        self.model = load_model(config)
        self.vocab_size = int(config.hf_config.vocab_size)
        self.lora_manager: LoRAManager | None = None
        if config.lora is not None:
            self.lora_manager = LoRAManager(config.lora, self.model.lora_layers(), self.device)
        self.num_blocks = self._determine_num_blocks()
        shape = self.model.kv_cache_shape(self.num_blocks, self.block_size)
        self.kv_caches = [
            torch.zeros(shape, dtype=config.dtype, device=self.device)
            for _ in range(self.model.num_layers)
        ]
        self.model.bind_kv_caches(self.kv_caches)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        logger.info(
            "model %s on %s (%s): %d KV blocks of %d tokens",
            config.model,
            self.device,
            config.dtype,
            self.num_blocks,
            self.block_size,
        )

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
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        batch, logits_rows, sample_reqs = self._prepare(sched)
        hidden = self.model(batch)  # [T, D]
        if not sample_reqs:
            return RunnerOutput({}, {})
        idx = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))  # [N, V] float32
        rows = [
            SamplingRow(
                sampling_params=r.sampling_params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids,
                eos_token_id=r.eos_token_id,
            )
            for r in sample_reqs
        ]
        meta = SamplingMetadata.build(rows, self.vocab_size, self.device, self.generator)
        out = self.sampler(logits, meta)
        tokens = {r.request_id: t for r, t in zip(sample_reqs, out.token_ids, strict=True)}
        logprobs: dict[str, dict[int, float]] = {}
        if out.logprobs is not None:
            for r, lp in zip(sample_reqs, out.logprobs, strict=True):
                if lp is not None:
                    logprobs[r.request_id] = lp
        return RunnerOutput(tokens, logprobs)

    def _prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        token_lora_ids: list[int] = []
        logits_rows: list[int] = []
        sample_reqs = []
        for s in sched.scheduled:
            req = s.request
            start, n = s.start_position, s.num_new_tokens
            end = start + n
            input_ids.extend(req.token_ids_slice(start, end))
            positions.extend(range(start, end))
            table = req.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            block_tables.append(table)
            token_lora_ids.extend([req.lora_int_id] * n)
            if s.sample:
                logits_rows.append(query_start_loc[-1] - 1)
                sample_reqs.append(req)

        dev = self.device
        max_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        attn = AttentionMetadata(
            slot_mapping=_to(slot_mapping, torch.long, dev),
            query_start_loc=_to(query_start_loc, torch.int32, dev),
            seq_lens=_to(seq_lens, torch.int32, dev),
            block_tables=_to(padded, torch.int32, dev),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            max_query_len=max(
                b - a for a, b in itertools.pairwise(query_start_loc)
            ),
            max_seq_len=max(seq_lens),
        )
        lora = self._prepare_lora(sched, token_lora_ids)
        batch = ForwardBatch(
            input_ids=_to(input_ids, torch.long, dev),
            positions=_to(positions, torch.long, dev),
            attn=attn,
            lora=lora,
        )
        return batch, logits_rows, sample_reqs

    def _prepare_lora(
        self, sched: SchedulerOutput, token_lora_ids: list[int]
    ) -> LoRAMetadata | None:
        if self.lora_manager is None:
            return None
        active = {i for i in sched.active_lora_ids if i}
        slots = self.lora_manager.activate(active) if active else {}
        token_slots = [slots[i] if i else -1 for i in token_lora_ids]
        return build_lora_metadata(token_slots, self.device)


def _to(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


__all__ = ["ModelRunner", "RunnerOutput", "SampleLogprobs"]

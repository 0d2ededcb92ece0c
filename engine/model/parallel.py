"""The Llama family split over tensor-parallel ranks, Megatron-style, by swapping modules.

``shard_model`` takes the model ``LlamaForCausalLM`` builds on the meta device and replaces,
in every decoder layer:

- ``qkv_proj`` and ``gate_up_proj`` by column-parallel layers: rank ``k`` of ``N`` holds
  query heads ``[k * H/N, (k+1) * H/N)``, the key/value heads they attend with, and
  intermediate features ``[k * I/N, (k+1) * I/N)``. With fewer KV heads than ranks each KV
  head is replicated on ``N / Hkv`` ranks (as vLLM does), so the KV cache is split by heads
  either way;
- ``o_proj`` and ``down_proj`` by row-parallel layers over those same ranges: one all-reduce
  each;
- ``embed_tokens`` and ``lm_head`` by vocabulary-parallel tables of ``ceil(V / N)`` rows
  (the last rank's padded with zeros): the embedding masks out-of-range ids and
  all-reduces, the logits of every rank are gathered on rank 0.

``load_sharded_model`` then reads each rank's share straight from the safetensors files
(``get_slice``: only the rows or columns the rank keeps are read). The LoRA side of the
swapped layers is ``engine.lora.sharded``.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from engine.config import EngineConfig
from engine.distributed.group import TPGroup
from engine.kernels.dispatch import Kernels
from engine.lora import ColumnParallelLoRALinear, RowParallelLoRALinear
from engine.model.attention import PagedAttention
from engine.model.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    VocabEmbedding,
    get_model_class,
)
from engine.model.loader import CheckpointError, check_sources, open_checkpoint

# (dim, start, size): the part of a checkpoint tensor a rank reads; None: all of it.
Part = tuple[int, int, int] | None


def check_tensor_parallel(hf_config: Any, world_size: int) -> None:
    """Raise ``ValueError`` (naming the fix) when the model cannot be split over
    ``world_size`` ranks."""
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    inter = int(hf_config.intermediate_size)
    problems = []
    if heads % world_size:
        problems.append(f"its {heads} attention heads")
    if kv % world_size and world_size % kv:
        problems.append(f"its {kv} key/value heads (nor is it a multiple of them)")
    if inter % world_size:
        problems.append(f"its intermediate size {inter}")
    if problems:
        raise ValueError(
            f"EngineArgs.tensor_parallel_size={world_size} is invalid for this model: it does "
            f"not divide {' or '.join(problems)}; pick a divisor of {heads}"
        )


def kv_head_range(num_kv_heads: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first KV head, count) a rank holds: its share, or the one head its queries use when
    there are fewer KV heads than ranks (replicated)."""
    if num_kv_heads >= world_size:
        n = num_kv_heads // world_size
        return rank * n, n
    return rank * num_kv_heads // world_size, 1


class VocabParallelEmbedding(VocabEmbedding):
    """Rows ``[start, start + rows)`` of a ``[V, D]`` table padded to ``rows * N`` rows."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        group: TPGroup,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        rows = math.ceil(vocab_size / group.world_size)
        super().__init__(rows, dim, dtype, device)
        self.vocab_size = vocab_size
        self.rows = rows
        self.start = group.rank * rows
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, D]; each rank looks up the ids it holds, zeros elsewhere, then sum.
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        x = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        x = x * inside.unsqueeze(-1).to(x.dtype)
        return self.group.all_reduce(x)


class TPLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with rank ``group.rank``'s share of every weight."""

    group: TPGroup

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> logits [N, V] float32 on rank 0 (other ranks: their own columns,
        # which nothing reads). Collective: every rank calls it with the same rows. Gathered
        # in the model dtype, the matmul's own rounding: half the bytes of float32, same values.
        local = F.linear(hidden, self.lm_head_weight)  # [N, V / ranks]
        parts = self.group.gather_to_leader(local)  # [ranks, N, V / ranks]
        if parts is None:
            return local.float()
        logits = parts.permute(1, 0, 2).reshape(hidden.shape[0], -1)[:, : self.vocab_size]
        return logits.float()


def shard_model(model: TPLlamaForCausalLM, group: TPGroup, fully_sharded_loras: bool) -> None:
    """Swap ``model``'s layers (on the meta device) for rank ``group.rank``'s shares."""
    cfg = model.config
    n, rank = group.world_size, group.rank
    check_tensor_parallel(cfg, n)
    model.group = group
    dtype, meta = model.dtype, torch.device("meta")
    d = int(cfg.hidden_size)
    kw: dict[str, Any] = {"group": group, "fully_sharded": fully_sharded_loras}
    kw |= {"dtype": dtype, "device": meta, "kernels": model.kernels}
    for layer in model.model.layers:
        attn = layer.self_attn
        assert isinstance(attn, LlamaAttention)
        heads, dh = attn.num_heads // n, attn.head_dim
        kv_start, kv_heads = kv_head_range(attn.num_kv_heads, n, rank)
        q_rows = (rank * heads * dh, heads * dh)
        kv_rows = (kv_start * dh, kv_heads * dh)
        old = attn.qkv_proj
        attn.qkv_proj = ColumnParallelLoRALinear(
            d, old.out_slices, [q_rows, kv_rows, kv_rows], old.slice_names,
            bias=old.bias is not None, **kw,
        )  # fmt: skip
        attn.o_proj = RowParallelLoRALinear(
            attn.q_size, q_rows, d, "o_proj", bias=attn.o_proj.bias is not None, **kw
        )
        old_attn = attn.attn
        attn.attn = PagedAttention(
            heads, kv_heads, dh, old_attn.scale, old_attn.sliding_window, model.kernels
        )
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.q_size, attn.kv_size = heads * dh, kv_heads * dh
        mlp = layer.mlp
        assert isinstance(mlp, LlamaMLP)
        inter = mlp.down_proj.in_features
        cols = (rank * inter // n, inter // n)
        bias = mlp.down_proj.bias is not None
        mlp.gate_up_proj = ColumnParallelLoRALinear(
            d, [inter, inter], [cols, cols], ["gate_proj", "up_proj"], bias=bias, **kw
        )
        mlp.down_proj = RowParallelLoRALinear(inter, cols, d, "down_proj", bias=bias, **kw)
    model.num_kv_heads = kv_head_range(model.num_kv_heads, n, rank)[1]
    model.model.embed_tokens = VocabParallelEmbedding(model.vocab_size, d, group, dtype, meta)
    if not model.tie_word_embeddings:
        model.lm_head = VocabParallelEmbedding(model.vocab_size, d, group, dtype, meta)


def sharded_sources(
    model: TPLlamaForCausalLM,
) -> dict[str, list[tuple[str, tuple[int, ...], Part]]]:
    """For each parameter: the checkpoint tensors it is made of, their whole shapes, and the
    part this rank reads (concatenated along dim 0 in order)."""
    sources: dict[str, list[tuple[str, tuple[int, ...], Part]]] = {}
    modules = dict(model.named_modules())
    for name, param in model.state_dict().items():
        module_name, _, kind = name.rpartition(".")
        m = modules[module_name]
        parent = module_name.rpartition(".")[0]
        if isinstance(m, ColumnParallelLoRALinear):
            sources[name] = [
                (
                    f"{parent}.{slice_name}.{kind}",
                    (full, m.in_features) if kind == "weight" else (full,),
                    (0, start, size),
                )
                for slice_name, full, (start, size) in zip(
                    m.slice_names, m.full_out_slices, m.shards, strict=True
                )
            ]
        elif isinstance(m, RowParallelLoRALinear):
            out = m.out_features
            hf = f"{parent}.{m.slice_names[0]}.{kind}"
            if kind == "weight":
                sources[name] = [(hf, (out, m.full_in_features), (1, *m.shard))]
            else:
                sources[name] = [(hf, (out,), None)]
        elif isinstance(m, VocabParallelEmbedding):
            rows = max(0, min(m.rows, m.vocab_size - m.start))
            shape = (m.vocab_size, m.weight.shape[1])
            sources[name] = [(f"{module_name}.{kind}", shape, (0, m.start, rows))]
        else:
            sources[name] = [(name, tuple(param.shape), None)]
    return sources


def read_sharded_state_dict(
    model: TPLlamaForCausalLM, model_dir: str | Path, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """This rank's state dict: only its rows or columns are read from the files."""
    sources = sharded_sources(model)
    expected = model.state_dict()
    with ExitStack() as stack:
        where, shapes = open_checkpoint(stack, model_dir)
        check_sources(
            {k: [(hf, shape) for hf, shape, _ in v] for k, v in sources.items()}, shapes, model_dir
        )
        state: dict[str, torch.Tensor] = {}
        for name, parts in sources.items():
            tensors = [_read_part(where[hf], hf, part) for hf, _, part in parts]
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            want = tuple(expected[name].shape)
            if t.shape[0] < want[0]:  # the last vocabulary shard: padded with zero rows
                t = torch.cat([t, t.new_zeros(want[0] - t.shape[0], *t.shape[1:])])
            if tuple(t.shape) != want:
                raise CheckpointError(f"{name}: read {list(t.shape)}, expected {list(want)}")
            state[name] = t.to(device=device, dtype=dtype)
        return state


def _read_part(handle: Any, name: str, part: Part) -> torch.Tensor:
    if part is None:
        return handle.get_tensor(name)
    dim, start, size = part
    sl = handle.get_slice(name)
    return sl[start : start + size] if dim == 0 else sl[:, start : start + size]


def load_sharded_model(config: EngineConfig, group: TPGroup) -> TPLlamaForCausalLM:
    """Rank ``group.rank``'s share of ``config.model`` (a safetensors checkpoint)."""
    if str(config.model).endswith(".gguf"):
        raise CheckpointError(
            "tensor_parallel_size > 1 reads safetensors checkpoints only: convert the GGUF "
            "file, or run it with tensor_parallel_size=1"
        )
    get_model_class(config.hf_config)  # raises on what the family does not cover
    kernels = Kernels(config.kernel, config.device)
    model = TPLlamaForCausalLM(config.hf_config, config.dtype, torch.device("meta"), kernels)
    fully_sharded = config.lora is not None and config.lora.fully_sharded_loras
    shard_model(model, group, fully_sharded)
    state = read_sharded_state_dict(model, config.model, config.dtype, config.device)
    model.load_state_dict(state, assign=True)
    model.init_buffers(config.device)
    return model.eval()


__all__ = [
    "TPLlamaForCausalLM",
    "VocabParallelEmbedding",
    "check_tensor_parallel",
    "kv_head_range",
    "load_sharded_model",
    "read_sharded_state_dict",
    "shard_model",
]

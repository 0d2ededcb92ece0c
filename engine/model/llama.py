"""The Llama family as plain ``nn.Module``s: Llama 2/3, Mistral, Qwen2.

Differences inside the family are config switches, not subclasses: q/k/v (and o) bias,
tied embeddings, RoPE scaling (none, linear, llama3), a sliding window. Projections are
fused (``qkv_proj``, ``gate_up_proj``) so one matmul serves several HF modules; each
``LoRALinear`` keeps one LoRA slice per HF module, which ``lora_target`` maps PEFT names to.

All tokens of a step are flattened: every forward takes ``x: [T, D]`` and the step's
``ForwardBatch``. Every module that runs a kernel holds the model's ``Kernels`` (the
engine's ``KernelConfig`` on this device), handed down from ``LlamaForCausalLM``. Weights are created empty (``torch.empty``) so the loader can build the
model on the meta device and assign the checkpoint's tensors.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.errors import AdapterUnsupported, UnsupportedModel
from engine.kernels.dispatch import Kernels
from engine.lora import LoRALinear, LoRAMetadata
from engine.model.attention import PagedAttention
from engine.model.metadata import ForwardBatch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "llama3")

# HF module name -> (our fused module, slice index inside it).
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_LORA_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+?)(?:\.|$)")


def lora_target(name: str) -> tuple[str, int]:
    """Map a PEFT module or tensor name to ``(layer_key, slice_idx)`` in ``lora_layers()``.

    ``base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight`` and
    ``model.layers.3.self_attn.k_proj`` both give ``("model.layers.3.self_attn.qkv_proj", 1)``;
    q/k/v are slices 0/1/2 of ``qkv_proj``, gate/up slices 0/1 of ``gate_up_proj``,
    o_proj and down_proj slice 0 of themselves. Anything else raises ``AdapterUnsupported``.
    """
    m = _LORA_NAME.search(name)
    if m is None or m.group(3) not in PACKED_MODULES or _parent(m.group(3)) != m.group(2):
        raise AdapterUnsupported(
            f"LoRA module {name!r} is not supported: targets must be one of "
            f"{', '.join(PACKED_MODULES)} inside model.layers.N"
        )
    layer, parent, proj = m.groups()
    fused, slice_idx = PACKED_MODULES[proj]
    return f"model.layers.{layer}.{parent}.{fused}", slice_idx


def _parent(proj: str) -> str:
    return "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"


def get_model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    """The class that runs ``hf_config``; ``UnsupportedModel`` names what is supported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(
            f"architecture {archs or getattr(hf_config, 'model_type', None)!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act={act!r} is not supported; only silu")
    rope_parameters(hf_config)  # raises on a RoPE type we do not implement
    return LlamaForCausalLM


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings as one flat dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``config.rope_parameters`` (theta included); older configs
    have ``rope_theta`` at the top level and an optional ``rope_scaling`` dict whose type
    key is ``type`` or ``rope_type``.
    """
    params: dict[str, Any] = {}
    for source in (
        getattr(hf_config, "rope_scaling", None),
        getattr(hf_config, "rope_parameters", None),
    ):
        if isinstance(source, dict):
            params.update(source)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModel(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
    return params


def rope_inv_freq(
    head_dim: int, params: dict[str, Any], max_position_embeddings: int
) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, computed as transformers does."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if params["rope_type"] == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif params["rope_type"] == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params.get("original_max_position_embeddings") or max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept,
        # the band between them interpolated smoothly.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    """RMSNorm with the residual add optionally fused in."""

    def __init__(
        self, dim: int, eps: float, dtype: torch.dtype, device: torch.device, kernels: Kernels
    ) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(
            torch.empty(dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, D] -> (normed [T, D], residual stream [T, D]). Without a residual,
        # x itself is the stream; with one, the stream is x + residual (in the model dtype).
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps), x
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class VocabEmbedding(nn.Module):
    """A [V, D] table: embed_tokens looks tokens up in it, lm_head projects onto it."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vocab_size, dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, D]
        return F.embedding(ids, self.weight)


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: Any, layer_idx: int, dtype: torch.dtype, device: torch.device, kernels: Kernels
    ) -> None:
        super().__init__()
        self.kernels = kernels
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = _attention_bias(cfg)
        self.qkv_proj = LoRALinear(
            d,
            [self.q_size, self.kv_size, self.kv_size],
            ["q_proj", "k_proj", "v_proj"],
            bias=qkv_bias,
            dtype=dtype,
            device=device,
            kernels=kernels,
        )
        self.o_proj = LoRALinear(
            self.q_size, [d], ["o_proj"], bias=o_bias, dtype=dtype, device=device, kernels=kernels
        )
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=self.head_dim**-0.5,
            sliding_window=_sliding_window(cfg, layer_idx),
            kernels=kernels,
        )

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        t = x.shape[0]
        q = self._fused_qkv_rope(x, batch, rope)
        if q is not None:  # K/V already in the cache
            return self.o_proj(self.attn.attend(q, batch.attn), batch.lora)
        qkv = self.qkv_proj(x, batch.lora)  # [T, (H + 2 * Hkv) * Dh]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Rotated in place inside qkv on the Triton path: no copies of q and k.
        q, k = self.kernels.apply_rotary(q, k, *rope)  # [T, H, Dh], [T, Hkv, Dh]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        o = self.attn(q, k, v, batch.attn)  # [T, H * Dh]
        return self.o_proj(o, batch.lora)

    def _fused_qkv_rope(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | None:
        """q [T, H, Dh], rotated, with K/V written into the cache, where the adapters' expand,
        RoPE and the cache write run as one kernel (``LoRALinear.qkv_rope``); None where they
        run apart."""
        cache, slots = self.attn.cache(), batch.attn.slot_mapping
        q = self.qkv_proj.qkv_rope(x, batch.lora, rope, cache, slots, self.num_heads)
        return None if q is None else q.view(x.shape[0], self.num_heads, self.head_dim)

    def warm_up_fused_qkv_rope(self) -> int:
        """Compile the fused expand + RoPE + cache write (``LoRALinear.warm_up_qkv_rope``)."""
        return self.qkv_proj.warm_up_qkv_rope(self.attn.cache(), self.num_heads)


class LlamaMLP(nn.Module):
    def __init__(
        self, cfg: Any, dtype: torch.dtype, device: torch.device, kernels: Kernels
    ) -> None:
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = LoRALinear(
            d, [i, i], ["gate_proj", "up_proj"], bias, dtype, device, kernels
        )
        self.down_proj = LoRALinear(i, [d], ["down_proj"], bias, dtype, device, kernels)

    def forward(self, x: torch.Tensor, lora: LoRAMetadata | None) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        act = self.gate_up_proj.silu_and_mul(x, lora)  # [T, I]
        return self.down_proj(act, lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: Any, layer_idx: int, dtype: torch.dtype, device: torch.device, kernels: Kernels
    ) -> None:
        super().__init__()
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device, kernels)
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype, device, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device, kernels)
        self.mlp = LlamaMLP(cfg, dtype, device, kernels)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, D] -> (MLP output [T, D], residual stream [T, D]). The residual add
        # of each sublayer is fused into the next norm (the next layer's input_layernorm or
        # the final norm); it is `x + residual` in the model dtype, as HF's.
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, batch, rope)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, batch.lora), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: Any, dtype: torch.dtype, device: torch.device, kernels: Kernels
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, dtype, device, kernels) for i in range(cfg.num_hidden_layers)
        )
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.norm = RMSNorm(cfg.hidden_size, eps, dtype, device, kernels)

    def forward(self, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, rope)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        dtype: torch.dtype,
        device: torch.device | str,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.kernels = kernels or Kernels()
        self.config = hf_config
        self.dtype = dtype
        self.num_layers = int(hf_config.num_hidden_layers)
        self.num_kv_heads = int(
            getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        )
        self.head_dim = _head_dim(hf_config)
        self.vocab_size = int(hf_config.vocab_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.rope = rope_parameters(hf_config)
        self.model = LlamaModel(hf_config, dtype, device, self.kernels)
        if not self.tie_word_embeddings:
            self.lm_head = VocabEmbedding(self.vocab_size, hf_config.hidden_size, dtype, device)
        self.inv_freq: torch.Tensor | None = None
        if device.type != "meta":
            self.init_buffers(device)

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute what the checkpoint does not hold (RoPE frequencies) on ``device``.

        The loader builds the model on the meta device, so it calls this after loading.
        """
        max_pos = int(getattr(self.config, "max_position_embeddings", 2048))
        self.inv_freq = rope_inv_freq(self.head_dim, self.rope, max_pos).to(device)  # [Dh / 2]

    def warm_up_lora_fusions(self) -> int:
        """Compile the LoRA kernels fused with the attention block's own work (layers
        share shapes: the first one's launches serve all). Returns the launches made."""
        first = self.model.layers[0]
        assert isinstance(first, LlamaDecoderLayer)
        return first.self_attn.warm_up_fused_qkv_rope()

    def set_kernels(self, kernels: Kernels) -> None:
        """Run every module with ``kernels`` from now on (benchmarks that compare kernel
        settings on one loaded model; CUDA graphs captured before keep the old ones)."""
        for module in self.modules():
            if isinstance(getattr(module, "kernels", None), Kernels):
                setattr(module, "kernels", kernels)  # noqa: B010 (any module type)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        # -> hidden [T, D] after the final norm
        assert self.inv_freq is not None, "init_buffers() was not called"
        # One cos/sin per token for all layers: computed in float32 like HF, then cast to the
        # model dtype once (HF casts at every use; the values are the same).
        freqs = batch.positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return self.model(batch, (emb.cos().to(self.dtype), emb.sin().to(self.dtype)))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> logits [N, V] float32 (matmul in the model dtype, as HF's lm_head)
        return F.linear(hidden, self.lm_head_weight).float()

    # ----- KV cache
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache: [2 (K, V), num_blocks, block_size, Hkv, Dh]."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes over all layers (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def bind_kv_caches(self, caches: list[torch.Tensor]) -> None:
        """One cache per layer, each shaped ``kv_cache_shape(num_blocks, block_size)``."""
        if len(caches) != self.num_layers:
            raise ValueError(f"got {len(caches)} KV caches for {self.num_layers} layers")
        attns = [m for m in self.modules() if isinstance(m, PagedAttention)]
        for attn, cache in zip(attns, caches, strict=True):
            if (
                cache.dim() != 5
                or cache.shape[0] != 2
                or tuple(cache.shape[3:]) != (self.num_kv_heads, self.head_dim)
            ):
                raise ValueError(
                    f"KV cache shape {tuple(cache.shape)} is not [2, blocks, block_size, "
                    f"{self.num_kv_heads}, {self.head_dim}]"
                )
            attn.kv_cache = cache

    # ----- LoRA
    def lora_layers(self) -> dict[str, LoRALinear]:
        """Every LoRA-capable projection, keyed like ``model.layers.3.self_attn.qkv_proj``."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _attention_bias(cfg: Any) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias): Qwen2 has q/k/v bias only; Llama's attention_bias covers o too."""
    if getattr(cfg, "model_type", None) == "qwen2":
        return True, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def _sliding_window(cfg: Any, layer_idx: int) -> int | None:
    """The layer's attention window, or None for full attention (as transformers decides it)."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:  # Qwen2: per layer, from use_sliding_window / max_window_layers
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(cfg, "model_type", None) == "qwen2" and not getattr(
        cfg, "use_sliding_window", False
    ):
        return None
    return int(window)

"""Small random checkpoints with a real tokenizer and real PEFT adapters, built offline.

``make_tiny_model`` writes what tests and demos need: a Llama-family checkpoint in Hugging
Face's exact layout (config.json, generation_config.json, safetensors, sharded with an
index for ``arch="llama"``), a byte-level BPE tokenizer trained here on the text below,
and N LoRA adapters in PEFT's exact on-disk format (``adapter_config.json`` +
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_{A,B}.weight`` keys).
PEFT is not needed to write them; a test proves PEFT loads them.

Weights are scaled so that logits spread over several units (greedy decoding has clear
winners, so float32 engines agree token for token) and LoRA B matrices are non-zero and
large enough that every adapter visibly changes the output.

``make_random_model(out_dir, shape="llama-3.2-1b")`` writes the same layout at a real
model's shape for benchmarks (random weights; the tokenizer covers only the first ids).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ARCHS = ("llama", "qwen2", "mistral")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a checkpoint; ``vocab_size=None`` means the trained tokenizer's size."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE."""
    tie_word_embeddings: bool | None = None
    """None: the architecture's default (llama/mistral untied, qwen2 tied)."""
    rms_norm_eps: float = 1e-5


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(),
    "llama-3.2-1b": ModelShape(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.1-8b": ModelShape(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # For tensor-parallel benchmarks only (140 GB of bf16 weights: N >= 4 H100s).
    "llama-3.1-70b": ModelShape(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


@dataclass(frozen=True)
class AdapterSpec:
    """One PEFT LoraConfig, with the fields that change what the adapter computes."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        return self.rank_pattern.get(module, self.r)

    def scaling(self, module: str) -> float:
        r = self.rank(module)
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)


def adapter_specs(num_adapters: int, num_layers: int) -> list[AdapterSpec]:
    """Adapters that together cover what PEFT varies: ranks cycle 8, 16, 32, 8, ...;
    targets cycle q+v / all attention / all seven / mlp only; #1 uses rsLoRA, #2 a
    rank_pattern, #3 only the last layer (layers_to_transform)."""
    ranks = (8, 16, 32, 8)
    alphas = (16.0, 32.0, 64.0, 8.0)
    targets = (("q_proj", "v_proj"), _ATTN, LORA_MODULES, _MLP)
    specs = []
    for i in range(num_adapters):
        spec = AdapterSpec(r=ranks[i % 4], lora_alpha=alphas[i % 4], target_modules=targets[i % 4])
        if i % 4 == 1:
            spec = replace(spec, use_rslora=True)
        elif i % 4 == 2:
            spec = replace(spec, rank_pattern={"down_proj": 8})
        elif i % 4 == 3:
            spec = replace(spec, layers_to_transform=(num_layers - 1,))
        specs.append(spec)
    return specs


def make_tiny_model(
    out_dir: str | Path,
    num_adapters: int = 4,
    arch: str = "llama",
    seed: int = 0,
    *,
    shape: ModelShape | str = "tiny",
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool | None = None,
    sliding_window: int | None = None,
    num_shards: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random ``arch`` checkpoint, a trained tokenizer and ``num_adapters`` PEFT
    adapters (under ``out_dir/adapters/lora<i>``) to ``out_dir``; returns ``out_dir``.

    arch: llama (untied, 2 shards + index), qwen2 (q/k/v bias, tied, one file) or mistral
    (sliding window ``sliding_window or 8``, one file). Keyword arguments override the shape.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is invalid: allowed {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = SHAPES[shape] if isinstance(shape, str) else shape
    if rope_scaling is not None:
        base = replace(base, rope_scaling=rope_scaling)
    if tie_word_embeddings is not None:
        base = replace(base, tie_word_embeddings=tie_word_embeddings)

    specials = write_tokenizer(out, arch, vocab_size=base.vocab_size or 1024)
    vocab_size = base.vocab_size or specials["vocab_size"]
    hf_config = _hf_config(
        arch, replace(base, vocab_size=vocab_size), specials, dtype, sliding_window
    )
    hf_config.save_pretrained(out)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": specials["bos_token_id"],
            "eos_token_id": specials["generation_eos_token_id"],
            "pad_token_id": specials["pad_token_id"],
        },
    )

    gen = torch.Generator().manual_seed(seed)
    if num_shards is None:
        num_shards = 2 if arch == "llama" else 1
    write_weights(out, base_weight_specs(hf_config), gen, dtype, num_shards)
    for i, spec in enumerate(adapter_specs(num_adapters, hf_config.num_hidden_layers)):
        write_adapter(
            out / "adapters" / f"lora{i}", hf_config, spec, seed=seed * 1000 + i + 1, dtype=dtype
        )
    return out


def make_random_model(
    out_dir: str | Path,
    shape: ModelShape | str = "llama-3.2-1b",
    seed: int = 0,
    num_adapters: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """A random checkpoint at a real model's shape (for benchmarks), sharded like HF's."""
    base = SHAPES[shape] if isinstance(shape, str) else shape
    hidden, inter, layers = base.hidden_size, base.intermediate_size, base.num_hidden_layers
    approx_params = (base.vocab_size or 1024) * hidden * 2 + layers * (
        4 * hidden * hidden + 3 * hidden * inter
    )
    elem = torch.empty((), dtype=dtype).element_size()
    shards = max(1, math.ceil(approx_params * elem / max_shard_bytes))
    return make_tiny_model(
        out_dir, num_adapters, "llama", seed, shape=base, num_shards=shards, dtype=dtype
    )


# ----------------------------------------------------------------------------- tokenizer

_TEXT = """\
The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the
river, there lived an old clockmaker who mended every clock in the valley. In the beginning
the model said that the answer to everything was hidden in plain sight, and the children
laughed, because they thought the answer was forty-two.

Every morning the clockmaker opened his shop at seven o'clock. He swept the floor, wound the
great clock on the wall, and drank a cup of tea with honey. People came from far away with
broken watches, silent cuckoo clocks and music boxes that no longer played. He listened to
each one as if it were telling him a story, and then he set to work.

The river was wide and slow in summer, fast and cold in spring. Fishermen sat on the bank
with long rods, and the baker's daughter sold bread and apples from a wooden cart. When the
rain came, everyone hurried under the old stone bridge and waited, talking about the
weather, the harvest, the price of flour and the new school that was being built.

One day a traveller arrived with a strange machine. It had no hands and no face, only a row
of small lights that blinked in patterns. "It answers questions," she said, "but only if you
ask them clearly." The clockmaker asked it what time it was. The lights blinked, and the
machine printed a single word on a strip of paper: now.

Language models learn to predict the next word from the words before it. They read a great
deal of text, count which words follow which, and slowly build a picture of the world out of
sentences. A small model knows very little; a large one can write letters, summarise books,
translate between languages and answer questions about science, history and mathematics.

Serving many users at once is a different problem. Requests arrive at random times, each
with its own prompt and its own length. A good server keeps the processor busy, shares
memory between requests in small blocks, and lets each user choose a different adapter, so
that one base model can speak in many voices: a helpful assistant, a careful lawyer, a
patient teacher or a poet who only writes about the sea.

Numbers matter too: 0 1 2 3 4 5 6 7 8 9 10 100 1000, 3.14 and 2.71, 50% and $20. Questions
end with a question mark? Exclamations end with a bang! Lists use commas, semicolons; and
colons: first, second, third. Code looks like def main(): return {"key": [1, 2, 3]}.
"""

_LLAMA_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_QWEN_SPECIALS = {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "eos": "<|im_end|>"}
_LLAMA_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(out: Path, arch: str, vocab_size: int = 1024) -> dict[str, Any]:
    """Train a byte-level BPE on ``_TEXT`` and save it in transformers' layout.

    Llama-style tokenizers prepend ``<s>``; the Qwen2-style one adds nothing and uses ChatML
    special tokens, as the real ones do. Returns the special token ids and the vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _QWEN_SPECIALS if arch == "qwen2" else _LLAMA_SPECIALS
    gen_eos: int | list[int]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer)
    ids: dict[str, int] = {}
    for key, token in specials.items():
        token_id = tok.token_to_id(token)
        assert token_id is not None, token  # trainer special tokens are always in the vocab
        ids[key] = token_id
    if arch == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        token_map = {"eos_token": specials["eos"], "pad_token": specials["pad"]}
        template = _CHATML
        bos_id, gen_eos = ids["pad"], [ids["eos"], ids["pad"]]
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["bos"])]
        )
        token_map = {k + "_token": specials[k] for k in ("bos", "eos", "unk", "pad")}
        template = _LLAMA_CHAT
        bos_id, gen_eos = ids["bos"], ids["eos"]
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
            "chat_template": template,
            **token_map,
        },
    )
    _write_json(out / "special_tokens_map.json", token_map)
    return {
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": bos_id,
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "generation_eos_token_id": gen_eos,
    }


# ----------------------------------------------------------------------------- weights


def _hf_config(
    arch: str,
    shape: ModelShape,
    specials: dict[str, Any],
    dtype: torch.dtype,
    sliding_window: int | None,
) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    rope: dict[str, Any] = {"rope_type": "default", **(shape.rope_scaling or {})}
    rope["rope_theta"] = shape.rope_theta
    kwargs: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim or shape.hidden_size // shape.num_attention_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": rope,
        "bos_token_id": specials["bos_token_id"],
        "eos_token_id": specials["eos_token_id"],
        "pad_token_id": specials["pad_token_id"],
        "tie_word_embeddings": shape.tie_word_embeddings
        if shape.tie_word_embeddings is not None
        else arch == "qwen2",
        "dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **kwargs)
    if arch == "mistral":
        return MistralConfig(
            architectures=["MistralForCausalLM"], sliding_window=sliding_window or 8, **kwargs
        )
    kwargs.pop("head_dim")  # Qwen2 derives it
    return Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **kwargs)


def base_weight_specs(cfg: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) for every tensor of the checkpoint."""
    d, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    dh = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh
    qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, d), "embed")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,), "norm"),
            (p + "self_attn.q_proj.weight", (q, d), "linear"),
            (p + "self_attn.k_proj.weight", (kv, d), "linear"),
            (p + "self_attn.v_proj.weight", (kv, d), "linear"),
            (p + "self_attn.o_proj.weight", (d, q), "linear"),
            (p + "post_attention_layernorm.weight", (d,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, d), "linear"),
            (p + "mlp.up_proj.weight", (inter, d), "linear"),
            (p + "mlp.down_proj.weight", (d, inter), "linear"),
        ]
        if qkv_bias:
            specs += [
                (p + f"self_attn.{n}_proj.bias", (s,), "bias")
                for n, s in (("q", q), ("k", kv), ("v", kv))
            ]
    specs.append(("model.norm.weight", (d,), "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", (v, d), "lm_head"))
    return specs


def _random(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "norm":
        return 1.0 + 0.1 * x  # not all ones, so a norm weight that fails to load shows
    if kind == "linear":
        return x / math.sqrt(shape[1])  # keeps activations at unit scale through the layers
    if kind == "bias":
        return 0.5 * x
    if kind == "lm_head":
        return x * (4.0 / math.sqrt(shape[1]))  # logits spread over ~4 units
    return x  # embed: unit scale; tied, its logits spread over ~sqrt(hidden) units


def write_weights(
    out: Path,
    specs: list[tuple[str, tuple[int, ...], str]],
    gen: torch.Generator,
    dtype: torch.dtype,
    num_shards: int = 1,
) -> None:
    """Random tensors in HF's layout: one ``model.safetensors``, or shards plus an index.

    Tensors are generated one shard at a time so big shapes never sit in memory at once.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [math.prod(s) * elem for _, s, _ in specs]
    total = sum(sizes)
    groups: list[list[int]] = [[] for _ in range(num_shards)]
    acc = 0
    for i, size in enumerate(sizes):  # contiguous groups of about equal bytes
        groups[min(num_shards - 1, acc * num_shards // max(total, 1))].append(i)
        acc += size
    groups = [g for g in groups if g]
    weight_map: dict[str, str] = {}
    for n, group in enumerate(groups, start=1):
        fname = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {specs[i][0]: _random(specs[i][1], specs[i][2], gen).to(dtype) for i in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    if len(groups) > 1:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )


# ----------------------------------------------------------------------------- adapters


def write_adapter(
    out: Path, cfg: Any, spec: AdapterSpec, seed: int, dtype: torch.dtype = torch.float32
) -> None:
    """A LoRA adapter exactly as ``PeftModel.save_pretrained`` writes it for a CausalLM."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.intermediate_size
    dh = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh
    dims = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    layers = spec.layers_to_transform or tuple(range(cfg.num_hidden_layers))
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for module in LORA_MODULES:
            if module not in spec.target_modules:
                continue
            parent = "self_attn" if module in _ATTN else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            (fan_in, fan_out), r = dims[module], spec.rank(module)
            a = torch.randn(r, fan_in, generator=gen) / math.sqrt(
                fan_in
            )  # [r, in]: A x ~ unit scale
            # [out, r]: scaling * B A x comes out at about half the base output's scale.
            b = torch.randn(fan_out, r, generator=gen) * (
                0.5 / (math.sqrt(r) * spec.scaling(module))
            )
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = b.to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", _peft_config(spec))


def _peft_config(spec: AdapterSpec) -> dict[str, Any]:
    """The adapter_config.json fields PEFT's LoraConfig writes (defaults where unused)."""
    fields = asdict(spec)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": list(spec.layers_to_transform) if spec.layers_to_transform else None,
        "lora_alpha": spec.lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": fields["rank_pattern"],
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

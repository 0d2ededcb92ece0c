"""Our Llama-family model against transformers, float32 on CPU, through the paged KV cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import EngineArgs
from engine.errors import AdapterUnsupported, UnsupportedModel
from engine.model.llama import (
    SUPPORTED_ARCHITECTURES,
    LlamaForCausalLM,
    get_model_class,
    lora_target,
    rope_inv_freq,
    rope_parameters,
)
from engine.model.loader import CheckpointError, load_model, load_model_from_dir
from engine.testing.forward import PagedDriver
from engine.testing.tiny import ModelShape, make_random_model, make_tiny_model

PROMPT = "Once upon a time, in a small village by the river, there lived"
BLOCK_SIZE = 4  # small, so every sequence spans several blocks


def load_ours(model_dir: Path, **kernel_args: object) -> LlamaForCausalLM:
    args = EngineArgs(
        model=str(model_dir), device="cpu", dtype="float32", disable_log_stats=True, **kernel_args
    )
    return load_model(args.create_engine_config())


class HF:
    """transformers' model and tokenizer for a checkpoint, computing full-context logits."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0]  # [S, V]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # 1e-4 relative to the logits' scale (their largest magnitude).
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def prefill_then_decode(model_dir: Path, num_decode: int = 6) -> None:
    hf = HF(model_dir)
    driver = PagedDriver(load_ours(model_dir), num_blocks=64, block_size=BLOCK_SIZE)
    ids = hf.tokenizer.encode(PROMPT)
    assert len(ids) > 3 * BLOCK_SIZE
    ref = hf.logits(ids)
    assert_logits_close(driver.step({"s": ids})["s"], ref)  # every prompt position
    for _ in range(num_decode):
        ids.append(int(ref[-1].argmax()))
        ref = hf.logits(ids)
        assert_logits_close(driver.step({"s": ids[-1:]})["s"][0], ref[-1])


def test_llama_prefill_then_decode_matches_transformers(tiny_model_dir: Path) -> None:
    prefill_then_decode(tiny_model_dir)


def test_qwen2_with_bias_and_tied_embeddings_matches_transformers(tiny_qwen_dir: Path) -> None:
    assert "lm_head.weight" not in load_file(tiny_qwen_dir / "model.safetensors")
    prefill_then_decode(tiny_qwen_dir)


def test_sequences_of_different_lengths_batched_together_match_transformers(
    tiny_model_dir: Path,
) -> None:
    hf = HF(tiny_model_dir)
    driver = PagedDriver(load_ours(tiny_model_dir), num_blocks=64, block_size=BLOCK_SIZE)
    seqs = {
        "long": hf.tokenizer.encode(PROMPT),
        "short": hf.tokenizer.encode("The quick brown"),
        "chunked": hf.tokenizer.encode("In the beginning the model said that the answer"),
    }
    half = len(seqs["chunked"]) // 2
    ctx: dict[str, list[int]] = {name: [] for name in seqs}  # what each sequence has been fed
    # Step 1: two whole prompts and the first chunk of a third; step 2: two decodes next to
    # the rest of the chunked prompt; steps 3-5: all three decode together.
    work = {"long": seqs["long"], "short": seqs["short"], "chunked": seqs["chunked"][:half]}
    for step in range(5):
        out = driver.step(work)
        refs = {}
        for name, new in work.items():
            ctx[name] = ctx[name] + new
            refs[name] = hf.logits(ctx[name])
            assert_logits_close(out[name], refs[name][-len(new) :])
        work = {name: [int(ref[-1].argmax())] for name, ref in refs.items()}
        if step == 0:
            work["chunked"] = seqs["chunked"][half:]


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so tiny head_dim's wavelengths fall in all three bands (kept, smoothed, scaled).
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama3-rope": {"arch": "llama", "rope_scaling": LLAMA3_ROPE},
    "linear-rope": {"arch": "llama", "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama-tied": {"arch": "llama", "tie_word_embeddings": True, "num_shards": 1},
    "mistral-sliding-window": {"arch": "mistral", "sliding_window": 6},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_variant_matches_transformers(variant: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, num_adapters=0, seed=3, **VARIANTS[variant])
    prefill_then_decode(model_dir, num_decode=3)


def test_llama3_rope_scaling_changes_frequencies() -> None:
    default = rope_inv_freq(16, {"rope_type": "default", "rope_theta": 10000.0}, 1024)
    scaled = rope_inv_freq(16, {**LLAMA3_ROPE, "rope_theta": 10000.0}, 1024)
    wavelen = 2 * math.pi / default
    assert torch.equal(scaled[wavelen < 16], default[wavelen < 16])  # high frequencies kept
    assert torch.allclose(scaled[wavelen > 64], default[wavelen > 64] / 8)  # low ones scaled
    medium = (wavelen >= 16) & (wavelen <= 64)
    assert medium.any()
    assert ((scaled[medium] < default[medium]) & (scaled[medium] > default[medium] / 8)).all()


def test_sliding_window_limits_attention(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, num_adapters=0, arch="mistral", sliding_window=6)
    model = load_ours(model_dir)
    ids = HF(model_dir).tokenizer.encode(PROMPT)
    windowed = PagedDriver(model, 64, BLOCK_SIZE).step({"s": ids})["s"]
    for layer in model.model.layers:
        layer.self_attn.attn.sliding_window = None
    full = PagedDriver(model, 64, BLOCK_SIZE).step({"s": ids})["s"]
    torch.testing.assert_close(windowed[:6], full[:6])  # inside the window: identical
    assert (windowed[6:] - full[6:]).abs().amax(-1).min() > 1e-3  # beyond it: every row differs


def test_rope_parameters_are_read_from_old_and_new_configs() -> None:
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters(old) == {
        "type": "linear",
        "factor": 2.0,
        "rope_type": "linear",
        "rope_theta": 500000.0,
    }
    new = SimpleNamespace(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})
    assert rope_parameters(new) == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert rope_parameters(SimpleNamespace()) == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModel, match="yarn"):
        rope_parameters(SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_unsupported_architecture_names_the_supported_ones(tiny_model_dir: Path) -> None:
    with pytest.raises(UnsupportedModel) as info:
        get_model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    assert "GPT2LMHeadModel" in str(info.value)
    assert all(a in str(info.value) for a in SUPPORTED_ARCHITECTURES)
    assert info.value.code == "unsupported_model"
    cfg = EngineArgs(model=str(tiny_model_dir), device="cpu").create_engine_config().hf_config
    cfg.architectures = ["Qwen3ForCausalLM"]
    with pytest.raises(UnsupportedModel, match="Qwen3ForCausalLM"):
        load_model_from_dir(tiny_model_dir, cfg, torch.float32, "cpu")


def test_model_type_is_enough_when_architectures_is_missing() -> None:
    assert (
        get_model_class(SimpleNamespace(architectures=None, model_type="mistral"))
        is LlamaForCausalLM
    )


@pytest.fixture
def qwen_copy(tiny_qwen_dir: Path, tmp_path: Path) -> Path:
    """The Qwen2 checkpoint (one safetensors file) without tokenizer or adapters."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_qwen_dir / name, tmp_path / name)
    return tmp_path


def _rewrite(
    path: Path, drop: str | None = None, replace: dict[str, torch.Tensor] | None = None
) -> None:
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    tensors.update(replace or {})
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(qwen_copy: Path) -> None:
    _rewrite(qwen_copy / "model.safetensors", drop="model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(
        CheckpointError, match=r"1 missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        load_ours(qwen_copy)


def test_shape_mismatch_names_tensor_and_shapes(qwen_copy: Path) -> None:
    _rewrite(
        qwen_copy / "model.safetensors",
        replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)},
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.mlp\.up_proj\.weight: checkpoint \[100, 64\], model expects \[128, 64\]",
    ):
        load_ours(qwen_copy)


def test_missing_files_are_reported(
    tiny_model_dir: Path, qwen_copy: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (qwen_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_ours(qwen_copy)
    sharded = tmp_path_factory.mktemp("sharded")
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        shutil.copy(tiny_model_dir / name, sharded / name)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        load_ours(sharded)


def test_sharded_checkpoint_loads_every_shard(tiny_model_dir: Path) -> None:
    weight_map = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    assert len(set(weight_map.values())) == 2
    model = load_ours(tiny_model_dir)
    norm = load_file(tiny_model_dir / weight_map["model.norm.weight"])["model.norm.weight"]
    embed = load_file(tiny_model_dir / weight_map["model.embed_tokens.weight"])[
        "model.embed_tokens.weight"
    ]
    assert torch.equal(model.model.norm.weight, norm)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not model.tie_word_embeddings
    assert not any(p.device.type == "meta" for p in model.parameters())


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
            ("model.layers.3.self_attn.qkv_proj", 0),
        ),
        (
            "base_model.model.model.layers.3.self_attn.k_proj",
            ("model.layers.3.self_attn.qkv_proj", 1),
        ),
        ("model.layers.0.self_attn.v_proj", ("model.layers.0.self_attn.qkv_proj", 2)),
        ("model.layers.12.self_attn.o_proj.lora_B.weight", ("model.layers.12.self_attn.o_proj", 0)),
        ("model.layers.1.mlp.gate_proj", ("model.layers.1.mlp.gate_up_proj", 0)),
        ("model.layers.1.mlp.up_proj.lora_A.weight", ("model.layers.1.mlp.gate_up_proj", 1)),
        ("model.layers.1.mlp.down_proj", ("model.layers.1.mlp.down_proj", 0)),
    ],
)
def test_lora_target_maps_peft_names_to_fused_slices(name: str, expected: tuple[str, int]) -> None:
    assert lora_target(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.mlp.q_proj",
        "model.layers.0.self_attn.qkv_proj",
    ],
)
def test_lora_target_rejects_other_modules(name: str) -> None:
    with pytest.raises(AdapterUnsupported):
        lora_target(name)


def test_lora_layers_cover_every_target_slice(tiny_model_dir: Path) -> None:
    model = load_ours(tiny_model_dir)
    layers = model.lora_layers()
    assert len(layers) == 4 * model.num_layers
    for i in range(model.num_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key, idx = lora_target(f"model.layers.{i}.{parent}.{proj}")
            assert layers[key].slice_names[idx] == proj


def load_adapter_into(model: LlamaForCausalLM, adapter_dir: Path, slot: int) -> None:
    """Minimal PEFT -> slot loading through lora_target (the adapter manager does it for real)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    layers = model.lora_layers()
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        r = a.shape[0]  # rank_pattern already shaped the tensors
        scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
        layer_key, idx = lora_target(key)
        layers[layer_key].set_lora(slot, idx, a, b * scaling)


@pytest.mark.parametrize("paths", ["torch", "kernels", "kernels+fused_rope"])
def test_adapters_in_one_batch_match_peft(tiny_model_dir: Path, paths: str) -> None:
    """Five sequences on four adapters and none, in one prefill step, against PEFT. With
    ``kernels`` the model runs its Triton paths (interpreted on CPU): every LoRA layer takes
    the GEMM over A stored under W, whose strided outputs feed RoPE, attention, the norms
    and the next projections."""
    from peft import PeftModel

    kernel_args: dict[str, object] = {}
    if paths.startswith("kernels"):
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors need Triton's interpreter (on CUDA: test_matches_peft)")
        kernel_args = {
            "kernel_backend": "triton",
            # q/k/v's expand, RoPE and the cache write as one kernel (lora_qkv_triton)
            "lora_fused_qkv_rope": paths.endswith("fused_rope"),
        }
    adapters = sorted((tiny_model_dir / "adapters").iterdir())
    model = load_ours(tiny_model_dir, **kernel_args)
    for layer in model.lora_layers().values():
        layer.create_lora_buffers(max_loras=len(adapters), max_rank=32, dtype=torch.float32)
        assert layer.can_stack_a
    # Slots in reverse order, so slot != adapter index.
    slots = {a.name: len(adapters) - 1 - i for i, a in enumerate(adapters)}
    for a in adapters:
        load_adapter_into(model, a, slots[a.name])

    hf = HF(tiny_model_dir)
    peft = PeftModel.from_pretrained(hf.model, adapters[0], adapter_name=adapters[0].name)
    for a in adapters[1:]:
        peft.load_adapter(a, adapter_name=a.name)
    prompts = {a.name: hf.tokenizer.encode(PROMPT[: 20 + 7 * i]) for i, a in enumerate(adapters)}
    prompts["base"] = hf.tokenizer.encode(PROMPT)
    driver = PagedDriver(model, 64, BLOCK_SIZE, lora_kernel_layout=paths != "torch")
    out = driver.step(prompts, lora_slots=slots)
    with torch.no_grad():
        for name, ids in prompts.items():
            if name == "base":
                with peft.disable_adapter():
                    ref = peft(torch.tensor([ids])).logits[0]
            else:
                peft.set_adapter(name)
                ref = peft(torch.tensor([ids])).logits[0]
                with peft.disable_adapter():
                    base = peft(torch.tensor([ids])).logits[0]
                assert (ref - base).abs().max() > 0.5  # the adapter matters
            assert_logits_close(out[name], ref)


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_shape_and_bytes(tiny_model_dir: Path) -> None:
    model = load_ours(tiny_model_dir)
    assert model.kv_cache_shape(10, 16) == (2, 10, 16, 2, 16)
    assert model.kv_bytes_per_block(16) == 2 * 16 * 2 * 16 * 4 * model.num_layers
    with pytest.raises(ValueError, match="KV caches"):
        model.bind_kv_caches([torch.zeros(model.kv_cache_shape(4, 4))])
    with pytest.raises(ValueError, match="KV cache shape"):
        model.bind_kv_caches([torch.zeros(2, 4, 4, 3, 16)] * model.num_layers)


def test_random_model_at_a_given_shape_loads_from_many_shards(tmp_path: Path) -> None:
    shape = ModelShape(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=3000,
    )
    model_dir = make_random_model(
        tmp_path, shape=shape, dtype=torch.bfloat16, max_shard_bytes=100_000
    )
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    args = EngineArgs(model=str(model_dir), device="cpu", dtype="auto", disable_log_stats=True)
    config = args.create_engine_config()
    assert config.dtype == torch.bfloat16
    model = load_model(config)
    assert model.model.embed_tokens.weight.shape == (3000, 32)
    logits = PagedDriver(model, 8, BLOCK_SIZE).step({"s": [1, 2, 3, 4, 5]})["s"]
    assert logits.dtype == torch.float32
    assert logits.shape == (5, 3000)
    assert logits.isfinite().all()

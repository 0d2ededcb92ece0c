"""Adapters written by real PEFT load into A/B pairs that reproduce PEFT's module outputs;
every way an adapter can be wrong is refused with a specific, path-naming error."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engine.config import LoRAConfig
from engine.errors import (
    AdapterCorrupt,
    AdapterError,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    AdapterUnsupported,
)
from engine.lora.layers import LoRALinear
from engine.lora.peft import (
    LoRAWeights,
    load_adapter,
    lora_targets_from_layers,
    read_adapter_config,
)

HIDDEN = 32
INTERMEDIATE = 64
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- helpers
def make_base(hidden: int = HIDDEN, layers: int = 2) -> LlamaForCausalLM:
    """The same weights every call (adapters of one base must share it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=INTERMEDIATE,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def make_adapter(
    out_dir: Path, seed: int = 1, hidden: int = HIDDEN, safe: bool = True, **lora: Any
) -> PeftModel:
    """A PEFT adapter saved to ``out_dir``, with non-zero lora_B (PEFT starts it at zero)."""
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ALL_MODULES)
    model = get_peft_model(make_base(hidden), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out_dir, safe_serialization=safe)
    return model.eval()


def make_layers(model: nn.Module, num_layers: int | None = None) -> dict[str, LoRALinear]:
    """LoRALinear layers keyed as the engine's model does, holding ``model``'s base weights."""
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    blocks = hf.model.layers[:num_layers]
    layers: dict[str, LoRALinear] = {}

    def fuse(key: str, parent: nn.Module, names: list[str]) -> None:
        mods = [getattr(parent, n) for n in names]
        weights = [getattr(m, "base_layer", m).weight for m in mods]
        layer = LoRALinear(
            weights[0].shape[1], [w.shape[0] for w in weights], names, dtype=torch.float32
        )
        with torch.no_grad():
            layer.weight.copy_(torch.cat(weights))
        layers[key] = layer

    for i, block in enumerate(blocks):
        fuse(
            f"model.layers.{i}.self_attn.qkv_proj", block.self_attn, ["q_proj", "k_proj", "v_proj"]
        )
        fuse(f"model.layers.{i}.self_attn.o_proj", block.self_attn, ["o_proj"])
        fuse(f"model.layers.{i}.mlp.gate_up_proj", block.mlp, ["gate_proj", "up_proj"])
        fuse(f"model.layers.{i}.mlp.down_proj", block.mlp, ["down_proj"])
    return layers


def lora_config(**kw: Any) -> LoRAConfig:
    kw = {
        "max_loras": 2,
        "max_lora_rank": 16,
        "max_cpu_loras": 2,
        "lora_dtype": torch.float32,
        **kw,
    }
    return LoRAConfig(**kw)


@torch.no_grad()
def peft_delta(model: PeftModel, module: str, x: torch.Tensor) -> torch.Tensor:
    """What PEFT's LoRA adds to the base output of ``module``."""
    mod = model.get_base_model().get_submodule(module)
    return mod(x) - getattr(mod, "base_layer", mod)(x)


def assert_matches_peft(
    weights: LoRAWeights, model: PeftModel, shapes: Mapping[str, tuple[str, int, int, int]]
) -> None:
    gen = torch.Generator().manual_seed(7)
    for module, (layer_key, slice_idx, in_features, _) in shapes.items():
        x = torch.randn(5, in_features, generator=gen)
        expected = peft_delta(model, module, x)
        if (layer_key, slice_idx) in weights.tensors:
            a, b = weights.tensors[(layer_key, slice_idx)]
            got = x @ a.t() @ b.t()
        else:
            got = torch.zeros_like(expected)
        torch.testing.assert_close(
            got, expected, atol=1e-5, rtol=0, msg=lambda m, module=module: f"{module}: {m}"
        )


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[str, int, int, int]]:
    return lora_targets_from_layers(make_layers(make_base()))


def rewrite_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def rewrite_tensors(path: Path, fn: Any) -> None:
    f = path / "adapter_model.safetensors"
    save_file(fn(load_file(f)), f)


# ---------------------------------------------------------------------------- base model
def test_targets_from_layers_name_every_slice(shapes):
    assert len(shapes) == 2 * 7
    assert shapes["model.layers.0.self_attn.q_proj"] == (
        "model.layers.0.self_attn.qkv_proj",
        0,
        32,
        32,
    )
    assert shapes["model.layers.0.self_attn.k_proj"] == (
        "model.layers.0.self_attn.qkv_proj",
        1,
        32,
        16,
    )
    assert shapes["model.layers.1.self_attn.v_proj"] == (
        "model.layers.1.self_attn.qkv_proj",
        2,
        32,
        16,
    )
    assert shapes["model.layers.1.mlp.up_proj"] == ("model.layers.1.mlp.gate_up_proj", 1, 32, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == ("model.layers.1.mlp.down_proj", 0, 64, 32)


def test_targets_from_layers_accepts_a_model():
    layers = make_layers(make_base())
    model = type("M", (), {"lora_layers": lambda self: layers})()
    assert lora_targets_from_layers(model) == lora_targets_from_layers(layers)


# ---------------------------------------------------------------------------- equality with PEFT
VARIANTS: dict[str, dict[str, Any]] = {
    "all_modules": {"r": 8, "lora_alpha": 16},
    "rslora": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "rank_and_alpha_pattern": {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"v_proj": 3, r"model\.layers\.0\.self_attn\.o_proj": 32},
    },
    "rslora_with_patterns": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"k_proj": 5},
    },
    "layers_to_transform": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "layers_to_transform": [1],
    },
    "regex_target_modules": {
        "target_modules": r".*\.layers\.0\.(self_attn\.k_proj|mlp\.gate_proj)"
    },
    # Python's \Z: RE2 spells it \z.
    "regex_end_of_text": {"target_modules": r".*\.layers\.1\.(self_attn\.v|mlp\.up)_proj\Z"},
    "full_module_names": {"target_modules": ["model.layers.0.self_attn.q_proj", "up_proj"]},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_reproduces_peft_module_outputs(tmp_path, shapes, variant):
    model = make_adapter(tmp_path, **VARIANTS[variant])
    weights = load_adapter(tmp_path, lora_config(), shapes)
    assert_matches_peft(weights, model, shapes)
    for a, b in weights.tensors.values():
        assert a.dtype == b.dtype == torch.float32
        assert a.device.type == b.device.type == "cpu"
    assert weights.nbytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in weights.tensors.values())


def test_patterns_decide_rank_per_module(tmp_path, shapes):
    make_adapter(tmp_path, **VARIANTS["rank_and_alpha_pattern"])
    cfg = read_adapter_config(tmp_path, lora_config(), shapes)
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.1.mlp.down_proj") == 6
    assert cfg.rank_for("model.layers.0.mlp.down_proj") == 4
    assert cfg.alpha_for("model.layers.0.self_attn.o_proj") == 32
    assert cfg.alpha_for("model.layers.1.self_attn.o_proj") == 8
    weights = load_adapter(tmp_path, lora_config(), shapes)
    assert weights.rank == 6
    assert weights.tensors[("model.layers.0.self_attn.qkv_proj", 0)][0].shape == (2, 32)


def test_adapter_touching_some_layers_only_has_no_tensors_elsewhere(tmp_path, shapes):
    make_adapter(tmp_path, **VARIANTS["layers_to_transform"])
    weights = load_adapter(tmp_path, lora_config(), shapes)
    assert set(weights.tensors) == {
        ("model.layers.1.self_attn.qkv_proj", 0),
        ("model.layers.1.self_attn.qkv_proj", 2),
        ("model.layers.1.mlp.down_proj", 0),
    }


def test_keys_with_adapter_name_are_accepted(tmp_path, shapes):
    model = make_adapter(tmp_path)
    rewrite_tensors(
        tmp_path,
        lambda sd: {k.replace(".weight", ".default.weight"): v for k, v in sd.items()},
    )
    assert_matches_peft(load_adapter(tmp_path, lora_config(), shapes), model, shapes)


def test_bfloat16_lora_dtype_casts_after_scaling(tmp_path, shapes):
    make_adapter(tmp_path)
    w32 = load_adapter(tmp_path, lora_config(), shapes)
    w16 = load_adapter(tmp_path, lora_config(lora_dtype=torch.bfloat16), shapes)
    for key, (a, b) in w16.tensors.items():
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), w32.tensors[key][1], atol=0, rtol=1e-2)
    assert w16.nbytes * 2 == w32.nbytes


# ---------------------------------------------------------------------------- errors
def raises(exc: type[AdapterError], path: Path, *fragments: str) -> Any:
    """pytest.raises that also checks the message names the adapter and the problem."""

    class _Check:
        def __enter__(self) -> None:
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()

        def __exit__(self, *args: Any) -> bool:
            handled = self.ctx.__exit__(*args)
            msg = str(self.info.value)
            assert str(path) in msg, msg
            for f in fragments:
                assert f in msg, msg
            assert self.info.value.code == exc.code
            return bool(handled)

    return _Check()


def test_missing_directory(tmp_path, shapes):
    with raises(AdapterNotFound, tmp_path / "nope", "does not exist"):
        read_adapter_config(tmp_path / "nope", lora_config())


def test_missing_config(tmp_path, shapes):
    make_adapter(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with raises(AdapterNotFound, tmp_path, "adapter_config.json"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_missing_safetensors(tmp_path, shapes):
    make_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with raises(AdapterNotFound, tmp_path, "adapter_model.safetensors"):
        read_adapter_config(tmp_path, lora_config())


def test_invalid_json(tmp_path, shapes):
    make_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 8,')
    with raises(AdapterCorrupt, tmp_path, "not valid JSON"):
        read_adapter_config(tmp_path, lora_config())


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, shapes, damage):
    make_adapter(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x07not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    read_adapter_config(tmp_path, lora_config(), shapes)  # the JSON is fine: only loading fails
    with raises(AdapterCorrupt, tmp_path, "adapter_model.safetensors"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_rank_too_large(tmp_path, shapes):
    make_adapter(tmp_path, r=32, lora_alpha=32, target_modules=["q_proj"])
    with raises(AdapterRankTooLarge, tmp_path, "32", "max_lora_rank=16"):
        read_adapter_config(tmp_path, lora_config())


def test_rank_pattern_too_large(tmp_path, shapes):
    make_adapter(tmp_path, r=4, rank_pattern={"down_proj": 24})
    with raises(AdapterRankTooLarge, tmp_path, "24", "max_lora_rank=16"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_dora(tmp_path, shapes):
    make_adapter(tmp_path, use_dora=True, target_modules=["q_proj"])
    with raises(AdapterUnsupported, tmp_path, "DoRA"):
        read_adapter_config(tmp_path, lora_config())


def test_bias_all(tmp_path, shapes):
    make_adapter(tmp_path, bias="all", target_modules=["q_proj"])
    with raises(AdapterUnsupported, tmp_path, "bias='all'"):
        read_adapter_config(tmp_path, lora_config())


def test_lora_bias_in_config(tmp_path, shapes):
    make_adapter(tmp_path, lora_bias=True, target_modules=["q_proj"])
    with raises(AdapterUnsupported, tmp_path, "lora_bias"):
        read_adapter_config(tmp_path, lora_config())


def test_lora_bias_tensor_without_config(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=["q_proj"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    rewrite_tensors(tmp_path, lambda sd: {**sd, key: torch.zeros(32)})
    with raises(AdapterUnsupported, tmp_path, "lora_B.bias"):
        load_adapter(tmp_path, lora_config(), shapes)


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_unserved_module_targeted(tmp_path, shapes, module):
    make_adapter(tmp_path, target_modules=["q_proj", module])
    with raises(AdapterUnsupported, tmp_path, module):
        read_adapter_config(tmp_path, lora_config())


def test_regex_reaching_lm_head(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=r".*(q_proj|lm_head)")
    read_adapter_config(tmp_path, lora_config())  # without the model a regex cannot be resolved
    with raises(AdapterUnsupported, tmp_path, "lm_head"):
        read_adapter_config(tmp_path, lora_config(), shapes)


def test_module_outside_engine_target_modules(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=["q_proj", "o_proj"])
    cfg = lora_config(target_modules=("q_proj", "v_proj"))
    with raises(AdapterUnsupported, tmp_path, "o_proj", "lora_target_modules"):
        read_adapter_config(tmp_path, cfg)
    make_adapter(tmp_path, target_modules=r".*\.o_proj")
    with raises(AdapterUnsupported, tmp_path, "o_proj"):
        load_adapter(tmp_path, cfg, shapes)


def test_shape_mismatch_from_other_hidden_size(tmp_path, shapes):
    make_adapter(tmp_path, hidden=48, target_modules=["q_proj"])
    with raises(AdapterShapeMismatch, tmp_path, "q_proj", "in=32", "out=32", "[4, 48]"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_layer_index_beyond_base_model(tmp_path):
    one_layer = lora_targets_from_layers(make_layers(make_base(), num_layers=1))
    make_adapter(tmp_path, target_modules=["v_proj"])
    with raises(AdapterShapeMismatch, tmp_path, "layer 1", "1 layers"):
        load_adapter(tmp_path, lora_config(), one_layer)


def test_layers_to_transform_beyond_base_model(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=["q_proj"], layers_to_transform=[1])
    rewrite_config(tmp_path, layers_to_transform=[1, 5])
    with raises(AdapterShapeMismatch, tmp_path, "[5]", "2 layers"):
        read_adapter_config(tmp_path, lora_config(), shapes)


def test_pickle_bin_is_never_loaded(tmp_path, shapes):
    make_adapter(tmp_path, safe=False)
    with raises(AdapterUnsupported, tmp_path, "adapter_model.bin", "never loaded", "save_file"):
        read_adapter_config(tmp_path, lora_config())


def test_rank_in_weights_differs_from_config(tmp_path, shapes):
    make_adapter(tmp_path, r=4, target_modules=["q_proj"])
    rewrite_config(tmp_path, r=8)
    with raises(AdapterCorrupt, tmp_path, "rank 4", "8"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_missing_lora_b(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=["q_proj"])
    rewrite_tensors(
        tmp_path, lambda sd: {k: v for k, v in sd.items() if "layers.1" not in k or "lora_A" in k}
    )
    with raises(AdapterCorrupt, tmp_path, "model.layers.1.self_attn.q_proj", "lora_B"):
        load_adapter(tmp_path, lora_config(), shapes)


def test_non_lora_tensor(tmp_path, shapes):
    make_adapter(tmp_path, target_modules=["q_proj"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    rewrite_tensors(tmp_path, lambda sd: {**sd, key: torch.ones(32)})
    with raises(AdapterUnsupported, tmp_path, "lora_magnitude_vector"):
        load_adapter(tmp_path, lora_config(), shapes)

"""LoRALinear's batched delta against a per-token loop, and the tiny adapters against PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.lora.layers import LoRALinear
from engine.testing.forward import make_lora_metadata
from engine.testing.tiny import AdapterSpec

IN = 24
SLICES = [16, 8, 8]  # like a GQA qkv_proj
MAX_LORAS, MAX_RANK = 4, 8


def make_layer(slices: list[int], bias: bool, seed: int = 0) -> LoRALinear:
    gen = torch.Generator().manual_seed(seed)
    layer = LoRALinear(
        IN, slices, [f"s{i}" for i in range(len(slices))], bias=bias, dtype=torch.float32
    )
    layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    layer.create_lora_buffers(MAX_LORAS, MAX_RANK, torch.float32)
    return layer


def random_adapters(
    layer: LoRALinear, ranks: dict[int, int], seed: int = 1
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Per slot, per slice: (A [r, in], B [out, r]), or None for a slice the adapter skips."""
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
    for slot, r in ranks.items():
        pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for idx, n in enumerate(layer.out_slices):
            if slot == 1 and idx == 1:  # an adapter on q and v only leaves k alone
                pairs.append(None)
                continue
            a, b = torch.randn(r, IN, generator=gen), torch.randn(n, r, generator=gen)
            layer.set_lora(slot, idx, a, b)
            pairs.append((a, b))
        adapters[slot] = pairs
    return adapters


def per_token_reference(
    layer: LoRALinear, x: torch.Tensor, token_slots: list[int], adapters: dict[int, list]
) -> torch.Tensor:
    rows = []
    for t, slot in enumerate(token_slots):
        y = layer.weight @ x[t] + (layer.bias if layer.bias is not None else 0)
        if slot >= 0:
            deltas = [
                torch.zeros(n) if pair is None else pair[1] @ (pair[0] @ x[t])
                for pair, n in zip(adapters[slot], layer.out_slices, strict=True)
            ]
            y = y + torch.cat(deltas)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize(("slices", "bias"), [(SLICES, True), ([32], False), ([20, 20], False)])
def test_mixed_adapters_match_per_token_loop(slices: list[int], bias: bool) -> None:
    layer = make_layer(slices, bias)
    # Ranks 2, 8 and 5 in slots 0, 1, 3 (slot 2 empty); zero-padded to MAX_RANK in the buffers.
    adapters = random_adapters(layer, {0: 2, 1: 8, 3: 5})
    token_slots = [3, -1, 0, 0, 1, 3, -1, 1, 1, 0, -1, 3]
    x = torch.randn(len(token_slots), IN, generator=torch.Generator().manual_seed(2))
    y = layer(x, make_lora_metadata(token_slots))
    torch.testing.assert_close(
        y, per_token_reference(layer, x, token_slots, adapters), rtol=1e-5, atol=1e-4
    )


def test_tokens_without_adapter_get_the_base_output() -> None:
    layer = make_layer(SLICES, bias=True)
    random_adapters(layer, {0: 4, 1: 8})
    x = torch.randn(5, IN)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base)
    assert torch.equal(layer(x, make_lora_metadata([-1] * 5)), base)
    mixed = layer(x, make_lora_metadata([-1, 0, -1, 1, -1]))
    assert torch.equal(mixed[[0, 2, 4]], base[[0, 2, 4]])
    assert (mixed[[1, 3]] - base[[1, 3]]).abs().max() > 1e-2


def test_smaller_rank_in_a_reused_slot_leaves_nothing_behind() -> None:
    layer = make_layer(SLICES, bias=False)
    random_adapters(layer, {0: 8})
    adapters = random_adapters(layer, {0: 3}, seed=5)  # same slot, smaller rank
    x = torch.randn(4, IN)
    torch.testing.assert_close(
        layer(x, make_lora_metadata([0] * 4)),
        per_token_reference(layer, x, [0] * 4, adapters),
        rtol=1e-5,
        atol=1e-4,
    )
    layer.clear_lora(0)
    assert torch.equal(layer(x, make_lora_metadata([0] * 4)), layer(x))


# ----------------------------------------------------------------------------- tiny adapters


def _adapter_dirs(model_dir: Path) -> list[Path]:
    return sorted(p for p in (model_dir / "adapters").iterdir() if p.is_dir())


def test_tiny_adapters_cover_peft_features(tiny_model_dir: Path) -> None:
    configs = [
        json.loads((d / "adapter_config.json").read_text()) for d in _adapter_dirs(tiny_model_dir)
    ]
    assert len(configs) == 4
    assert [c["r"] for c in configs] == [8, 16, 32, 8]
    assert len({tuple(c["target_modules"]) for c in configs}) == 4
    assert any(c["use_rslora"] for c in configs)
    assert any(c["rank_pattern"] for c in configs)
    assert any(c["layers_to_transform"] for c in configs)
    assert all(c["peft_type"] == "LORA" and c["task_type"] == "CAUSAL_LM" for c in configs)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_tiny_adapters_load_in_peft_and_change_its_output(
    which: str, request: pytest.FixtureRequest
) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir: Path = request.getfixturevalue(
        "tiny_model_dir" if which == "llama" else "tiny_qwen_dir"
    )
    ids = torch.tensor(
        [AutoTokenizer.from_pretrained(model_dir).encode("The quick brown fox jumps over")]
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    adapters = _adapter_dirs(model_dir)
    peft = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0].name)
    for d in adapters[1:]:
        peft.load_adapter(d, adapter_name=d.name)
    for d in adapters:
        # PEFT saves exactly what it loaded: every key of the file, nothing left at its init.
        saved = load_file(d / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(peft, adapter_name=d.name)
        assert loaded.keys() == saved.keys()
        for key, t in saved.items():
            assert torch.equal(loaded[key], t), key
        # PEFT scales each module as AdapterSpec says (rsLoRA and rank_pattern included).
        cfg = json.loads((d / "adapter_config.json").read_text())
        spec = AdapterSpec(
            r=cfg["r"],
            lora_alpha=cfg["lora_alpha"],
            target_modules=tuple(cfg["target_modules"]),
            use_rslora=cfg["use_rslora"],
            rank_pattern=cfg["rank_pattern"],
        )
        for name, module in peft.named_modules():
            if isinstance(module, LoraLayer) and d.name in module.scaling:
                assert module.scaling[d.name] == pytest.approx(
                    spec.scaling(name.rsplit(".", 1)[-1])
                ), name
        peft.set_adapter(d.name)
        with torch.no_grad():
            logits = peft(ids).logits
        assert (logits - base_logits).abs().max() > 1.0, d.name

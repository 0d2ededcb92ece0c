"""GGUF checkpoints load into our model as transformers' own GGUF loading reads them.

The files are written here the way llama.cpp's converter writes them (its tensor names
from the ``gguf`` package, q/k rows permuted for ``llama``, weights quantized by the
``gguf`` package), from the tiny checkpoints; transformers then loads each file itself and
is the reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import EngineArgs
from engine.model.gguf import gguf_config
from engine.model.loader import CheckpointError, load_model
from engine.testing.forward import PagedDriver

PROMPT_IDS = [5, 17, 42, 99, 7, 300, 12, 64, 8, 250, 31, 77, 2, 140]


def write_gguf(hf_dir: Path, out: Path, qtype: str, arch: str | None = None) -> Path:
    """The checkpoint in ``hf_dir`` as a GGUF file; 2-D weights in ``qtype``, norms F32."""
    import gguf
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    arch = arch or cfg.model_type
    q = gguf.GGMLQuantizationType[qtype]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == cfg.model_type)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_bos_token_id(cfg.bos_token_id)
    for name, t in sorted(tensors.items()):
        base, _, suffix = name.rpartition(".")
        if cfg.tie_word_embeddings and base == "lm_head":
            continue
        gguf_name = f"{names.get_name(base)}.{suffix}"
        a = t.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
            n = heads if base.endswith("q_proj") else kv_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


class HF:
    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0]  # [S, V]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize(
    ("fixture", "qtype"),
    [
        ("tiny_model_dir", "F32"),
        ("tiny_model_dir", "Q8_0"),
        ("tiny_model_dir", "Q4_1"),
        ("tiny_model_dir", "BF16"),
        ("tiny_qwen_dir", "F16"),
        ("tiny_qwen_dir", "Q4_0"),
    ],
)
def test_gguf_logits_match_transformers_gguf_loading(request, tmp_path, fixture, qtype):
    hf_dir = request.getfixturevalue(fixture)
    path = write_gguf(hf_dir, tmp_path / f"model-{qtype}.gguf", qtype)
    config = EngineArgs(model=str(path), device="cpu", dtype="float32").create_engine_config()
    assert config.model == str(path)
    hf = HF(path)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):  # fmt: skip
        assert getattr(config.hf_config, key) == getattr(hf.model.config, key), key
    driver = PagedDriver(load_model(config), num_blocks=32, block_size=4)
    ids = list(PROMPT_IDS)
    ref = hf.logits(ids)
    assert_logits_close(driver.step({"s": ids})["s"], ref)
    for _ in range(4):
        ids.append(int(ref[-1].argmax()))
        ref = hf.logits(ids)
        assert_logits_close(driver.step({"s": ids[-1:]})["s"][0], ref[-1])


@pytest.mark.parametrize(
    ("qtype", "expected"),
    [("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)],
)
def test_auto_dtype_follows_the_weights(tiny_model_dir, tmp_path, qtype, expected):
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", qtype)
    # On CPU float16 becomes float32 (the engine's rule for every checkpoint).
    want = torch.float32 if expected == torch.float16 else expected
    assert EngineArgs(model=str(path), device="cpu").create_engine_config().dtype == want
    assert gguf_config(path).dtype == expected


def test_quantized_gguf_defaults_to_float16_weights(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", "Q8_0")
    assert gguf_config(path).dtype == torch.float16


def test_a_directory_holding_one_gguf_is_that_checkpoint(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", "F32")
    assert EngineArgs(model=str(tmp_path), device="cpu").create_engine_config().model == str(path)
    shutil.copy(path, tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match=r"2 GGUF files \(m.gguf, other.gguf\)"):
        EngineArgs(model=str(tmp_path), device="cpu").create_engine_config()


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        EngineArgs(model=str(tmp_path / "gpt2.gguf"), device="cpu").create_engine_config()


def test_a_quant_type_the_gguf_package_cannot_read_is_named(tiny_model_dir, tmp_path):
    import gguf

    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", "F32")
    # Rewrite one tensor as Q8_1 (an activation format gguf-py does not dequantize).
    reader = gguf.GGUFReader(str(path))
    q = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q]
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        if t.name == "blk.0.attn_v.weight":
            rows, cols = t.data.shape
            raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=q)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = EngineArgs(model=str(tmp_path / "q81.gguf"), device="cpu").create_engine_config()
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_v\.weight is Q8_1"):
        load_model(config)


def test_missing_tensor_is_named(tiny_qwen_dir, tmp_path):
    import gguf

    path = write_gguf(tiny_qwen_dir, tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "qwen2")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = EngineArgs(model=str(tmp_path / "cut.gguf"), device="cpu").create_engine_config()
    with pytest.raises(CheckpointError, match=r"1 missing tensors: blk.1.ffn_down.weight"):
        load_model(config)

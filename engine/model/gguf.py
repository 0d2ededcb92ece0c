"""GGUF checkpoints (llama.cpp's one-file format), read with the ``gguf`` package.

A ``.gguf`` file holds the weights (often quantized), the model's hyper-parameters and its
tokenizer with the chat template. ``gguf_config`` builds the Hugging Face config from the
metadata; ``read_gguf_state_dict`` dequantizes every tensor to the requested dtype and maps
llama.cpp's names (``blk.N.attn_q``) to ours; ``gguf_tokenizer`` has transformers build
the tokenizer from the same file (kept in the cache after the first start). The weights
are never converted to disk.

llama.cpp stores the q and k projections of ``llama``-architecture models with the rows of
each head interleaved for its RoPE kernel (``convert_hf_to_gguf.py``: ``LlamaModel.permute``);
``_unpermute`` restores Hugging Face's order, as transformers' GGUF loading does. Other
architectures are stored in Hugging Face's order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.model.cache import cache_dir
from engine.model.loader import CheckpointError, check_sources, checkpoint_sources

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from engine.model.llama import LlamaForCausalLM

logger = logging.getLogger("lorastream.loader")

SUFFIX = ".gguf"


@dataclass(frozen=True)
class _Arch:
    config_class: str
    """transformers' config class for it."""
    architecture: str
    """The Hugging Face architecture name our model registry knows."""
    permuted_qk: bool
    """q/k rows interleaved by llama.cpp's converter (undone on load)."""


# GGUF ``general.architecture`` -> what we build. Mistral checkpoints are stored as "llama".
ARCHITECTURES = {
    "llama": _Arch("LlamaConfig", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Arch("Qwen2Config", "Qwen2ForCausalLM", permuted_qk=False),
}


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(SUFFIX) and Path(path).is_file()


def find_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file ``path`` stands for: itself, or the only ``.gguf`` in a directory that is
    not a Hugging Face checkpoint (no config.json); None when it is not a GGUF checkpoint."""
    path = Path(path)
    if path.is_file():
        return path if path.name.endswith(SUFFIX) else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    if len(files) > 1:
        raise CheckpointError(
            f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}): "
            "pass the one to load as --model DIR/FILE.gguf"
        )
    return files[0] if files else None


@functools.lru_cache(maxsize=2)
def _reader(path: str) -> Any:
    """A memory-mapped reader, kept: parsing the metadata of a large vocabulary takes a second
    or two, and the config and the weights both read it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


def gguf_config(path: str | os.PathLike[str]) -> PretrainedConfig:
    """The Hugging Face config of a GGUF checkpoint, from its metadata."""
    import transformers

    meta = _Metadata(str(path))
    arch_name = meta.get("general.architecture")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if int(meta.get("split.count", 1)) > 1:
        raise CheckpointError(
            f"{path} is one part of a split GGUF checkpoint, which is not supported: merge the "
            "parts first (llama.cpp's llama-gguf-split --merge)"
        )
    a = f"{arch_name}."
    tensors = {t.name: t for t in _reader(str(path)).tensors}
    hidden = int(meta.require(a + "embedding_length"))
    heads = int(meta.require(a + "attention.head_count"))
    kv_heads = meta.get(a + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per layer in some files
        if len(set(kv_heads)) != 1:
            raise CheckpointError(
                f"{path}: a different number of KV heads per layer is not supported"
            )
        kv_heads = kv_heads[0]
    head_dim = int(meta.get(a + "attention.key_length", hidden // heads))
    rotary = int(meta.get(a + "rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(
            f"{path}: RoPE over {rotary} of {head_dim} head dims is not supported"
        )
    vocab = meta.get(a + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = [
        int(i)
        for k in ("eos", "eot", "eom")  # end of text, of a turn (Llama 3), of a message
        if (i := meta.get(f"tokenizer.ggml.{k}_token_id")) is not None
    ]
    eos = list(dict.fromkeys(eos))
    config_class = getattr(transformers, arch.config_class)
    return config_class(
        architectures=[arch.architecture],
        hidden_size=hidden,
        intermediate_size=int(meta.require(a + "feed_forward_length")),
        num_hidden_layers=int(meta.require(a + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta.get(a + "context_length", 2048)),
        vocab_size=int(vocab),
        rope_parameters=_rope(meta, a, tensors),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) or None,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        dtype=_default_dtype(tensors.values()),
    )


def _rope(meta: _Metadata, a: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``rope_parameters`` from the metadata keys under ``a`` (the architecture)."""
    if "rope_freqs.weight" in tensors:
        # Llama 3.1's frequency scaling, stored as per-dimension factors.
        raise CheckpointError(f"{meta.path}: RoPE frequency factors (rope_freqs) are not supported")
    rope: dict[str, Any] = {"rope_type": "default"}
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(meta.require(a + "rope.scaling.factor"))}
    elif scaling != "none":
        raise CheckpointError(f"{meta.path}: RoPE scaling {scaling!r} is not supported")
    rope["rope_theta"] = float(meta.get(a + "rope.freq_base", 10000.0))
    return rope


def gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template stored in the file (transformers builds it).

    Building it reads the whole vocabulary out of the metadata and converts it, some seconds
    for a 49k-token vocabulary, so the result is saved in the cache (``$LORASTREAM_CACHE``),
    keyed by the file's path, size and modification time, and later starts load that."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    saved = cache_dir() / "gguf-tokenizers" / f"{path.stem}-{key[:16]}"
    if (saved / "tokenizer_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot build its tokenizer: {e}") from e
    try:  # written aside, then renamed: a reader never sees half of it
        saved.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=saved.parent, ignore_cleanup_errors=True) as tmp:
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, saved)
    except OSError as e:  # a read-only cache costs the conversion on every start, no more
        logger.debug("could not keep the tokenizer of %s in %s: %s", path, saved, e)
    return tokenizer


def read_gguf_state_dict(
    model: LlamaForCausalLM, path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Our state dict from a GGUF file, dequantized to ``dtype`` on ``device``."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from gguf.quants import dequantize

    reader = _reader(str(path))
    arch_name = _Metadata(str(path)).get("general.architecture")
    arch = ARCHITECTURES[arch_name]
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name)
    names = get_tensor_name_map(arch_id, model.num_layers)
    tensors = {t.name: t for t in reader.tensors}

    def gguf_name(hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        return f"{mapped}.{suffix}" if mapped else hf_name

    sources = checkpoint_sources(model)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    renamed = {
        ours: [(gguf_name(hf_name), shape) for hf_name, shape in parts]
        for ours, parts in sources.items()
    }
    check_sources(renamed, shapes, str(path))
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    state: dict[str, torch.Tensor] = {}
    for ours, parts in renamed.items():
        pieces = []
        for name, shape in parts:
            t = tensors[name]
            qtype = t.tensor_type
            try:
                array = dequantize(t.data, qtype)
            except NotImplementedError as e:
                raise CheckpointError(
                    f"{path}: tensor {name} is {qtype.name}, which the gguf package cannot "
                    "dequantize"
                ) from e
            if not array.flags.writeable:  # a view of the memory-mapped file (F32)
                array = array.copy()
            w = torch.from_numpy(array).reshape(shape)
            if arch.permuted_qk and ".attn_q." in name:
                w = _unpermute(w, heads)
            elif arch.permuted_qk and ".attn_k." in name:
                w = _unpermute(w, kv_heads)
            pieces.append(w)
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        state[ours] = t.to(device=device, dtype=dtype)
    used = {name for parts in renamed.values() for name, _ in parts}
    unexpected = sorted(n for n in tensors if n not in used)
    if unexpected:
        logger.warning("ignoring %d GGUF tensors: %s", len(unexpected), ", ".join(unexpected[:10]))
    return state


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows ``(half, 2)`` back to ``(2, half)``."""
    # w: [num_heads * head_dim, ...]; llama.cpp wrote rows (h, 2, d/2) as (h, d/2, 2).
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _default_dtype(tensors: Any) -> str:
    """What ``dtype="auto"`` means: BF16 or F32 files keep their type; quantized and F16 files
    take float16, the type of their scales (float32 on CPU, by the engine's rule)."""
    from gguf import GGMLQuantizationType as Q

    matrices = {t.tensor_type for t in tensors if len(t.shape) == 2}
    if matrices == {Q.F32}:
        return "float32"
    if Q.BF16 in matrices:
        return "bfloat16"
    return "float16"


class _Metadata:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fields = _reader(path).fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

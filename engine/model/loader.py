"""Load a checkpoint into our model, offline: a Hugging Face directory (safetensors) or a
GGUF file (``engine.model.gguf``).

The model is built on the meta device (no memory, no random init), every tensor is read
from safetensors straight into the target dtype and device, q/k/v and gate/up are
concatenated into their fused projections, and the result is assigned with
``load_state_dict(assign=True)``. Names and shapes are checked before any data is read,
so a bad checkpoint fails fast with every missing tensor and mismatched shape listed.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import EngineConfig
from engine.errors import LoRAStreamError
from engine.kernels.dispatch import Kernels
from engine.lora import LoRALinear
from engine.model.llama import LlamaForCausalLM, get_model_class

logger = logging.getLogger("lorastream.loader")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Checkpoint tensors we recompute instead of loading (old Llama checkpoints ship these).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.")


class CheckpointError(LoRAStreamError, ValueError):
    """The checkpoint's files, tensor names or shapes do not fit the model its config describes."""

    code = "checkpoint_error"


def load_model(config: EngineConfig) -> LlamaForCausalLM:
    """The model of ``config.model`` in ``config.dtype`` on ``config.device``, in eval mode,
    running the kernels ``config.kernel`` chooses."""
    kernels = Kernels(config.kernel, config.device)
    return load_model_from_dir(config.model, config.hf_config, config.dtype, config.device, kernels)


def load_model_from_dir(
    model_dir: str | Path,
    hf_config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    kernels: Kernels | None = None,
) -> LlamaForCausalLM:
    """``model_dir``: a Hugging Face checkpoint directory or a ``.gguf`` file."""
    device = torch.device(device)
    cls = get_model_class(hf_config)
    model = cls(hf_config, dtype, torch.device("meta"), kernels)
    if str(model_dir).endswith(".gguf"):
        # Imported here: the GGUF reader builds on this module's names.
        from engine.model.gguf import read_gguf_state_dict

        state = read_gguf_state_dict(model, model_dir, dtype, device)
    else:
        state = read_state_dict(model, model_dir, dtype, device)
    model.load_state_dict(state, assign=True)
    model.init_buffers(device)
    return model.eval()


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names shard files that do not exist: {', '.join(missing)}"
            )
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir} (only safetensors checkpoints are supported)"
    )


def checkpoint_sources(model: LlamaForCausalLM) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """For each parameter of ``model``: the checkpoint tensors it is made of, with their shapes.

    A fused ``LoRALinear`` parameter concatenates (along dim 0) one tensor per slice, named
    after the slice: ``...self_attn.qkv_proj.weight`` <- ``...self_attn.{q,k,v}_proj.weight``.
    """
    sources: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    fused = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, param in model.state_dict().items():
        module_name, _, kind = name.rpartition(".")
        layer = fused.get(module_name)
        if layer is None:
            sources[name] = [(name, tuple(param.shape))]
            continue
        parent = module_name.rpartition(".")[0]
        sources[name] = [
            (f"{parent}.{slice_name}.{kind}", (n, layer.in_features) if kind == "weight" else (n,))
            for slice_name, n in zip(layer.slice_names, layer.out_slices, strict=True)
        ]
    return sources


def read_state_dict(
    model: LlamaForCausalLM, model_dir: str | Path, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Our state dict, read from the checkpoint in ``dtype`` on ``device``."""
    sources = checkpoint_sources(model)
    with ExitStack() as stack:
        # Read on the host (memory-mapped), then convert and move one tensor at a time.
        where, shapes = open_checkpoint(stack, model_dir)
        check_sources(sources, shapes, model_dir)
        state: dict[str, torch.Tensor] = {}
        for name, parts in sources.items():
            tensors = [where[hf_name].get_tensor(hf_name) for hf_name, _ in parts]
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            state[name] = t.to(device=device, dtype=dtype)
        used = {hf_name for parts in sources.values() for hf_name, _ in parts}
        unexpected = sorted(k for k in where if k not in used and not _IGNORED.search(k))
        if model.tie_word_embeddings and "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")  # tied: transformers ignores a stored copy too
        if unexpected:
            logger.warning(
                "ignoring %d unexpected checkpoint tensors: %s", len(unexpected), _some(unexpected)
            )
        return state


def open_checkpoint(
    stack: ExitStack, model_dir: str | Path
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The checkpoint's safetensors files opened (memory-mapped, closed with ``stack``): the
    handle of the file holding each tensor, and each tensor's shape, by tensor name."""
    files = checkpoint_files(model_dir)
    handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (safe_open is not a dict)
    shapes = {key: tuple(h.get_slice(key).get_shape()) for key, h in where.items()}
    return where, shapes


def check_sources(
    sources: dict[str, list[tuple[str, tuple[int, ...]]]],
    shapes: dict[str, tuple[int, ...]],
    model_dir: str | Path,
) -> None:
    """Raise ``CheckpointError`` listing every tensor ``sources`` needs that the checkpoint
    (its tensors' ``shapes`` by name) lacks or holds in another shape."""
    missing: list[str] = []
    mismatched: list[str] = []
    for parts in sources.values():
        for hf_name, shape in parts:
            if hf_name not in shapes:
                missing.append(hf_name)
                continue
            got = tuple(shapes[hf_name])
            if got != shape:
                mismatched.append(f"{hf_name}: checkpoint {list(got)}, model expects {list(shape)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_some(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_some(mismatched, sep='; ')}")
    if problems:
        raise CheckpointError(
            f"checkpoint {model_dir} does not fit its config: " + "; ".join(problems)
        )


def _some(items: list[str], limit: int = 10, sep: str = ", ") -> str:
    more = f"{sep}... ({len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more

"""Read and validate PEFT LoRA adapters.

Two steps, so bad adapters fail fast and cheaply:

- ``read_adapter_config`` reads only ``adapter_config.json`` (plus a ``stat`` of the weights
  file). The engine calls it synchronously when a request arrives.
- ``load_adapter`` reads the tensors, checks them against the base model and returns host
  tensors ready to copy into the ``LoRALinear`` slots. It runs on the manager's loader thread.

Which module gets which rank and alpha follows PEFT exactly (``check_target_module_exists``
and ``get_pattern_key`` in peft), so an adapter behaves here as it does under
``PeftModel.from_pretrained``: tensors of modules the config does not target are ignored
(PEFT never creates a layer for them), modules the config targets but the file lacks keep a
zero delta.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.config import LORA_TARGET_MODULES, LoRAConfig
from engine.errors import (
    AdapterCorrupt,
    AdapterError,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    AdapterUnsupported,
)
from engine.lora.layers import LoRALinear

logger = logging.getLogger("lorastream.lora")

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# PEFT module name -> (layer_key, slice_idx, in_features, out_features).
ModuleShapes = Mapping[str, tuple[str, int, int, int]]

# Config fields that change the adapter's forward beyond x @ A.T @ B.T * scaling (or that
# replace or add whole modules). Any of them set means we would silently compute something
# else than PEFT, so they are refused.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "a bias on lora_B (lora_bias=true)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targeting (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "modules_to_save": "fully trained modules (modules_to_save)",
}
# Modules PEFT can put a LoRA on in a Llama-style model but this engine does not serve.
_KNOWN_UNSERVED = ("lm_head", "model.embed_tokens")
# "base_model.model.<module>.lora_A[.default].weight" (PEFT's saved form; the adapter name
# appears in checkpoints written by older tools).
_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(?P<idx>\d+)\.")


class HasLoRALayers(Protocol):
    def lora_layers(self) -> dict[str, LoRALinear]: ...


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the weights we build."""

    path: Path
    weights_file: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str = ()
    """A list of module names (matched as name suffixes) or one regex (full match), as in PEFT."""
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT would put this adapter's LoRA on ``module`` (peft's check_target_module_exists)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(
                module.endswith(f".{k}") for k in self.exclude_modules
            ):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            # PEFT skips the layer filter for exact names too.
            return True
        if not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        if not self.layers_to_transform:
            return True
        idx = _peft_layer_index(module, self.layers_pattern)
        return idx is not None and idx in self.layers_to_transform


@dataclass
class LoRAWeights:
    """One adapter's tensors in host memory, ready for ``LoRALinear.set_lora``."""

    path: Path
    rank: int
    """Largest rank over its modules."""
    # (layer_key, slice_idx) -> (A [r, in], B [out, r] * scaling), in lora_dtype, on CPU.
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


# ---------------------------------------------------------------------------- base model


def lora_targets_from_layers(
    lora_layers: Mapping[str, LoRALinear] | HasLoRALayers,
) -> dict[str, tuple[str, int, int, int]]:
    """PEFT module name of every slice -> (layer_key, slice_idx, in_features, out_features).

    ``"model.layers.0.self_attn.qkv_proj"`` with slices q/k/v gives
    ``"model.layers.0.self_attn.k_proj" -> ("model.layers.0.self_attn.qkv_proj", 1, in, out_k)``.
    """
    layers = lora_layers.lora_layers() if hasattr(lora_layers, "lora_layers") else lora_layers
    assert isinstance(layers, Mapping)
    shapes: dict[str, tuple[str, int, int, int]] = {}
    for layer_key, layer in layers.items():
        parent = layer_key.rpartition(".")[0]
        for i, (name, out) in enumerate(zip(layer.slice_names, layer.out_slices, strict=True)):
            shapes[f"{parent}.{name}" if parent else name] = (layer_key, i, layer.in_features, out)
    return shapes


# ---------------------------------------------------------------------------- config


def read_adapter_config(
    path: str | Path,
    lora_config: LoRAConfig,
    module_shapes: ModuleShapes | None = None,
) -> AdapterConfig:
    """Parse and check ``adapter_config.json`` without reading any tensor.

    With ``module_shapes`` (the base model) the targets are also resolved against the
    model's modules: a regex ``target_modules`` that reaches an unsupported module and
    ``layers_to_transform`` past the last layer are caught here rather than at load time.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterNotFound(f"adapter {path}: directory does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterNotFound(f"adapter {path}: {CONFIG_NAME} is missing")
    weights_file = _weights_file(path, lora_config.allow_pickle)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterCorrupt(f"adapter {path}: {CONFIG_NAME} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise AdapterCorrupt(f"adapter {path}: {CONFIG_NAME} must hold a JSON object")
    cfg = _parse_config(path, weights_file, raw)
    _check_config(cfg, raw, lora_config, module_shapes)
    return cfg


def _weights_file(path: Path, allow_pickle: bool) -> Path:
    st = path / SAFETENSORS_NAME
    if st.is_file():
        return st
    pickled = path / PICKLE_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterUnsupported(
                f"adapter {path}: only {PICKLE_NAME} found; pickle files run code when loaded, so "
                "they need the explicit opt-in allow_pickle_adapters=True (--allow-pickle-adapters), "
                f"or convert the adapter to {SAFETENSORS_NAME}"
            )
        return pickled
    raise AdapterNotFound(f"adapter {path}: {SAFETENSORS_NAME} is missing")


def _parse_config(path: Path, weights_file: Path, raw: dict[str, Any]) -> AdapterConfig:
    def bad(name: str, what: str) -> AdapterCorrupt:
        return AdapterCorrupt(
            f"adapter {path}: {CONFIG_NAME} field {name}={raw.get(name)!r} is invalid: {what}"
        )

    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterUnsupported(
            f"adapter {path}: peft_type={peft_type!r}; only LORA adapters are served"
        )
    r = raw.get("r", 8)
    if not _is_int(r) or r < 1:
        raise bad("r", "must be an integer >= 1")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise bad("lora_alpha", "must be a number")
    rank_pattern = raw.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        _is_int(v) and v >= 1 for v in rank_pattern.values()
    ):
        raise bad("rank_pattern", "must map module patterns to integers >= 1")
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(
        _is_number(v) for v in alpha_pattern.values()
    ):
        raise bad("alpha_pattern", "must map module patterns to numbers")
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in pattern:
            _compile(path, name, key)

    target = raw.get("target_modules")
    target_modules: tuple[str, ...] | str
    if isinstance(target, str):
        # PEFT expands "all-linear" to every linear layer but the output one before saving;
        # accept it anyway for hand-written configs.
        target_modules = LORA_TARGET_MODULES if target == "all-linear" else target
        if isinstance(target_modules, str):
            _compile(path, "target_modules", target_modules)
    elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
        target_modules = tuple(target)
    else:
        raise bad("target_modules", "must be a non-empty list of module names or a regex string")

    exclude = raw.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, str | list):
        raise bad("exclude_modules", "must be a list of module names or a regex string")
    if isinstance(exclude, str):
        _compile(path, "exclude_modules", exclude)

    layers = raw.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers)
    ):
        raise bad("layers_to_transform", "must be a list of layer indices >= 0")
    layers_pattern = raw.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    if layers_pattern is not None and not isinstance(layers_pattern, list):
        raise bad("layers_pattern", "must be a string or a list of strings")

    return AdapterConfig(
        path=path,
        weights_file=weights_file,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=target_modules,
        exclude_modules=tuple(exclude) if isinstance(exclude, list) else exclude,
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(layers_pattern) if layers_pattern else None,
    )


def _check_config(
    cfg: AdapterConfig,
    raw: dict[str, Any],
    lora_config: LoRAConfig,
    module_shapes: ModuleShapes | None,
) -> None:
    path = cfg.path
    used = [
        desc
        for name, desc in _UNSUPPORTED_FIELDS.items()
        if raw.get(name) not in (None, False, [], {}, "")
    ]
    if used:
        raise AdapterUnsupported(
            f"adapter {path}: uses {', '.join(used)}, which this engine does not run"
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterUnsupported(
            f"adapter {path}: bias={bias!r} trains biases of the base model; only bias='none' is supported"
        )
    if cfg.max_rank > lora_config.max_lora_rank:
        raise AdapterRankTooLarge(
            f"adapter {path}: rank {cfg.max_rank} is larger than max_lora_rank={lora_config.max_lora_rank}; "
            f"start the engine with --max-lora-rank >= {cfg.max_rank}"
        )

    if isinstance(cfg.target_modules, tuple):
        # Names are suffixes of module names ("q_proj", "self_attn.q_proj", ...).
        names = {t.rpartition(".")[2] for t in cfg.target_modules}
        _check_module_names(path, names, lora_config)

    if module_shapes is not None:
        candidates = [*module_shapes, *_KNOWN_UNSERVED]
        targeted = {m for m in candidates if cfg.targets(m)}
        _check_module_names(path, {m.rpartition(".")[2] for m in targeted}, lora_config)
        if cfg.layers_to_transform and isinstance(cfg.target_modules, tuple):
            num_layers = _num_layers(module_shapes)
            beyond = sorted(i for i in cfg.layers_to_transform if i >= num_layers)
            if beyond:
                raise AdapterShapeMismatch(
                    f"adapter {path}: layers_to_transform has layer indices {beyond}; the base model "
                    f"has {num_layers} layers (0..{num_layers - 1})"
                )


def _check_module_names(path: Path, names: Iterable[str], lora_config: LoRAConfig) -> None:
    names = set(names)
    unserved = sorted(n for n in names if n not in LORA_TARGET_MODULES)
    if unserved:
        raise AdapterUnsupported(
            f"adapter {path}: targets {', '.join(unserved)}; LoRA is only served on "
            f"{', '.join(LORA_TARGET_MODULES)}"
        )
    disabled = sorted(n for n in names if n not in lora_config.target_modules)
    if disabled:
        raise AdapterUnsupported(
            f"adapter {path}: targets {', '.join(disabled)}, outside the engine's lora_target_modules "
            f"({', '.join(lora_config.target_modules)})"
        )


# ---------------------------------------------------------------------------- weights


def load_adapter(
    path: str | Path, lora_config: LoRAConfig, module_shapes: ModuleShapes
) -> LoRAWeights:
    """Read an adapter's tensors and shape them for the engine's LoRA slots.

    Every error is an ``AdapterError`` naming the path and the problem.
    """
    cfg = read_adapter_config(path, lora_config, module_shapes)
    state = _read_tensors(cfg)
    pairs = _group_pairs(cfg, state, lora_config, module_shapes)
    pin = torch.cuda.is_available()
    tensors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    rank = 0
    for module, (a, b) in sorted(pairs.items()):
        layer_key, slice_idx, _, _ = module_shapes[module]
        rank = max(rank, a.shape[0])
        # Scale in float32 before the cast, so a bf16/fp16 adapter loses no more precision
        # than PEFT's own forward does.
        a_out = a.to(lora_config.lora_dtype).contiguous()
        b_out = (b.float() * cfg.scaling_for(module)).to(lora_config.lora_dtype).contiguous()
        if pin:
            # Page-locked host memory makes the later host->device copy asynchronous.
            a_out, b_out = a_out.pin_memory(), b_out.pin_memory()
        tensors[(layer_key, slice_idx)] = (a_out, b_out)
        nbytes += a_out.numel() * a_out.element_size() + b_out.numel() * b_out.element_size()
    return LoRAWeights(path=cfg.path, rank=rank, tensors=tensors, nbytes=nbytes)


def _read_tensors(cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    f = cfg.weights_file
    try:
        if f.name == PICKLE_NAME:
            # weights_only refuses arbitrary objects; the caller opted in to pickle anyway.
            state = torch.load(f, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(f, device="cpu")
    except FileNotFoundError as e:
        raise AdapterNotFound(f"adapter {cfg.path}: {f.name} is missing") from e
    except Exception as e:  # the readers raise many types for bad bytes; all mean "corrupt"
        raise AdapterCorrupt(
            f"adapter {cfg.path}: cannot read {f.name} ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterCorrupt(
            f"adapter {cfg.path}: {f.name} does not hold a mapping of names to tensors"
        )
    return state


def _group_pairs(
    cfg: AdapterConfig,
    state: dict[str, torch.Tensor],
    lora_config: LoRAConfig,
    module_shapes: ModuleShapes,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = cfg.path
    found: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterUnsupported(
                f"adapter {path}: tensor {key!r} is not a LoRA A/B weight (DoRA magnitudes, embedding "
                "LoRA and fully saved modules are not supported)"
            )
        module = _module_name(m["module"])
        if not cfg.targets(module):
            ignored.append(key)
            continue
        if m["param"] == "bias":
            raise AdapterUnsupported(
                f"adapter {path}: tensor {key!r} is a LoRA bias; only bias-free LoRA is supported"
            )
        if module not in module_shapes:
            _raise_unknown_module(path, module, lora_config, module_shapes)
        if m["ab"] in found.setdefault(module, {}):
            raise AdapterCorrupt(
                f"adapter {path}: module {module} has more than one {m['ab']} tensor"
            )
        found[module][m["ab"]] = tensor
    if ignored:
        # PEFT ignores them too (it only creates layers for targeted modules).
        logger.warning(
            "adapter %s: ignoring %d tensors of modules its config does not target: %s",
            path,
            len(ignored),
            ignored[:4],
        )

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in found.items():
        if set(ab) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in ab else "lora_A"
            raise AdapterCorrupt(f"adapter {path}: module {module} has no {missing} tensor")
        a, b = ab["lora_A"], ab["lora_B"]
        _, _, in_features, out_features = module_shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterCorrupt(
                f"adapter {path}: module {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                "expected [r, in] and [out, r]"
            )
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterShapeMismatch(
                f"adapter {path}: module {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                f"the base model expects in={in_features}, out={out_features} "
                "(was the adapter trained on another base model?)"
            )
        r = a.shape[0]
        if r > lora_config.max_lora_rank:
            raise AdapterRankTooLarge(
                f"adapter {path}: module {module} has rank {r}, larger than max_lora_rank={lora_config.max_lora_rank}"
            )
        if r != cfg.rank_for(module):
            raise AdapterCorrupt(
                f"adapter {path}: module {module} has rank {r} in its weights but {cfg.rank_for(module)} "
                f"in {CONFIG_NAME}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterCorrupt(
                f"adapter {path}: module {module} has non-floating-point LoRA weights"
            )
        pairs[module] = (a, b)
    if not pairs:
        raise AdapterCorrupt(
            f"adapter {path}: {cfg.weights_file.name} holds no LoRA weights for the targeted modules"
        )
    return pairs


def _raise_unknown_module(
    path: Path, module: str, lora_config: LoRAConfig, module_shapes: ModuleShapes
) -> None:
    name = module.rpartition(".")[2]
    _check_module_names(path, [name], lora_config)
    m = _LAYER_RE.search(module)
    num_layers = _num_layers(module_shapes)
    if m is not None and int(m["idx"]) >= num_layers:
        raise AdapterShapeMismatch(
            f"adapter {path}: module {module} is in layer {m['idx']}; the base model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    raise AdapterShapeMismatch(f"adapter {path}: module {module} does not exist in the base model")


# ---------------------------------------------------------------------------- helpers


def _module_name(prefix: str) -> str:
    # PEFT saves "base_model.model.<name in the transformers model>".
    return prefix.removeprefix("base_model.model.")


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key (in file order) that matches a
    # dot-separated suffix of the module name, the key being a regex.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _peft_layer_index(module: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    # As in peft's check_target_module_exists: the first numbered segment, or the number
    # after one of layers_pattern.
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    return int(m["idx"]) if m is not None else None


def _num_layers(module_shapes: ModuleShapes) -> int:
    idx = [int(m["idx"]) for name in module_shapes if (m := _LAYER_RE.search(name))]
    return max(idx) + 1 if idx else 0


def _compile(path: Path, name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterCorrupt(
            f"adapter {path}: {CONFIG_NAME} {name} has an invalid regex {pattern!r} ({e})"
        ) from e


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


__all__ = [
    "AdapterConfig",
    "AdapterError",
    "LoRAWeights",
    "ModuleShapes",
    "load_adapter",
    "lora_targets_from_layers",
    "read_adapter_config",
]

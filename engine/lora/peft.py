"""Read and validate PEFT LoRA adapters.

Two steps, so bad adapters fail fast and cheaply:

- ``read_adapter_config`` reads only ``adapter_config.json`` (and opens the weights file to
  check it). The engine calls it when a request arrives, off the event loop.
- ``load_adapter`` reads the tensors, checks them against the base model and returns host
  tensors ready to copy into the ``LoRALinear`` slots. It runs on the manager's loader thread.

Which module gets which rank and alpha follows PEFT exactly (``check_target_module_exists``
and ``get_pattern_key`` in peft), so an adapter behaves here as it does under
``PeftModel.from_pretrained``: tensors of modules the config does not target are ignored
(PEFT never creates a layer for them), modules the config targets but the file lacks keep a
zero delta.

Adapter files are untrusted (anyone who can write under ``--lora-root`` or to the Redis
registry chooses them), so reading one is bounded:

- every regex of the config (``target_modules``, ``exclude_modules``, ``rank_pattern``,
  ``alpha_pattern``, ``layers_pattern``) must be valid for Python's ``re``, as in PEFT, and is
  then matched by RE2, in time linear in the module name; a regex RE2 cannot run
  (backreferences, lookarounds) is refused;
- every file is opened inside the adapter directory's real path: what was opened (not what
  its name said a moment before) must be a regular file there, so a symlink out of the
  directory, a FIFO or a device is refused, and a name swapped after an earlier check is still
  caught;
- sizes are capped before reading (``MAX_CONFIG_BYTES``; the weights at what the largest
  adapter of this model can hold) and reading the weights stops at ``LOAD_TIMEOUT_S``;
- ``lora_alpha``, ranks and every weight must be finite numbers, so an adapter cannot turn
  every logit into NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import re2
import torch

from engine.config import LORA_TARGET_MODULES, LoRAConfig
from engine.errors import (
    AdapterCorrupt,
    AdapterError,
    AdapterLoadTimeout,
    AdapterNotFound,
    AdapterPathNotAllowed,
    AdapterRankTooLarge,
    AdapterShapeMismatch,
    AdapterUnsupported,
)
from engine.lora.layers import LoRALinear

logger = logging.getLogger("lorastream.lora")

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json larger than this is refused unread (PEFT writes a few KiB)."""
MAX_PATTERNS = 4096
"""Regexes a config may hold (rank_pattern + alpha_pattern keys + layers_pattern): a key per
module of a 126-layer model fits; more would only cost matching time."""
LOAD_TIMEOUT_S = 120.0
"""Reading an adapter's weights stops with AdapterLoadTimeout after this many seconds."""
_READ_CHUNK = 64 << 20
# Room for a safetensors header (names, shapes, offsets) on top of the tensors' bytes.
_HEADER_BYTES = 16 << 20
# Float64, the widest dtype a LoRA weight is saved in: the weights cap never refuses a real
# adapter of a served rank.
_MAX_ITEMSIZE = 8

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


def _re2_options() -> Any:
    options = re2.Options()
    # RE2 would print a refused pattern, raw, to stderr.
    options.log_errors = False
    # Per compiled regex (RE2's default is 8 MiB; re2 caches 128 of them): a module-name
    # regex needs a few KiB, a larger program is refused at compile time.
    options.max_mem = 1 << 20
    return options


_RE2_OPTIONS = _re2_options()
# "base_model.model.<module>.lora_A[.default].weight" (PEFT's saved form; the adapter name
# appears in checkpoints written by older tools).
_KEY_RE = re2.compile(
    r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$",
    _RE2_OPTIONS,
)
_LAYER_RE = re2.compile(r"(?:^|\.)layers\.(?P<idx>\d+)\.", _RE2_OPTIONS)
_FIRST_INDEX_RE = re2.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.", _RE2_OPTIONS)
_FIELD = object()  # "the config field of that name", in _parse_config's messages
# The kernel's own view of an open file: race-free, where the platform has it.
_PROC_FD = Path("/proc/self/fd")


class HasLoRALayers(Protocol):
    def lora_layers(self) -> dict[str, LoRALinear]: ...


class Regex(Protocol):
    """A compiled RE2 regex (``re2`` ships no type hints)."""

    def match(self, text: str) -> Any: ...

    def fullmatch(self, text: str) -> Any: ...


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the weights we build."""

    path: Path
    """The directory as it was named (messages name it so)."""
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
    real_dir: str = ""
    """The directory's real path when the config was read; its files are opened inside it."""
    matchers: _Matchers = field(default_factory=lambda: _Matchers(), repr=False, compare=False)

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.matchers.rank, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.matchers.alpha, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT would put this adapter's LoRA on ``module`` (peft's check_target_module_exists)."""
        rx = self.matchers
        if self.exclude_modules:
            if rx.exclude is not None:
                if rx.exclude.fullmatch(module):
                    return False
            elif not _dot_suffixes(module).isdisjoint(rx.exclude_names):
                return False
        if rx.target is not None:
            return rx.target.fullmatch(module) is not None
        if module in rx.target_names:
            # PEFT skips the layer filter for exact names too.
            return True
        if _dot_suffixes(module).isdisjoint(rx.target_names):
            return False
        if not self.layers_to_transform:
            return True
        idx = _peft_layer_index(module, rx.layers)
        return idx is not None and idx in rx.layer_indices


@dataclass(frozen=True)
class _Matchers:
    """An ``AdapterConfig``'s patterns compiled once for RE2, its lists as sets."""

    target: Regex | None = None
    target_names: frozenset[str] = frozenset()
    exclude: Regex | None = None
    exclude_names: frozenset[str] = frozenset()
    # (key, the regex PEFT's get_pattern_key builds from it), in file order.
    rank: tuple[tuple[str, Regex], ...] = ()
    alpha: tuple[tuple[str, Regex], ...] = ()
    layers: tuple[Regex, ...] = ()
    layer_indices: frozenset[int] = frozenset()


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
    real_dir = os.path.realpath(path)
    if not (path / CONFIG_NAME).exists():
        raise AdapterNotFound(f"adapter {path}: {CONFIG_NAME} is missing")
    weights_file = _weights_file(path)
    # Fail at the request, not at the load, when the weights file is not one we would read.
    os.close(_open_inside(path, real_dir, weights_file.name))
    data = _read_inside(path, real_dir, CONFIG_NAME, MAX_CONFIG_BYTES)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError, or an integer past Python's digit limit.
        raise AdapterCorrupt(
            f"adapter {path}: {CONFIG_NAME} is not valid JSON ({_short(str(e))})"
        ) from e
    if not isinstance(raw, dict):
        raise AdapterCorrupt(f"adapter {path}: {CONFIG_NAME} must hold a JSON object")
    cfg = _parse_config(path, real_dir, weights_file, raw)
    _check_config(cfg, raw, lora_config, module_shapes)
    return cfg


def _weights_file(path: Path) -> Path:
    # exists() follows a symlink; where it leads is checked when the file is opened.
    st = path / SAFETENSORS_NAME
    if st.exists():
        return st
    if (path / PICKLE_NAME).exists():
        # Pickle files run code when loaded: none is read, whoever wrote it.
        raise AdapterUnsupported(
            f"adapter {path}: only {PICKLE_NAME} found, and pickle files are never loaded; "
            f'convert it once where you trust it: python -c "import torch, safetensors.torch as s; '
            f"s.save_file(torch.load('{PICKLE_NAME}', weights_only=True), '{SAFETENSORS_NAME}')\""
        )
    raise AdapterNotFound(f"adapter {path}: {SAFETENSORS_NAME} is missing")


def _parse_config(
    path: Path, real_dir: str, weights_file: Path, raw: dict[str, Any]
) -> AdapterConfig:
    def bad(name: str, what: str, value: object = _FIELD) -> AdapterCorrupt:
        value = raw.get(name) if value is _FIELD else value
        return AdapterCorrupt(
            f"adapter {path}: {CONFIG_NAME} field {name}={_short(value)} is invalid: {what}"
        )

    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterUnsupported(
            f"adapter {path}: peft_type={_short(peft_type)}; only LORA adapters are served"
        )
    r = raw.get("r", 8)
    if not _is_int(r) or r < 1:
        raise bad("r", "must be an integer >= 1")
    alpha = raw.get("lora_alpha", 8)
    if not _is_finite(alpha):
        raise bad("lora_alpha", "must be a finite number")
    use_rslora = raw.get("use_rslora", False)
    if use_rslora is None:
        use_rslora = False
    if not isinstance(use_rslora, bool):
        raise bad("use_rslora", "must be true or false")
    rank_pattern = raw.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise bad("rank_pattern", "must map module patterns to integers >= 1")
    for key, v in rank_pattern.items():
        if not _is_int(v) or v < 1:
            raise bad(f"rank_pattern[{_short(key)}]", "must be an integer >= 1", v)
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise bad("alpha_pattern", "must map module patterns to finite numbers")
    for key, v in alpha_pattern.items():
        if not _is_finite(v):
            raise bad(f"alpha_pattern[{_short(key)}]", "must be a finite number", v)

    target = raw.get("target_modules")
    target_modules: tuple[str, ...] | str
    if isinstance(target, str):
        # PEFT expands "all-linear" to every linear layer but the output one before saving;
        # accept it anyway for hand-written configs.
        target_modules = LORA_TARGET_MODULES if target == "all-linear" else target
    elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
        target_modules = tuple(target)
    else:
        raise bad("target_modules", "must be a non-empty list of module names or a regex string")

    exclude = raw.get("exclude_modules")
    if exclude is not None and not (
        isinstance(exclude, str)
        or (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))
    ):
        raise bad("exclude_modules", "must be a list of module names or a regex string")

    layers = raw.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers)
    ):
        raise bad("layers_to_transform", "must be a list of layer indices >= 0")
    layers_pattern = raw.get("layers_pattern")
    if isinstance(layers_pattern, str):
        # PEFT reads "" as no pattern, but [""] as the empty pattern.
        layers_pattern = [layers_pattern] if layers_pattern else None
    if layers_pattern is not None and not (
        isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern)
    ):
        raise bad("layers_pattern", "must be a string or a list of strings")

    num_patterns = len(rank_pattern) + len(alpha_pattern) + len(layers_pattern or ())
    if num_patterns > MAX_PATTERNS:
        raise AdapterUnsupported(
            f"adapter {path}: {CONFIG_NAME} holds {num_patterns} regexes in rank_pattern, "
            f"alpha_pattern and layers_pattern; at most {MAX_PATTERNS} are read"
        )
    # The regexes PEFT builds from each pattern (peft's check_target_module_exists and
    # get_pattern_key), compiled once.
    target_regex = exclude_regex = None
    if isinstance(target_modules, str):
        target_regex = _regex(path, "target_modules", target_modules, target_modules)
    if isinstance(exclude, str):
        exclude_regex = _regex(path, "exclude_modules", exclude, exclude)
    matchers = _Matchers(
        target=target_regex,
        target_names=frozenset(target_modules) if target_regex is None else frozenset(),
        exclude=exclude_regex,
        exclude_names=frozenset(exclude) if isinstance(exclude, list) else frozenset(),
        rank=tuple((k, _regex(path, "rank_pattern", k, rf"(.*\.)?({k})$")) for k in rank_pattern),
        alpha=tuple(
            (k, _regex(path, "alpha_pattern", k, rf"(.*\.)?({k})$")) for k in alpha_pattern
        ),
        layers=tuple(
            _regex(path, "layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
            for p in layers_pattern or ()
        ),
        layer_indices=frozenset(layers or ()),
    )

    return AdapterConfig(
        path=path,
        weights_file=weights_file,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=target_modules,
        exclude_modules=tuple(exclude) if isinstance(exclude, list) else exclude,
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(layers_pattern) if layers_pattern else None,
        real_dir=real_dir,
        matchers=matchers,
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
            f"adapter {path}: bias={_short(bias)} trains biases of the base model; only bias='none' is supported"
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
            f"adapter {path}: targets {_listing(unserved)}; LoRA is only served on "
            f"{', '.join(LORA_TARGET_MODULES)}"
        )
    disabled = sorted(n for n in names if n not in lora_config.target_modules)
    if disabled:
        raise AdapterUnsupported(
            f"adapter {path}: targets {_listing(disabled)}, outside the engine's "
            f"lora_target_modules ({', '.join(lora_config.target_modules)})"
        )


# ---------------------------------------------------------------------------- weights


def load_adapter(
    path: str | Path, lora_config: LoRAConfig, module_shapes: ModuleShapes
) -> LoRAWeights:
    """Read an adapter's tensors and shape them for the engine's LoRA slots.

    Every error is an ``AdapterError`` naming the path and the problem.
    """
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    cfg = read_adapter_config(path, lora_config, module_shapes)
    state = _read_tensors(cfg, _max_weights_bytes(lora_config, module_shapes), deadline)
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
        scaling = cfg.scaling_for(module)
        a_out = a.to(lora_config.lora_dtype).contiguous()
        b_out = (b.float() * scaling).to(lora_config.lora_dtype).contiguous()
        if not (torch.isfinite(a_out).all() and torch.isfinite(b_out).all()):
            raise AdapterCorrupt(
                f"adapter {cfg.path}: module {module}'s lora_A, or lora_B times its scaling "
                f"{scaling:g}, overflows {lora_config.lora_dtype}"
            )
        if pin:
            # Page-locked host memory makes the later host->device copy asynchronous.
            a_out, b_out = a_out.pin_memory(), b_out.pin_memory()
        tensors[(layer_key, slice_idx)] = (a_out, b_out)
        nbytes += a_out.numel() * a_out.element_size() + b_out.numel() * b_out.element_size()
    return LoRAWeights(path=cfg.path, rank=rank, tensors=tensors, nbytes=nbytes)


def _max_weights_bytes(lora_config: LoRAConfig, module_shapes: ModuleShapes) -> int:
    """The largest weights file a served adapter of this model can need: every module at
    ``max_lora_rank`` in float64, plus a header."""
    features = sum(in_f + out_f for _, _, in_f, out_f in module_shapes.values())
    return features * lora_config.max_lora_rank * _MAX_ITEMSIZE + _HEADER_BYTES


def _read_tensors(cfg: AdapterConfig, max_bytes: int, deadline: float) -> dict[str, torch.Tensor]:
    name = cfg.weights_file.name
    # From bytes read through the checked descriptor, not a memory map: a file truncated
    # while mapped would kill the process with SIGBUS.
    data = _read_inside(cfg.path, cfg.real_dir, name, max_bytes, deadline)
    try:
        from safetensors.torch import load

        state = load(data)
    except Exception as e:  # the readers raise many types for bad bytes; all mean "corrupt"
        raise AdapterCorrupt(
            f"adapter {cfg.path}: cannot read {name} ({type(e).__name__}: {_short(str(e))})"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterCorrupt(
            f"adapter {cfg.path}: {name} does not hold a mapping of names to tensors"
        )
    return state


# ---------------------------------------------------------------------------- files


def _open_inside(path: Path, real_dir: str, name: str) -> int:
    """A descriptor of ``name`` in the adapter directory, once what it opened (not what the
    name led to a moment before) is known to be a regular file inside ``real_dir``."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(os.path.join(real_dir, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise AdapterNotFound(f"adapter {path}: {name} is missing") from e
    except OSError as e:
        raise AdapterCorrupt(f"adapter {path}: cannot open {name} ({e.strerror})") from e
    try:
        opened = _opened_path(fd, os.path.join(real_dir, name))
        if os.path.commonpath([opened, real_dir]) != real_dir:
            raise AdapterPathNotAllowed(
                f"adapter {path}: {name} resolves to {_short(opened)}, outside the adapter "
                f"directory {real_dir}; copy the file into the directory"
            )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterCorrupt(f"adapter {path}: {name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _opened_path(fd: int, name: str) -> str:
    try:
        # Linux: the file the descriptor holds, whatever happened to its name since.
        return os.readlink(_PROC_FD / str(fd))
    except OSError:
        return os.path.realpath(name)


def _read_inside(
    path: Path, real_dir: str, name: str, max_bytes: int, deadline: float | None = None
) -> bytes:
    fd = _open_inside(path, real_dir, name)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise AdapterCorrupt(
                f"adapter {path}: {name} is {size} bytes; at most {max_bytes} are read"
            )
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total)):
            total += len(chunk)
            if total > max_bytes:
                raise AdapterCorrupt(
                    f"adapter {path}: {name} grew past {max_bytes} bytes while read"
                )
            chunks.append(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise AdapterLoadTimeout(
                    f"adapter {path}: reading {name} took longer than {LOAD_TIMEOUT_S:g} s"
                )
        return b"".join(chunks)
    except OSError as e:
        raise AdapterCorrupt(f"adapter {path}: cannot read {name} ({e.strerror})") from e
    finally:
        os.close(fd)


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
                f"adapter {path}: tensor {_short(key)} is not a LoRA A/B weight (DoRA magnitudes, "
                "embedding LoRA and fully saved modules are not supported)"
            )
        module = _module_name(m.group("module"))
        if not cfg.targets(module):
            ignored.append(key)
            continue
        if m.group("param") == "bias":
            raise AdapterUnsupported(
                f"adapter {path}: tensor {_short(key)} is a LoRA bias; only bias-free LoRA is "
                "supported"
            )
        if module not in module_shapes:
            _raise_unknown_module(path, module, lora_config, module_shapes)
        ab = m.group("ab")
        if ab in found.setdefault(module, {}):
            raise AdapterCorrupt(f"adapter {path}: module {module} has more than one {ab} tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            # Served, it would turn every logit of the adapter's requests into NaN.
            raise AdapterCorrupt(f"adapter {path}: tensor {_short(key)} holds NaN or Inf")
        found[module][ab] = tensor
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
    if m is not None and int(m.group("idx")) >= num_layers:
        raise AdapterShapeMismatch(
            f"adapter {path}: module {_short(module)} is in layer {m.group('idx')}; the base "
            f"model has {num_layers} layers (0..{num_layers - 1})"
        )
    raise AdapterShapeMismatch(
        f"adapter {path}: module {_short(module)} does not exist in the base model"
    )


# ---------------------------------------------------------------------------- helpers


def _module_name(prefix: str) -> str:
    # PEFT saves "base_model.model.<name in the transformers model>".
    return prefix.removeprefix("base_model.model.")


def _pattern_key(patterns: tuple[tuple[str, Regex], ...], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key (in file order) whose regex
    # "(.*\.)?(key)$" matches the module name from its start.
    for key, regex in patterns:
        if regex.match(module):
            return key
    return None


def _peft_layer_index(module: str, layers_pattern: tuple[Regex, ...]) -> int | None:
    # As in peft's check_target_module_exists: the first numbered segment, or the number
    # after one of layers_pattern.
    m = None
    for regex in layers_pattern or (_FIRST_INDEX_RE,):
        m = regex.match(module)
        if m is not None:
            break
    return int(m.group("idx")) if m is not None else None


def _dot_suffixes(module: str) -> set[str]:
    """``module`` and every tail after one of its dots: ``t`` is among them exactly when PEFT's
    ``module == t or module.endswith(f".{t}")`` holds."""
    return {module, *(module[i + 1 :] for i, c in enumerate(module) if c == ".")}


def _num_layers(module_shapes: ModuleShapes) -> int:
    idx = [int(m.group("idx")) for name in module_shapes if (m := _LAYER_RE.search(name))]
    return max(idx) + 1 if idx else 0


def _regex(path: Path, name: str, pattern: str, regex: str) -> Regex:
    """``regex``, which PEFT builds from ``pattern`` of field ``name``, compiled for RE2.

    Python's parser decides what is valid, as in PEFT; RE2 then runs it in time linear in
    the module name, and refuses what only a backtracking engine can run.
    """
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterCorrupt(
            f"adapter {path}: {CONFIG_NAME} {name} has an invalid regex {_short(pattern)} ({e})"
        ) from e
    try:
        return re2.compile(_for_re2(regex), _RE2_OPTIONS)
    except re2.error as e:
        detail = e.args[0] if e.args else ""
        if isinstance(detail, bytes):  # as re2 gives it
            detail = detail.decode(errors="replace")
        raise AdapterUnsupported(
            f"adapter {path}: {CONFIG_NAME} {name} has the regex {_short(pattern)}, which "
            f"linear-time matching cannot run ({_short(detail)}); backreferences, lookarounds "
            "and repeats over 1000 are refused"
        ) from e


def _for_re2(regex: str) -> str:
    # Python's \Z (end of text) is spelled \z in RE2. Otherwise what Python accepts means the
    # same to RE2 or does not compile there, but for rare forms no module-name pattern needs
    # (Python's x{,n}, a literal to RE2; "[[:alpha:]]", a POSIX class to RE2 only).
    out: list[str] = []
    i = 0
    while i < len(regex):
        if regex[i] == "\\" and i + 1 < len(regex):
            out.append("\\z" if regex[i + 1] == "Z" else regex[i : i + 2])
            i += 2
        else:
            out.append(regex[i])
            i += 1
    return "".join(out)


def _short(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: config values and tensor names are
    untrusted text, quoted so that they cannot forge lines in logs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _listing(names: list[str], limit: int = 8) -> str:
    """Module names from a config, the first ``limit`` of them, each quoted if not plain."""
    shown = [n if n.isidentifier() else _short(n, 80) for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past the float range
        return False


__all__ = [
    "AdapterConfig",
    "AdapterError",
    "LoRAWeights",
    "ModuleShapes",
    "load_adapter",
    "lora_targets_from_layers",
    "read_adapter_config",
]

"""Adapter files are untrusted: hostile regexes, files outside the adapter directory,
oversized or non-regular files and NaN/Inf values are refused with a named error, and a
load that fails in any way, or hangs, ends only the requests of that adapter: never the
engine, never its event loop."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

import engine.lora.manager as manager_mod
import engine.lora.peft as peft_mod
from engine import AsyncLLMEngine, LoRARequest, SamplingParams
from engine.errors import (
    AdapterCorrupt,
    AdapterError,
    AdapterLoadTimeout,
    AdapterNotFound,
    AdapterPathNotAllowed,
    AdapterUnsupported,
    LoRAStreamError,
    RequestTimeout,
)
from engine.lora.peft import (
    MAX_CONFIG_BYTES,
    MAX_PATTERNS,
    load_adapter,
    lora_targets_from_layers,
    read_adapter_config,
)
from tests.engine.test_matches_peft import adapter_dirs, make_engine
from tests.lora.test_peft_loading import (
    lora_config,
    make_adapter,
    make_base,
    make_layers,
    raises,
    rewrite_config,
    rewrite_tensors,
)

Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[str, int, int, int]]:
    return lora_targets_from_layers(make_layers(make_base()))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_config(path: Path, fields: dict[str, Any]) -> Path:
    """An adapter directory with this config and an (empty) weights file: enough for
    ``read_adapter_config``, which never reads the weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, **fields}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def weights_equal(a: peft_mod.LoRAWeights, b: peft_mod.LoRAWeights) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(x, y)
        for k in a.tensors
        for x, y in zip(a.tensors[k], b.tensors[k], strict=True)
    )


# ---------------------------------------------------------------------------- patterns
MATCHING: dict[str, dict[str, Any]] = {
    "regex": {"target_modules": r".*\.layers\.[02]\.(self_attn\.k_proj|mlp\.gate_proj)"},
    "regex_end_of_text": {"target_modules": r".*\.(q|v)_proj\Z"},
    "regex_flags": {"target_modules": r"(?i).*\.layers\.1\.SELF_ATTN\.Q_PROJ"},
    "names": {"target_modules": ["q_proj", "self_attn.v_proj", "model.layers.1.mlp.down_proj"]},
    "layers_with_pattern": {
        "target_modules": ["q_proj", "up_proj"],
        "layers_to_transform": [0, 2],
        "layers_pattern": "layers",
    },
    "layers_without_pattern": {"target_modules": ["o_proj"], "layers_to_transform": [1]},
    "exclude_regex": {
        "target_modules": ["q_proj", "k_proj"],
        "exclude_modules": r".*\.layers\.1\..*",
    },
    "exclude_names": {
        "target_modules": ["q_proj", "k_proj"],
        "exclude_modules": ["layers.0.self_attn.q_proj"],
    },
    "rank_and_alpha_patterns": {
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
        "rank_pattern": {"q_proj": 2, r"layers\.1\..*": 3, "mlp.down_proj": 5},
        "alpha_pattern": {r"model\.layers\.0\.self_attn\.o_proj": 32, "v_proj": 3},
    },
}


@pytest.mark.parametrize("variant", list(MATCHING))
def test_targets_ranks_and_alphas_match_peft_on_every_module(tmp_path, variant):
    fields = {"r": 4, "lora_alpha": 8, **MATCHING[variant]}
    cfg = read_adapter_config(write_config(tmp_path, fields), lora_config())
    peft_cfg = LoraConfig(**fields)
    names = [name for name, _ in make_base(layers=3).named_modules() if name]
    targeted = [n for n in names if cfg.targets(n)]
    assert targeted, "every variant targets some module"
    assert targeted == [n for n in names if check_target_module_exists(peft_cfg, n)]
    for n in names:
        rank_key = get_pattern_key(list(peft_cfg.rank_pattern), n)
        alpha_key = get_pattern_key(list(peft_cfg.alpha_pattern), n)
        assert cfg.rank_for(n) == peft_cfg.rank_pattern.get(rank_key, peft_cfg.r), n
        assert cfg.alpha_for(n) == peft_cfg.alpha_pattern.get(alpha_key, peft_cfg.lora_alpha), n


def many_modules(num_layers: int = 200) -> dict[str, tuple[str, int, int, int]]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    return {
        f"model.layers.{i}.{name}": (f"model.layers.{i}.{name}", 0, 32, 32)
        for i in range(num_layers)
        for name in names
    }


# Python's re takes minutes or more on each of these (backtracking); the marker turns a
# regression into a failure instead of a hang.
@pytest.mark.timeout(60)
def test_a_catastrophic_target_regex_is_matched_in_linear_time(tmp_path):
    shapes = many_modules()
    path = write_config(tmp_path, {"target_modules": "(.*.*)*X"})
    cfg = read_adapter_config(path, lora_config(), shapes)
    assert not any(cfg.targets(m) for m in shapes)
    assert cfg.targets("model.layers.0.mlp.X")

    write_config(tmp_path, {"target_modules": ["q_proj"], "exclude_modules": "(.*.*)*X"})
    cfg = read_adapter_config(path, lora_config(), shapes)
    assert sum(cfg.targets(m) for m in shapes) == 200


@pytest.mark.timeout(60)
def test_nested_quantifier_pattern_keys_load_in_linear_time(tmp_path, shapes):
    make_adapter(tmp_path, r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
    expected = load_adapter(tmp_path, lora_config(), shapes)
    rewrite_config(
        tmp_path,
        rank_pattern={"(.+)+_proj_X": 6, "q_proj": 2},
        alpha_pattern={"(.+)+X": 1},
    )
    # The hostile keys match no module, so the weights are the same as without them.
    assert weights_equal(load_adapter(tmp_path, lora_config(), shapes), expected)


@pytest.mark.parametrize(
    "pattern",
    [r"(q_proj)\1", r"(?!k_proj).*_proj", r"(?<=self_attn\.)q_proj", "q{1001}"],
    ids=["backreference", "lookahead", "lookbehind", "repeat"],
)
@pytest.mark.parametrize(
    "field",
    ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"],
)
def test_a_regex_only_backtracking_can_run_is_refused_naming_it(tmp_path, field, pattern):
    fields: dict[str, Any] = {
        "target_modules": {"target_modules": pattern},
        "exclude_modules": {"target_modules": ["q_proj"], "exclude_modules": pattern},
        "rank_pattern": {"target_modules": ["q_proj"], "rank_pattern": {pattern: 2}},
        "alpha_pattern": {"target_modules": ["q_proj"], "alpha_pattern": {pattern: 2}},
        "layers_pattern": {
            "target_modules": ["q_proj"],
            "layers_to_transform": [0],
            "layers_pattern": pattern,
        },
    }[field]
    with raises(AdapterUnsupported, tmp_path, field, repr(pattern), "linear-time"):
        read_adapter_config(write_config(tmp_path, fields), lora_config())


def test_a_refused_pattern_is_quoted_in_the_message(tmp_path):
    pattern = "\x1b\\[31m\nCRITICAL forged line (x)\\1"
    with pytest.raises(AdapterUnsupported) as info:
        read_adapter_config(write_config(tmp_path, {"target_modules": pattern}), lora_config())
    message = str(info.value)
    assert "\x1b" not in message
    assert "\n" not in message
    assert "\\x1b" in message
    assert "\\nCRITICAL" in message


def test_a_regex_python_rejects_is_refused_as_in_peft(tmp_path):
    with raises(AdapterCorrupt, tmp_path, "rank_pattern", "invalid regex", "'q_proj('"):
        read_adapter_config(
            write_config(tmp_path, {"target_modules": ["q_proj"], "rank_pattern": {"q_proj(": 2}}),
            lora_config(),
        )


def test_too_many_patterns_are_refused(tmp_path):
    keys = {f"layers\\.{i}\\.self_attn\\.q_proj": 2 for i in range(MAX_PATTERNS + 1)}
    with raises(AdapterUnsupported, tmp_path, str(MAX_PATTERNS + 1), "rank_pattern"):
        read_adapter_config(
            write_config(tmp_path, {"target_modules": ["q_proj"], "rank_pattern": keys}),
            lora_config(),
        )


# ---------------------------------------------------------------------------- files
@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A real PEFT adapter in ``tmp_path/adapter``; ``tmp_path/outside`` is outside it."""
    (tmp_path / "outside").mkdir()
    make_adapter(tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    return tmp_path / "adapter"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_symlinked_out_of_the_adapter_directory_is_refused(adapter, shapes, name):
    target = adapter.parent / "outside" / name
    shutil.move(adapter / name, target)
    (adapter / name).symlink_to(target)
    with raises(AdapterPathNotAllowed, adapter, name, "outside the adapter directory"):
        read_adapter_config(adapter, lora_config(), shapes)
    with raises(AdapterPathNotAllowed, adapter, name):
        load_adapter(adapter, lora_config(), shapes)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_swapped_for_a_symlink_after_the_check_is_refused_at_the_load(adapter, shapes, name):
    read_adapter_config(adapter, lora_config(), shapes)  # the request is accepted
    target = adapter.parent / "outside" / name
    shutil.copy(adapter / name, target)
    (adapter / name).unlink()
    (adapter / name).symlink_to(target)
    with raises(AdapterPathNotAllowed, adapter, name):
        load_adapter(adapter, lora_config(), shapes)


def test_symlinks_inside_the_adapter_directory_are_followed(adapter, shapes):
    expected = load_adapter(adapter, lora_config(), shapes)
    (adapter / "blobs").mkdir()
    shutil.move(adapter / "adapter_model.safetensors", adapter / "blobs" / "w")
    (adapter / "adapter_model.safetensors").symlink_to("blobs/w")
    assert weights_equal(load_adapter(adapter, lora_config(), shapes), expected)
    # An operator's path may itself go through a symlink: its files lie in the real directory.
    (adapter.parent / "named").symlink_to(adapter)
    assert weights_equal(load_adapter(adapter.parent / "named", lora_config(), shapes), expected)


# Opening a FIFO for reading blocks until a writer comes: a regression hangs here.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(adapter, shapes, name):
    (adapter / name).unlink()
    os.mkfifo(adapter / name)
    with raises(AdapterCorrupt, adapter, name, "not a regular file"):
        read_adapter_config(adapter, lora_config(), shapes)


def test_an_oversized_config_is_refused_unread(adapter):
    text = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(text + " " * MAX_CONFIG_BYTES)
    with raises(AdapterCorrupt, adapter, "adapter_config.json", str(MAX_CONFIG_BYTES)):
        read_adapter_config(adapter, lora_config())


@pytest.mark.timeout(60)
def test_a_weights_file_larger_than_any_adapter_of_the_model_is_refused_unread(adapter, shapes):
    # Sparse: 64 GiB that take no disk, and would take the memory of the host to read.
    os.truncate(adapter / "adapter_model.safetensors", 64 << 30)
    with raises(AdapterCorrupt, adapter, "adapter_model.safetensors", str(64 << 30)):
        load_adapter(adapter, lora_config(), shapes)


def test_a_header_claiming_absurd_shapes_is_corrupt(adapter, shapes):
    header = json.dumps(
        {Q_PROJ_A: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    ).encode()
    blob = struct.pack("<Q", len(header)) + header + bytes(16)
    (adapter / "adapter_model.safetensors").write_bytes(blob)
    with raises(AdapterCorrupt, adapter, "cannot read adapter_model.safetensors"):
        load_adapter(adapter, lora_config(), shapes)


@pytest.mark.parametrize(
    "text",
    ['{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"r": 1' + "0" * 10_000 + "}"],
    ids=["deep", "long_int"],
)
def test_json_the_parser_gives_up_on_is_corrupt(adapter, text):
    (adapter / "adapter_config.json").write_text(text)
    with raises(AdapterCorrupt, adapter, "not valid JSON"):
        read_adapter_config(adapter, lora_config())


def test_reading_weights_stops_at_the_time_limit(adapter, shapes, monkeypatch):
    monkeypatch.setattr(peft_mod, "LOAD_TIMEOUT_S", -1.0)
    with raises(AdapterLoadTimeout, adapter, "adapter_model.safetensors"):
        load_adapter(adapter, lora_config(), shapes)


# ---------------------------------------------------------------------------- numbers
BAD_NUMBERS: dict[str, tuple[dict[str, Any], str]] = {
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
    "alpha_inf": ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
    "alpha_minus_inf": ({"lora_alpha": float("-inf")}, "lora_alpha=-inf"),
    "alpha_past_float": ({"lora_alpha": 10**400}, "lora_alpha=1000"),
    "alpha_string": ({"lora_alpha": "16"}, "lora_alpha='16'"),
    "alpha_bool": ({"lora_alpha": True}, "lora_alpha=True"),
    "alpha_pattern_nan": ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj']"),
    "r_zero": ({"r": 0}, "field r=0"),
    "r_float": ({"r": 2.5}, "field r=2.5"),
    "r_string": ({"r": "4"}, "field r='4'"),
    "rank_pattern_zero": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0"),
    "rank_pattern_nan": ({"rank_pattern": {"q_proj": float("nan")}}, "rank_pattern['q_proj']"),
    "use_rslora_string": ({"use_rslora": "false"}, "use_rslora='false'"),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_config_numbers_must_be_finite_and_of_their_type(tmp_path, case):
    fields, fragment = BAD_NUMBERS[case]
    path = write_config(tmp_path, {"target_modules": ["q_proj"], **fields})
    with raises(AdapterCorrupt, tmp_path, fragment, "is invalid"):
        read_adapter_config(path, lora_config())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("ab", ["lora_A", "lora_B"])
def test_a_weight_that_is_not_finite_is_refused_naming_the_tensor(adapter, shapes, ab, value):
    key = Q_PROJ_A.replace("lora_A", ab)

    def poison(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd[key] = sd[key].clone()
        sd[key][0, 0] = value
        return sd

    rewrite_tensors(adapter, poison)
    read_adapter_config(adapter, lora_config(), shapes)  # the config is fine
    with raises(AdapterCorrupt, adapter, repr(key), "NaN or Inf"):
        load_adapter(adapter, lora_config(), shapes)


def test_a_scaling_that_overflows_the_lora_dtype_is_refused(tmp_path, shapes):
    make_adapter(tmp_path, r=4, lora_alpha=1e7, target_modules=["q_proj"])
    load_adapter(tmp_path, lora_config(), shapes)  # finite in float32
    with raises(AdapterCorrupt, tmp_path, "q_proj", "overflows torch.float16"):
        load_adapter(tmp_path, lora_config(lora_dtype=torch.float16), shapes)


# ---------------------------------------------------------------------------- the engine
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = "Once upon a time"


def copy_adapter(src: Path, dst: Path, **config_changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


async def tokens(
    engine: AsyncLLMEngine, request_id: str, lora: LoRARequest | None = None
) -> list[int]:
    outputs = [out async for out in engine.generate(PROMPT, PARAMS, request_id, lora_request=lora)]
    final = outputs[-1]
    assert final.finished
    if final.error is not None:  # a load that failed ends the request with its error
        assert final.outputs[0].finish_reason == "error"
        raise final.error
    return list(final.outputs[0].token_ids)


@pytest.mark.anyio
async def test_hostile_adapters_fail_their_requests_alone(tiny_model_dir, tmp_path, monkeypatch):
    dirs = adapter_dirs(tiny_model_dir)
    good = LoRARequest(dirs[0].name, 1, str(dirs[0]))
    nan_alpha = copy_adapter(dirs[1], tmp_path / "nan-alpha", lora_alpha=float("nan"))
    inf_weights = copy_adapter(dirs[1], tmp_path / "inf-weights")
    weights = load_file(inf_weights / "adapter_model.safetensors")
    inf_key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[inf_key] = weights[inf_key].clone()
    weights[inf_key][0, 0] = float("inf")
    save_file(weights, inf_weights / "adapter_model.safetensors")
    regex = copy_adapter(dirs[2], tmp_path / "regex", target_modules="(.*.*)*X")
    oom = copy_adapter(dirs[3], tmp_path / "oom")
    real_load = manager_mod.load_adapter

    def load(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(oom):
            raise MemoryError
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "load_adapter", load)
    engine = AsyncLLMEngine(make_engine(tiny_model_dir, max_loras=2))
    try:
        clean = {
            "base": await tokens(engine, "clean-base"),
            "good": await tokens(engine, "c", good),
        }
        bad = {
            "nan-alpha": LoRARequest("nan-alpha", 11, str(nan_alpha)),
            "inf-weights": LoRARequest("inf-weights", 12, str(inf_weights)),
            "regex": LoRARequest("regex", 13, str(regex)),
            "oom": LoRARequest("oom", 14, str(oom)),
        }
        results: dict[str, list[int] | LoRAStreamError] = {}

        async def run(key: str, lora: LoRARequest | None) -> None:
            try:
                results[key] = await tokens(engine, key, lora)
            except LoRAStreamError as e:
                results[key] = e

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "base", None)
            tg.start_soon(run, "good", good)
            for key, lora in bad.items():
                tg.start_soon(run, key, lora)

        assert results["base"] == clean["base"]
        assert results["good"] == clean["good"]
        errors = {k: results[k] for k in bad}
        assert all(isinstance(e, AdapterError) for e in errors.values()), errors
        assert {k: getattr(e, "code", None) for k, e in errors.items()} == {
            "nan-alpha": "adapter_corrupt",
            "inf-weights": "adapter_corrupt",
            "regex": "adapter_corrupt",  # it targets nothing: no weights to serve
            "oom": "adapter_error",
        }
        assert "lora_alpha=nan" in str(errors["nan-alpha"])
        assert repr(inf_key) in str(errors["inf-weights"])
        assert "MemoryError" in str(errors["oom"])
        assert not engine.errored
        assert await tokens(engine, "after", good) == clean["good"]
    finally:
        await engine.shutdown()


@pytest.mark.anyio
async def test_a_hung_config_read_times_out_and_never_holds_the_event_loop(
    tiny_model_dir, monkeypatch
):
    hung_dir = adapter_dirs(tiny_model_dir)[1]
    hung = LoRARequest(hung_dir.name, 2, str(hung_dir))
    entered, gate = threading.Event(), threading.Event()
    real_read = manager_mod.read_adapter_config

    def held_read(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(hung_dir):
            entered.set()
            gate.wait(120)  # a file system that does not answer
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "read_adapter_config", held_read)
    engine = AsyncLLMEngine(make_engine(tiny_model_dir, max_loras=2), prepare_timeout_s=1.0)
    try:
        timeouts: list[AdapterLoadTimeout] = []

        async def hung_request() -> None:
            try:
                await tokens(engine, "hung", hung)
            except AdapterLoadTimeout as e:
                timeouts.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hung_request)
            await anyio.to_thread.run_sync(entered.wait, 60)
            # The loop streams a whole request while the adapter's config read hangs.
            assert len(await tokens(engine, "base")) == PARAMS.max_tokens
        # ...and the hung request failed while its read still hung.
        assert not gate.is_set()
        [timeout] = timeouts
        assert timeout.code == "adapter_load_timeout"
        assert hung_dir.name in str(timeout)
        assert engine.num_unfinished == 0

        # A caller that gives up on a request waits for no thread either.
        entered.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(tokens, engine, "cancelled", hung)
            await anyio.to_thread.run_sync(entered.wait, 60)
            tg.cancel_scope.cancel()
        assert not gate.is_set()
        assert engine.num_unfinished == 0
    finally:
        gate.set()
        await engine.shutdown()


@pytest.mark.anyio
async def test_a_hung_tokenizer_times_out_with_request_timeout(tiny_model_dir, monkeypatch):
    engine = AsyncLLMEngine(make_engine(tiny_model_dir), prepare_timeout_s=0.5)
    gate = threading.Event()
    real_tokenize = engine.engine.tokenize

    def held_tokenize(prompt: Any) -> Any:
        if prompt == "hang":
            gate.wait(120)
        return real_tokenize(prompt)

    monkeypatch.setattr(engine.engine, "tokenize", held_tokenize)
    try:
        with pytest.raises(RequestTimeout) as info:
            async for _ in engine.generate("hang", PARAMS, "hang"):
                pass
        assert info.value.code == "request_timeout"
        assert len(await tokens(engine, "after")) == PARAMS.max_tokens
    finally:
        gate.set()
        await engine.shutdown()


@pytest.mark.anyio
async def test_add_lora_reads_the_disk_off_the_step_thread(tiny_model_dir, monkeypatch):
    slow_dir = adapter_dirs(tiny_model_dir)[3]
    entered, gate = threading.Event(), threading.Event()
    real_load = manager_mod.load_adapter

    def held_load(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(slow_dir):
            entered.set()
            assert gate.wait(120)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(manager_mod, "load_adapter", held_load)
    engine = AsyncLLMEngine(make_engine(tiny_model_dir))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.add_lora, LoRARequest(slow_dir.name, 4, str(slow_dir)))
            await anyio.to_thread.run_sync(entered.wait, 60)
            # Steps run while the adapter is read.
            assert len(await tokens(engine, "base")) == PARAMS.max_tokens
            assert not gate.is_set()
            gate.set()
        assert 4 in engine.engine.list_loras()
    finally:
        gate.set()
        await engine.shutdown()


def test_a_missing_weights_file_is_still_not_found(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with raises(AdapterNotFound, adapter, "adapter_model.safetensors"):
        read_adapter_config(adapter, lora_config())

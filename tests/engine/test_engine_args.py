from __future__ import annotations

import argparse

import pytest
import torch

from engine.config import LORA_RANKS, EngineArgs, LoRAModulePath


def test_defaults_match_vllm():
    args = EngineArgs(model="m")
    assert args.enable_lora is False
    assert args.max_loras == 1
    assert args.max_lora_rank == 16
    assert args.max_cpu_loras is None
    assert args.lora_dtype == "auto"
    assert args.fully_sharded_loras is False
    assert args.max_num_seqs == 256


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_loras", 0, ">= 1"),
        ("max_loras", "2", ">= 1"),
        ("max_lora_rank", 7, "1, 8, 16"),
        ("max_lora_rank", 1024, "512"),
        ("max_cpu_loras", 1, "max_loras (2)"),
        ("lora_dtype", "int8", "float16"),
        ("lora_dtype", torch.int8, "float16"),
        ("max_num_seqs", 0, ">= 1"),
        ("dtype", "fp8", "bfloat16"),
        ("device", "tpu", "cpu"),
        ("block_size", 3, "16"),
        ("gpu_memory_utilization", 1.5, "(0, 1]"),
        ("tensor_parallel_size", 0, "from 1 to 64"),
        ("max_model_len", 0, ">= 1"),
        ("max_num_batched_tokens", -1, ">= 1"),
        ("num_gpu_blocks_override", 0, ">= 1"),
        ("max_num_batched_tokens", 8, ">= max_num_seqs (256)"),
        ("lora_target_modules", ["lm_head"], "q_proj"),
        ("max_cudagraph_capture_size", -1, ">= 0"),
        ("max_cudagraph_capture_size", 1.5, ">= 0"),
    ],
)
def test_bad_value_names_field_value_and_allowed(field, value, allowed):
    kwargs = {"model": "m", "max_loras": 2, field: value}
    with pytest.raises(ValueError, match=f"EngineArgs.{field}=") as info:
        EngineArgs(**kwargs)
    assert repr(value) in str(info.value)
    assert allowed in str(info.value)


@pytest.mark.parametrize("rank", LORA_RANKS)
def test_every_vllm_rank_is_accepted(rank):
    assert EngineArgs(model="m", max_lora_rank=rank).max_lora_rank == rank


def test_lora_dtype_accepts_torch_dtype():
    assert EngineArgs(model="m", lora_dtype=torch.bfloat16).lora_dtype is torch.bfloat16


def test_lora_modules_parse_name_equals_path():
    args = EngineArgs(model="m", enable_lora=True, lora_modules=["sql=/a/b", "chat=/c"])
    assert args.lora_modules == [LoRAModulePath("sql", "/a/b"), LoRAModulePath("chat", "/c")]
    with pytest.raises(ValueError, match="name=path"):
        EngineArgs(model="m", enable_lora=True, lora_modules=["nopath"])
    with pytest.raises(ValueError, match="enable_lora"):
        EngineArgs(model="m", lora_modules=["a=/b"])


def test_cli_flags_use_vllm_names():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(
        [
            "--model",
            "m",
            "--enable-lora",
            "--max-loras",
            "4",
            "--max-lora-rank",
            "32",
            "--max-cpu-loras",
            "8",
            "--lora-dtype",
            "bfloat16",
            "--fully-sharded-loras",
            "--max-num-seqs",
            "64",
            "--lora-modules",
            "a=/x",
            "b=/y",
            "--no-enable-chunked-prefill",
            "--no-async-scheduling",
            "--max-cudagraph-capture-size",
            "512",
        ]
    )
    args = EngineArgs.from_cli_args(ns)
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        True,
        4,
        32,
        8,
    )
    assert args.lora_dtype == "bfloat16"
    assert args.fully_sharded_loras is True
    assert args.max_num_seqs == 64
    assert args.enable_chunked_prefill is False
    assert args.async_scheduling is False
    assert args.max_cudagraph_capture_size == 512
    assert EngineArgs(model="m").async_scheduling is True
    assert [m.name for m in args.lora_modules] == ["a", "b"]


def test_kernel_backend_has_a_flag_and_benchmark_settings_do_not():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(
        parser.parse_args(["--model", "m", "--kernel-backend", "torch"])
    )
    assert args.kernel_config().backend == "torch"
    assert EngineArgs(model="m").kernel_config().backend == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--kernel-backend", "cuda"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--lora-fused-silu"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kernel_backend", "cuda"),
        ("lora_fused_silu", 1),
        ("lora_stack_a_max", -1),
        ("kernel_launch", {"attention_decode_num_warps": 0}),
        ("kernel_launch", {"no_such_setting": 4}),
    ],
)
def test_bad_kernel_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"EngineArgs.{field}="):
        EngineArgs(model="m", **{field: value})


def test_cli_rejects_bad_value_with_field_name():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "m", "--max-loras", "4", "--max-cpu-loras", "2"])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineArgs.from_cli_args(ns)


def test_mixed_step_graphs_default_to_1024_tokens_within_the_step_budget(tiny_model_dir):
    def resolved(**kw):
        return EngineArgs(model=str(tiny_model_dir), device="cpu", **kw).create_engine_config()

    assert resolved(max_num_batched_tokens=8192).max_cudagraph_capture_size == 1024
    assert resolved(max_num_batched_tokens=300).max_cudagraph_capture_size == 300
    assert resolved(max_cudagraph_capture_size=0).max_cudagraph_capture_size == 0
    config = resolved(max_num_batched_tokens=4096, max_cudagraph_capture_size=2048)
    assert config.max_cudagraph_capture_size == 2048


# ------------------------------------------------------------------ vLLM's other options
@pytest.mark.parametrize(
    ("field", "value", "instead"),
    [
        ("quantization", "awq", "unquantized"),
        ("quantization", "fp8", "dtype"),
        ("kv_cache_dtype", "fp8", "model's dtype"),
        ("kv_cache_dtype", "fp8_e5m2", "auto"),
        ("pipeline_parallel_size", 2, "allowed: 1"),
        ("cpu_offload_gb", 4, "allowed: 0"),
        ("tokenizer_mode", "slow", "fast tokenizer"),
        ("tokenizer_mode", "mistral", "auto, hf"),
        ("load_format", "pt", "safetensors"),
        ("load_format", "bitsandbytes", "safetensors, gguf"),
        ("swap_space", -1, ">= 0"),
        ("served_model_name", "", "non-empty"),
        ("trust_remote_code", "yes", "true or false"),
    ],
)
def test_refused_vllm_options_raise_value_error_naming_them(field, value, instead):
    with pytest.raises(ValueError, match=rf"EngineArgs\.{field}=.*{instead}"):
        EngineArgs(model="m", **{field: value})


def test_accepted_vllm_options_construct():
    args = EngineArgs(
        model="m",
        trust_remote_code=True,
        tokenizer_mode="hf",
        load_format="safetensors",
        kv_cache_dtype="auto",
        swap_space=8,
        cpu_offload_gb=0,
        served_model_name=["mine", "alias"],
        pipeline_parallel_size=1,
        enable_prefix_caching=False,
        quantization=None,
    )
    assert args.served_model_name == ["mine", "alias"]


def test_served_model_name_and_trust_remote_code_resolve(tiny_model_dir, tmp_path):
    import json
    import shutil

    config = EngineArgs(
        model=str(tiny_model_dir), served_model_name="tiny", trust_remote_code=True, device="cpu"
    ).create_engine_config()
    assert config.served_model_name == "tiny"
    assert EngineArgs(model=str(tiny_model_dir)).create_engine_config().served_model_name == str(
        tiny_model_dir
    )
    # A checkpoint whose code would be its own: refused, naming the option.
    other = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MyCustomForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"trust_remote_code=True .*MyCustomForCausalLM"):
        EngineArgs(model=str(other), trust_remote_code=True, device="cpu").create_engine_config()


def test_llm_refuses_an_unknown_option_with_value_error(tiny_model_dir):
    from engine.llm import LLM

    with pytest.raises(ValueError, match="not_an_option"):
        LLM(str(tiny_model_dir), not_an_option=1)


def test_model_is_checked_after_parsing_so_set_defaults_works():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    parser.set_defaults(model="from-defaults")
    assert EngineArgs.from_cli_args(parser.parse_args([])).model == "from-defaults"
    bare = EngineArgs.add_cli_args(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="--model"):
        EngineArgs.from_cli_args(bare.parse_args([]))


def test_flexible_parser_takes_underscores_and_dashes_alike():
    from engine import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(
        ["--model", "m", "--max_loras", "3", "--max-lora-rank=32", "--enable_lora",
         "--served_model_name", "a_b", "--lora-modules", "x_y=/p_q"]
    )  # fmt: skip
    args = EngineArgs.from_cli_args(ns)
    assert (args.max_loras, args.max_lora_rank, args.enable_lora) == (3, 32, True)
    assert args.served_model_name == ["a_b"]  # values keep their underscores
    assert [(m.name, m.path) for m in args.lora_modules] == [("x_y", "/p_q")]


def test_preloading_more_adapters_than_host_memory_holds_is_refused():
    modules = ["a=/a", "b=/b", "c=/c"]
    with pytest.raises(ValueError, match=r"max_cpu_loras=2 is invalid: .*lora_modules \(3\)"):
        EngineArgs(model="m", enable_lora=True, max_cpu_loras=2, lora_modules=modules)


def test_every_preloaded_adapter_stays_loaded_by_default(tiny_model_dir):
    from engine import LLMEngine

    adapters = sorted(p for p in (tiny_model_dir / "adapters").iterdir() if p.is_dir())
    args = EngineArgs(
        model=str(tiny_model_dir),
        device="cpu",
        enable_lora=True,
        max_lora_rank=32,
        lora_modules=[f"{p.name}={p}" for p in adapters],
        disable_log_stats=True,
    )
    engine = LLMEngine.from_engine_args(args)
    assert engine.config.lora.max_cpu_loras == len(adapters) > args.max_loras
    assert engine.list_loras() == set(range(1, len(adapters) + 1))

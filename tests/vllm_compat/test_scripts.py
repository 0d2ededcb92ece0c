"""vLLM-style scripts run as they are, on the tiny model: each uses the API the way vLLM's
examples do, with only ``vllm`` replaced by ``engine`` in the imports and the model path
(``VLLM_COMPAT_MODEL``) set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def run_script(name: str, model_dir: Path, *args: str) -> str:
    env = {
        **os.environ,
        "VLLM_COMPAT_MODEL": str(model_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script", ["offline_multilora.py"])
def test_offline_multilora_with_prompt_logprobs_and_one_slot(script, tiny_model_dir):
    out = run_script(script, tiny_model_dir)
    finished = out.count("RequestOutput(request_id=")
    assert finished == 4
    # Three requests asked for prompt logprobs: the first prompt token has none.
    assert out.count("prompt_logprobs=[None, {") == 3
    assert "lora_name='sql-lora'" in out or "LoRARequest(lora_name='sql-lora'" in out
    assert "LoRARequest(lora_name='sql-lora2'" in out
    assert "Logprob(logprob=" in out


def test_llm_engine_example_from_the_command_line_with_n_2(tiny_model_dir):
    out = run_script(
        "llm_engine_example.py",
        tiny_model_dir,
        "--model",
        str(tiny_model_dir),
        "--max_num_seqs",  # vLLM's parser takes either spelling
        "8",
        "--enforce-eager",
    )
    lines = [line.split(" ", 2)[:2] for line in out.splitlines() if re.match(r"^\d+ \d+ ", line)]
    assert sorted(map(tuple, lines)) == [("0", "0"), ("1", "0"), ("2", "0"), ("2", "1")]
    # Request 0 asked for logprobs=1: its first token's entry has a rank.
    first = next(line for line in out.splitlines() if line.startswith("0 0 "))
    assert re.search(r"\(\d+, -?\d+\.\d+, \d+\)", first)


def test_llm_chat_with_an_adapter(tiny_model_dir):
    out = run_script("chat_with_lora.py", tiny_model_dir)
    assert out.count("Generated text:") == 3
    assert "adapter: sql-lora" in out
    assert "<|assistant|>" in out  # the prompt went through the chat template


def test_async_streaming_ends_with_a_synchronous_shutdown(tiny_model_dir):
    out = run_script("async_streaming.py", tiny_model_dir)
    assert out.count("✅ Generation complete!") == 3
    assert "streamed 3 responses" in out

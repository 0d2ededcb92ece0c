"""The README's Python example runs as written, and the CLI makes a tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "LLMEngine.from_engine_args" in b)
    example = example.replace('"/tmp/tiny"', repr(str(tmp_path / "tiny")))
    example = example.replace(
        "EngineArgs(model=str(model_dir),", "EngineArgs(model=str(model_dir), device='cpu',"
    )
    proc = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["base", "lora0", "lora1"]


def test_cli_make_tiny_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "make-tiny-model",
            "--out",
            str(out),
            "--adapters",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).model_type == "llama"
    assert AutoTokenizer.from_pretrained(out).encode("hello world")
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["lora0", "lora1", "lora2"]

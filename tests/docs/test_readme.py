"""The README's Python example runs as written, and the CLI makes a tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.slow
def test_readme_zero_to_fleet_runs_as_written(tmp_path):
    """The README's path from the demo to a fleet, command for command: a worker on the demo
    model and adapters, one request, status, the gateway with the official openai client,
    and a load test. Only the Redis URL, the gateway's port and the venv are the test's."""
    from broker.embedded import RedisServer, free_port

    section = _section((ROOT / "README.md").read_text(), "From zero to a fleet")
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    example = ROOT / "scripts" / "openai_example.py"
    assert example.read_text() == python  # the README shows the file as it is
    port = free_port()
    (tmp_path / "redis").mkdir()
    with RedisServer(data_dir=tmp_path / "redis") as redis_server:
        script = bash.replace("redis://localhost:6379/0", redis_server.url)
        script = script.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
        local_example = tmp_path / "openai_example.py"
        local_example.write_text(python.replace(":8000", f":{port}"))
        script = script.replace("scripts/openai_example.py", str(local_example))
        script = script.replace(
            ". .venv/bin/activate", f"export PATH={Path(sys.executable).parent}:$PATH"
        )
        # The background steps end with the script.
        script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
        proc = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # generate streamed a reply, then its summary line went to stderr.
    assert re.search(r"\[length\] \d+ prompt \+ 32 completion tokens", proc.stderr), proc.stderr
    # status listed the live worker with the demo's adapters.
    assert "live workers (lorastream)" in out
    assert "caps, french," in out
    assert "json, pirate" in out
    # The openai client printed the adapter's reply: a line of words.
    assert re.search(r"^\w+[ ,'\w]{10,}", out, flags=re.M), out[-2000:]
    results = json.loads((tmp_path / "lt" / "results.json").read_text())
    assert results["summary"]["completed"] == 20, results["summary"]

"""``lorastream demo`` (what scripts/demo.sh runs) prints clean text, and every adapter's
reply differs from the base model's."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from broker.demo import DEMO_ADAPTERS


@pytest.mark.slow
def test_demo_prints_clean_text_and_each_adapter_answers_differently():
    # The model is fetched into $LORASTREAM_CACHE on first use (once per machine).
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-level", "WARNING",
         "demo", "--plain", "--device", "cpu", "--max-tokens", "40"],
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    text = proc.stdout.decode("utf-8")  # strict: invalid UTF-8 raises
    controls = {c for c in text if unicodedata.category(c) == "Cc" and c != "\n"}
    assert not controls, controls
    # The summary: "== name (status, N tokens, ...) ==" then the reply.
    blocks = re.split(r"^== (.+?) \((\w+), (\d+) tokens.*\) ==$", text, flags=re.M)
    found = [blocks[i : i + 4] for i in range(1, len(blocks), 4)]
    replies = {name: body.strip() for name, _, _, body in found}
    statuses = {name: status for name, status, _, _ in found}
    adapters = sorted(p.name for p in DEMO_ADAPTERS.iterdir() if p.is_dir())
    assert sorted(replies) == sorted(["base model", *adapters])
    assert set(statuses.values()) <= {"stop", "length"}, statuses
    for name in adapters:
        assert replies[name], name
        assert replies[name] != replies["base model"], name
    # The streamed lines carry the same replies as the summary.
    streamed = dict.fromkeys(replies, "")
    for line in text.splitlines():
        name, sep, delta = line.partition(" | ")
        if sep and name.strip() in streamed:
            streamed[name.strip()] += delta
    for name, reply in replies.items():
        assert " ".join(streamed[name].split()) == " ".join(reply.split()), name


def test_tiny_model_demo_prints_its_noise_as_clean_text(tmp_path):
    # The tiny random model emits any bytes (NULs broke the old table).
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--log-level", "WARNING", "demo", "--model", "tiny",
         "--plain", "--device", "cpu", "--adapters", "2", "--max-tokens", "24",
         "--cache-dir", str(tmp_path)],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    text = proc.stdout.decode("utf-8")
    assert {c for c in text if unicodedata.category(c) == "Cc" and c != "\n"} == set()
    assert re.findall(r"^== (.+?) \(", text, flags=re.M) == ["base model", "lora0", "lora1"]


def test_control_characters_are_shown_as_escapes():
    from broker.demo import printable

    assert printable("a\x00b\nc\x1b[31md\té") == "a\\x00b\nc\\x1b[31md\\x09é"


def test_print_serve_args_gives_flags_engine_args_accepts():
    import argparse
    import shlex

    from engine import EngineArgs

    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "demo", "--print-serve-args"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    flags = shlex.split(proc.stdout.strip().splitlines()[-1])
    args = EngineArgs.from_cli_args(
        EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(flags)
    )
    assert args.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert sorted(m.name for m in args.lora_modules) == sorted(
        p.name for p in DEMO_ADAPTERS.iterdir() if p.is_dir()
    )
    assert all((Path(m.path) / "adapter_config.json").is_file() for m in args.lora_modules)


def test_demo_flags_show_help_and_defaults_without_loading_the_model_stack():
    code = (
        "import argparse, sys\n"
        "from broker.demo import add_args\n"
        "p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)\n"
        "add_args(p)\n"
        "f = p._get_formatter()\n"
        "for a in p._actions[1:]:\n"
        "    print('FLAG', a.option_strings[0], bool(a.help),\n"
        "          'default' in (f._get_help_string(a) or '').lower())\n"
        "print('loaded', *(m for m in ('torch', 'transformers', 'starlette', 'uvicorn',\n"
        "                              'matplotlib', 'redis') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    flags = [line.split() for line in lines if line.startswith("FLAG")]
    assert len(flags) >= 9
    assert [f[1] for f in flags if f[2:] != ["True", "True"]] == []
    assert lines[-1] == "loaded"

"""``EngineArgs.model`` as a Hugging Face Hub repo id, resolved from a pre-filled Hub cache
with ``HF_HUB_OFFLINE=1`` (huggingface_hub's own lookup, in a process started with those
variables), and local paths that are not checkpoints refused with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import EngineArgs, LLMEngine, SamplingParams

REVISION = "0123456789abcdef0123456789abcdef01234567"

# Each argument: spec|download_dir|generate (1: build the engine and generate 8 tokens).
RESOLVE = """
import json, sys
from engine import EngineArgs, LLMEngine, SamplingParams
for arg in sys.argv[1:]:
    spec, download_dir, generate = arg.split("|")
    try:
        args = EngineArgs(model=spec, download_dir=download_dir or None, device="cpu",
                          dtype="float32", disable_log_stats=True)
        if generate == "0":
            print(json.dumps({"model": args.create_engine_config().model}))
            continue
        engine = LLMEngine.from_engine_args(args)
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        continue
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("r", "Once upon a time", params)
    out = []
    while engine.has_unfinished_requests():
        out += [list(o.outputs[0].token_ids) for o in engine.step() if o.finished]
    print(json.dumps({"model": engine.config.model, "tokens": out[0]}))
"""


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hub cache entry as huggingface_hub lays it out; returns the snapshot directory."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def greedy(model: str) -> list[int]:
    args = EngineArgs(model=model, device="cpu", dtype="float32", disable_log_stats=True)
    engine = LLMEngine.from_engine_args(args)
    engine.add_request(
        "r", "Once upon a time", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return list(out.outputs[0].token_ids)
    raise AssertionError("no output")


@pytest.fixture(scope="module")
def offline(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(snapshot paths, what the offline process resolved for each case)."""
    from tests.model.test_gguf import write_gguf

    root = tmp_path_factory.mktemp("hub")
    files = {p.name: p for p in tiny_model_dir.iterdir() if p.is_file()}
    gguf = write_gguf(tiny_model_dir, root / "tiny.F32.gguf", "F32")
    snapshots = {
        "env": hub_cache(root / "env-cache", "acme/tiny", files),
        "dir": hub_cache(root / "other-cache", "acme/tiny", files),
        "gguf": hub_cache(root / "env-cache", "acme/tiny-gguf", {gguf.name: gguf}),
    }
    cases = {
        "env": "acme/tiny||1",
        "dir": f"acme/tiny|{root / 'other-cache'}|0",
        "gguf": "acme/tiny-gguf/tiny.F32.gguf||0",
        "missing": "acme/missing||0",
    }
    env = {**os.environ, "HF_HUB_CACHE": str(root / "env-cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE, *cases.values()],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return snapshots, dict(zip(cases, lines, strict=True))


def test_repo_id_loads_the_cached_snapshot_offline(offline, tiny_model_dir):
    snapshots, got = offline
    assert got["env"] == {"model": str(snapshots["env"]), "tokens": greedy(str(tiny_model_dir))}


def test_download_dir_is_the_cache_searched(offline):
    snapshots, got = offline
    assert got["dir"] == {"model": str(snapshots["dir"])}


def test_one_gguf_file_of_a_repo(offline):
    snapshots, got = offline
    assert got["gguf"] == {"model": str(snapshots["gguf"] / "tiny.F32.gguf")}


def test_uncached_repo_offline_fails_naming_the_hub(offline):
    _, got = offline
    assert got["missing"]["error"].startswith(
        "EngineArgs.model='acme/missing': not a local path, and the Hugging Face Hub download"
    )


def test_local_paths_that_are_not_checkpoints_are_refused(tmp_path):
    def refused(path: Path) -> str:
        with pytest.raises(ValueError, match=r"^EngineArgs\.model=") as info:
            EngineArgs(model=str(path), device="cpu").create_engine_config()
        return str(info.value)

    assert "the directory has no config.json" in refused(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "a file, but not a .gguf checkpoint" in refused(tmp_path / "weights.bin")
    assert "not a Hugging Face Hub repo id" in refused(tmp_path / "no" / "such" / "dir")

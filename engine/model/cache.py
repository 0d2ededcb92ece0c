"""Where lorastream keeps what it fetches or builds once: ``$LORASTREAM_CACHE``, default
``~/.cache/lorastream`` (the demo's model, tokenizers converted from GGUF files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LORASTREAM_CACHE``, default ``~/.cache/lorastream``."""
    return Path(os.environ.get("LORASTREAM_CACHE") or "~/.cache/lorastream").expanduser()

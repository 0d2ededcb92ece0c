"""vLLM's ``vllm.utils`` names that scripts import (``FlexibleArgumentParser``)."""

from __future__ import annotations

from engine.config import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]

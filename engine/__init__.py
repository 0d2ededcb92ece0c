"""lorastream's engine: a vLLM-compatible multi-LoRA LLM engine.

Names are imported lazily so that light modules (``engine.sequence``, ``engine.errors``)
can be used without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncLLMEngine": "engine.async_engine",
    "EngineArgs": "engine.config",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "LoRARequest": "engine.lora.request",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "ResumedOutput": "engine.outputs",
    "RequestOutputKind": "engine.sampling_params",
    "SamplingParams": "engine.sampling_params",
    "UsageContext": "engine.usage",
}

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineArgs
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.lora.request import LoRARequest
    from engine.outputs import CompletionOutput, RequestOutput, ResumedOutput
    from engine.sampling_params import RequestOutputKind, SamplingParams
    from engine.usage import UsageContext


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "LoRARequest",
    "RequestOutput",
    "RequestOutputKind",
    "ResumedOutput",
    "SamplingParams",
    "UsageContext",
]

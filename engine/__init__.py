"""lorastream's engine: a vLLM-compatible multi-LoRA LLM engine.

vLLM code runs with its imports changed from ``vllm`` to ``engine`` (docs/vllm-compat.md
says what is supported). Names are imported lazily so that light modules
(``engine.sequence``, ``engine.errors``) can be used without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngineArgs": "engine.config",
    "AsyncLLM": "engine.async_engine",
    "AsyncLLMEngine": "engine.async_engine",
    "CompletionOutput": "engine.outputs",
    "EngineArgs": "engine.config",
    "FlexibleArgumentParser": "engine.config",
    "GuidedDecodingParams": "engine.sampling_params",
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "Logprob": "engine.outputs",
    "LoRARequest": "engine.lora.request",
    "PromptType": "engine.llm_engine",
    "RequestOutput": "engine.outputs",
    "RequestOutputKind": "engine.sampling_params",
    "ResumedOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "TextPrompt": "engine.llm_engine",
    "TokensPrompt": "engine.llm_engine",
    "UsageContext": "engine.usage",
}

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLM, AsyncLLMEngine
    from engine.config import AsyncEngineArgs, EngineArgs, FlexibleArgumentParser
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine, PromptType, TextPrompt, TokensPrompt
    from engine.lora.request import LoRARequest
    from engine.outputs import CompletionOutput, Logprob, RequestOutput, ResumedOutput
    from engine.sampling_params import GuidedDecodingParams, RequestOutputKind, SamplingParams
    from engine.usage import UsageContext


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineArgs",
    "FlexibleArgumentParser",
    "GuidedDecodingParams",
    "LLMEngine",
    "LoRARequest",
    "Logprob",
    "PromptType",
    "RequestOutput",
    "RequestOutputKind",
    "ResumedOutput",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
    "UsageContext",
]

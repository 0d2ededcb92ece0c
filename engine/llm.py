"""``LLM``: offline batch generation, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine, PromptType
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.usage import UsageContext


class LLM:
    def __init__(
        self, model: str, *, enable_multiprocessing: bool = False, **engine_args: Any
    ) -> None:
        """``enable_multiprocessing``: run the engine core in its own process (see
        ``LLMEngine.from_engine_args``); ``shutdown()`` or garbage collection stops it."""
        engine_args.setdefault("disable_log_stats", True)
        args = EngineArgs(model=model, **engine_args)
        self.llm_engine = LLMEngine.from_engine_args(
            args,
            usage_context=UsageContext.LLM_CLASS,
            enable_multiprocessing=enable_multiprocessing,
        )
        self._counter = 0

    def shutdown(self) -> None:
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), n, "sampling_params")
        loras = _per_prompt(lora_request, n, "lora_request")
        engine = self.llm_engine
        ids = []
        for prompt, p, lora in zip(prompts, params, loras, strict=True):
            request_id = str(self._counter)
            self._counter += 1
            # Only final outputs are kept, so none other is built (the caller's params stay
            # as they are).
            final_only = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            engine.add_request(request_id, prompt, final_only, lora_request=lora)
            ids.append(request_id)
        final: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n

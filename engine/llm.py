"""``LLM``: offline batch generation, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine, PromptType
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.usage import UsageContext

# generation_config.json fields that set a default sampling parameter, as vLLM reads them.
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}

Conversation = Sequence[Mapping[str, Any]]


class LLM:
    def __init__(
        self, model: str, *, enable_multiprocessing: bool = False, **engine_args: Any
    ) -> None:
        """``engine_args``: ``EngineArgs`` fields by name (vLLM's). ``enable_multiprocessing``:
        run the engine core in its own process (see ``LLMEngine.from_engine_args``);
        ``shutdown()`` or garbage collection stops it."""
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(
                f"LLM({unknown[0]}=...) is not an engine argument lorastream knows; "
                "docs/vllm-compat.md lists the ones it takes"
            )
        engine_args.setdefault("disable_log_stats", True)
        args = EngineArgs(model=model, **engine_args)
        self.llm_engine = LLMEngine.from_engine_args(
            args,
            usage_context=UsageContext.LLM_CLASS,
            enable_multiprocessing=enable_multiprocessing,
        )
        self._counter = 0
        self._default_params: SamplingParams | None = None

    def shutdown(self) -> None:
        self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's defaults from its generation_config.json (temperature, top_p, top_k,
        min_p, repetition_penalty, max_new_tokens), as vLLM reads them; SamplingParams'
        own defaults for the rest."""
        if self._default_params is None:
            self._default_params = SamplingParams(**self._generation_defaults())
        return self._default_params.clone()

    def _generation_defaults(self) -> dict[str, Any]:
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(
                self.llm_engine.config.model, local_files_only=True
            )
        except (OSError, ValueError):
            return {}  # no generation_config.json
        given = gen.to_diff_dict()
        return {ours: given[key] for key, ours in _GENERATION_DEFAULTS.items() if key in given}

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. Without
        ``sampling_params`` the model's defaults apply (``get_default_sampling_params``)."""
        if isinstance(prompts, str | Mapping):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, lora_request, use_tqdm, priority)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, each rendered with the
        model's chat template (or ``chat_template``) as vLLM does: the rendered text holds
        the template's special tokens, so none are added again."""
        conversations: list[Conversation]
        if messages and isinstance(messages[0], Mapping):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        tok = self.llm_engine.tokenizer
        if chat_template is None and getattr(tok, "chat_template", None) is None:
            raise ValueError("LLM.chat: the model has no chat template; pass chat_template")
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = tok.apply_chat_template(
                [dict(m) for m in conversation],
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
            )
            ids = list(tok.encode(text, add_special_tokens=False))
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self._run(prompts, sampling_params, lora_request, use_tqdm, None)

    def _run(
        self,
        prompts: list[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
        use_tqdm: bool,
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        n = len(prompts)
        params = _per_prompt(
            sampling_params or self.get_default_sampling_params(), n, "sampling_params"
        )
        loras = _per_prompt(lora_request, n, "lora_request")
        priorities = _per_prompt(list(priority) if priority is not None else 0, n, "priority")
        engine = self.llm_engine
        ids = []
        for prompt, p, lora, prio in zip(prompts, params, loras, priorities, strict=True):
            request_id = str(self._counter)
            self._counter += 1
            # Only final outputs are kept, so none other is built (the caller's params stay
            # as they are).
            final_only = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            engine.add_request(request_id, prompt, final_only, lora_request=lora, priority=prio)
            ids.append(request_id)
        final: dict[str, RequestOutput] = {}
        bar = _progress_bar(n) if use_tqdm else None
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids]


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n

"""Multi-LoRA offline inference with LLMEngine, written the way vLLM's example is: several
adapters with one device slot (max_loras=1), prompt logprobs, and a step loop.

vLLM code: replace ``engine`` by ``vllm`` in the imports and set MODEL / the adapter paths.
"""

from __future__ import annotations

import os

from engine import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from engine.lora.request import LoRARequest

MODEL = os.environ.get("VLLM_COMPAT_MODEL", "meta-llama/Llama-2-7b-hf")
LORA_A = os.path.join(MODEL, "adapters", "lora0")
LORA_B = os.path.join(MODEL, "adapters", "lora1")


def create_test_prompts() -> list[tuple[str, SamplingParams, LoRARequest | None]]:
    return [
        (
            "A robot may not injure a human being",
            SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=16),
            None,
        ),
        (
            "To be or not to be,",
            SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2, max_tokens=16),
            None,
        ),
        (
            "[user] Write a SQL query to answer the question based on the table schema.",
            SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=16),
            LoRARequest("sql-lora", 1, LORA_A),
        ),
        (
            "[user] Write a SQL query to answer the question based on the table schema.",
            SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=16),
            LoRARequest("sql-lora2", 2, LORA_B),
        ),
    ]


def process_requests(
    engine: LLMEngine, test_prompts: list[tuple[str, SamplingParams, LoRARequest | None]]
) -> list[RequestOutput]:
    request_id = 0
    finished: list[RequestOutput] = []
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params, lora_request = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params, lora_request=lora_request)
            request_id += 1
        request_outputs: list[RequestOutput] = engine.step()
        for request_output in request_outputs:
            if request_output.finished:
                print(request_output)
                finished.append(request_output)
    return finished


def initialize_engine() -> LLMEngine:
    # max_loras=1: the two adapters take turns in one device slot.
    engine_args = EngineArgs(
        model=MODEL,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=32,
        max_cpu_loras=2,
        max_num_seqs=256,
    )
    return LLMEngine.from_engine_args(engine_args)


def main() -> list[RequestOutput]:
    engine = initialize_engine()
    return process_requests(engine, create_test_prompts())


if __name__ == "__main__":
    main()

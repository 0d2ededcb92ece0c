"""LLM.chat with an adapter, written the way vLLM's offline chat examples use it."""

from __future__ import annotations

import os

from engine import LLM, SamplingParams
from engine.lora.request import LoRARequest

MODEL = os.environ.get("VLLM_COMPAT_MODEL", "meta-llama/Llama-3.1-8B-Instruct")
LORA = os.path.join(MODEL, "adapters", "lora2")


def main() -> None:
    llm = LLM(model=MODEL, enable_lora=True, max_lora_rank=32, trust_remote_code=True)
    sampling_params = llm.get_default_sampling_params()
    sampling_params.max_tokens = 12
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(
        conversation,
        sampling_params,
        use_tqdm=False,
        lora_request=LoRARequest("sql-lora", lora_path=LORA),
    )
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
        print(f"adapter: {output.lora_request.name if output.lora_request else None}")
    # Several conversations at once, greedy.
    outputs = llm.chat(
        [conversation[:2], conversation],
        SamplingParams(temperature=0.0, max_tokens=8),
        use_tqdm=True,
    )
    for output in outputs:
        print(f"Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()

"""Streaming with the asynchronous engine, written the way vLLM's async examples use it:
DELTA outputs, requests in parallel, one aborted midway, and a synchronous shutdown()."""

from __future__ import annotations

import asyncio
import os

from engine import AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams

MODEL = os.environ.get("VLLM_COMPAT_MODEL", "meta-llama/Llama-3.2-1B-Instruct")


async def stream_response(engine: AsyncLLM, prompt: str, request_id: str) -> str:
    print(f"\n🚀 Prompt: {prompt!r}")
    sampling_params = SamplingParams(
        max_tokens=20, temperature=0.8, top_p=0.95, seed=42, output_kind=RequestOutputKind.DELTA
    )
    text = ""
    async for output in engine.generate(
        request_id=request_id, prompt=prompt, sampling_params=sampling_params
    ):
        for completion in output.outputs:
            text += completion.text
            print(completion.text, end="", flush=True)
        if output.finished:
            print("\n✅ Generation complete!")
            break
    return text


async def main() -> None:
    engine_args = AsyncEngineArgs(model=MODEL, enforce_eager=True)
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
        texts = await asyncio.gather(
            *(stream_response(engine, p, f"stream-{i}") for i, p in enumerate(prompts))
        )
        print(f"streamed {len(texts)} responses")
    finally:
        # vLLM's shutdown() is synchronous: no await.
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())

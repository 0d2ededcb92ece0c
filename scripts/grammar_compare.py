"""Compare xgrammar and llguidance on what lorastream needs from a grammar engine, on CPU:
building the tokenizer's index, compiling JSON schemas (cold), and filling one token
bitmask per step along a valid output. Numbers go to docs/architecture.md.

    python scripts/grammar_compare.py [--vocab 32000] [--steps 200]

Tokenizers: the tiny test model's byte-level BPE (1,024 tokens) and a byte-level BPE of
``--vocab`` tokens trained here on Python's standard library sources (no download needed),
both loaded as transformers fast tokenizers, as the engine loads them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "tags": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "owner": {
                "type": "object",
                "properties": {
                    "email": {"type": "string"},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["email", "score"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "tags", "owner"],
        "additionalProperties": False,
    },
}
INSTANCES = {
    "flat": {"name": "Ada Lovelace", "age": 36},
    "nested": {"id": "ABC-1234", "tags": ["a", "c"], "owner": {"email": "x@y.z", "score": 0.5}},
}


def tokenizers_under_test(vocab: int) -> dict[str, Any]:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.testing.tiny import make_tiny_model

    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp())
    tiny = make_tiny_model(tmp / "tiny", num_adapters=0)
    out["tiny (1024)"] = AutoTokenizer.from_pretrained(tiny)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lib = Path(json.__file__).parent.parent
    texts = (p.read_text(errors="ignore") for p in sorted(lib.glob("*.py")))
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>")
    out[f"bpe ({len(fast)})"] = fast
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def bench_xgrammar(hf: Any, steps: int) -> dict[str, str]:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    res = {"index_ms": ms(time.perf_counter() - t0)}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        res[f"compile_{name}_ms"] = ms(time.perf_counter() - t0)
        ids = hf.encode(
            json.dumps(INSTANCES[name], separators=(",", ":")), add_special_tokens=False
        )
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(hf))
        times = []
        for t in ids[:steps]:
            t1 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - t1)
            if not matcher.accept_token(t):
                raise RuntimeError(f"xgrammar refused token {t} of a valid instance")
        res[f"mask_{name}_us"] = f"{statistics.median(times) * 1e6:.0f}"
        assert isinstance(mask, torch.Tensor)
    return res


def bench_llguidance(hf: Any, steps: int) -> dict[str, str]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
    res = {"index_ms": ms(time.perf_counter() - t0)}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(tok, grammar)
        res[f"compile_{name}_ms"] = ms(time.perf_counter() - t0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        ids = hf.encode(
            json.dumps(INSTANCES[name], separators=(",", ":")), add_special_tokens=False
        )
        mask = llguidance.torch.allocate_token_bitmask(1, len(hf))
        times = []
        for t in ids[:steps]:
            t1 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - t1)
            if not matcher.consume_token(t):
                raise RuntimeError(f"llguidance refused token {t}: {matcher.get_error()}")
        res[f"mask_{name}_us"] = f"{statistics.median(times) * 1e6:.0f}"
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000, help="trained BPE size (default 32000)")
    parser.add_argument(
        "--steps", type=int, default=200, help="mask fills timed per schema (default 200)"
    )
    ns = parser.parse_args()
    rows = []
    for tname, hf in tokenizers_under_test(ns.vocab).items():
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            rows.append({"tokenizer": tname, "library": lib, **fn(hf, ns.steps)})
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

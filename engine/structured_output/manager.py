"""Structured output in the engine core: each constrained request's grammar (compiled off
the step loop, cached), its matcher, and the token bitmasks of a step.

The grammar engine is xgrammar (docs/architecture.md, "Structured output", says why). A
request's constraint (``SamplingParams.constraint``) is compiled on a thread pool the first
time it is seen, under a key of (tokenizer, kind, canonical text): a repeated schema costs
a dictionary lookup. The scheduler does not admit the request until its grammar is ready
(``GrammarState.ready``), and a grammar that does not compile ends the request with an
error naming the field.

A matcher follows the request's output tokens (``accept``); resumed requests first replay
the earlier run's output. ``fill_bitmask`` writes the next token's mask of the step's
constrained rows: one bit per token of the model's vocabulary, 1 where the grammar allows
it. Once the grammar is complete only the request's stop tokens (EOS, ``stop_token_ids``)
are allowed, so a request ends with "stop" only with an output that matches; one that runs
out of ``max_tokens`` first ends with "length".
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.errors import InvalidSamplingParams
from engine.sequence import Request

logger = logging.getLogger("lorastream.structured_output")

CACHE_SIZE = 256
"""Compiled grammars kept (least recently used are dropped)."""
_COMPILE_THREADS = 2
# xgrammar prefixes its messages with a time and its source file: "[12:00:00] /x.cc:12: ".
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class InvalidConstraint(InvalidSamplingParams):
    """A structured-output constraint that does not compile (the message names the field)."""


_FIELD = {
    "json": "guided_json",
    "json_object": "guided_json_object",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}


@dataclass(eq=False)
class GrammarState:
    """One request's constraint: its compiled grammar (a future until it compiles), then
    its matcher, which has accepted ``num_accepted`` output tokens."""

    kind: str
    compiled: Future[Any]
    stop_token_ids: list[int]
    matcher: Any = None
    error: InvalidSamplingParams | None = None
    num_accepted: int = 0
    replay: list[int] = field(default_factory=list)
    """An earlier run's output (a resumed request) the matcher accepts first."""

    @property
    def ready(self) -> bool:
        return self.matcher is not None

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher is not None and bool(self.matcher.is_terminated())


class StructuredOutputManager:
    """The core's grammars: compile (threads, cached), match, fill bitmasks."""

    def __init__(self, tokenizer: str, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer_path = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._executor: ThreadPoolExecutor | None = None
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self._waiting: list[Request] = []
        self._batch: Any = None
        self._json_mask: torch.Tensor | None = None
        """[W] int32: 0 bits for tokens with a control character (JSON constraints)."""

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Start compiling ``request``'s constraint (or find it compiled); the request waits
        in the scheduler until ``poll`` makes its matcher."""
        constraint = request.sampling_params.constraint
        if constraint is None:
            return
        key = constraint
        future = self._cache.get(key)
        if future is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    _COMPILE_THREADS, thread_name_prefix="lorastream-grammar"
                )
            future = self._executor.submit(self._compile, *key)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        params = request.sampling_params
        stops = sorted(
            {
                *params.stop_token_ids,
                *([request.eos_token_id] if request.eos_token_id is not None else []),
            }
        )
        n = request.resumed.num_tokens if request.resumed is not None else 0
        request.grammar = GrammarState(
            kind=key[0],
            compiled=future,
            stop_token_ids=[t for t in stops if t < self.vocab_size],
            replay=request.prompt_token_ids[len(request.prompt_token_ids) - n :] if n else [],
        )
        self._waiting.append(request)

    def poll(self) -> list[Request]:
        """Make the matchers of requests whose grammar compiled; returns the requests whose
        constraint failed (``GrammarState.error`` says why), which the caller ends."""
        if not self._waiting:
            return []
        failed: list[Request] = []
        still: list[Request] = []
        for request in self._waiting:
            state: GrammarState = request.grammar
            if request.is_finished:
                continue
            if not state.compiled.done():
                still.append(request)
                continue
            try:
                compiled = state.compiled.result()
                state.matcher = self._matcher(compiled, state.stop_token_ids)
                for token in state.replay:
                    if not state.matcher.accept_token(token):
                        raise InvalidSamplingParams(
                            f"SamplingParams.{_FIELD[state.kind]}=... is invalid for this "
                            "resumed request: the earlier run's output does not match it"
                        )
            except InvalidSamplingParams as e:
                state.error = e
                state.matcher = None
                failed.append(request)
            except Exception as e:  # the grammar engine itself failed: this request alone
                logger.exception("structured output for %s failed", request.request_id)
                state.error = InvalidConstraint(
                    f"SamplingParams.{_FIELD[state.kind]}=... could not be prepared: "
                    f"{type(e).__name__}: {e}"
                )
                state.matcher = None
                failed.append(request)
        self._waiting = still
        return failed

    def accept(self, request: Request, token: int) -> bool:
        """Advance ``request``'s matcher by its new output token; False if the grammar
        refuses it (no allowed token was left to sample: see ``fill_bitmask``)."""
        state: GrammarState = request.grammar
        if state.matcher.is_terminated():
            return True  # a token computed past the stop, which is dropped
        state.num_accepted += 1
        return bool(state.matcher.accept_token(token))

    # ------------------------------------------------------------------ bitmasks
    @property
    def bitmask_width(self) -> int:
        return -(-self.vocab_size // 32)

    def fill_bitmask(self, requests: Sequence[Request], pin: bool = False) -> torch.Tensor:
        """[len(requests), ceil(V / 32)] int32: each request's next-token mask. Finished or
        terminated requests (their token is dropped) get every token."""
        bitmask = torch.full((len(requests), self.bitmask_width), -1, dtype=torch.int32)
        if pin:
            bitmask = bitmask.pin_memory()
        live = [
            i
            for i, r in enumerate(requests)
            if not r.is_finished and r.grammar.ready and not r.grammar.terminated
        ]
        if live:
            matchers = [requests[i].grammar.matcher for i in live]
            if len(live) > 1:
                self._batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, live)
            else:
                matchers[0].fill_next_token_bitmask(bitmask, live[0])
            json_rows = [i for i in live if requests[i].grammar.kind in ("json", "json_object")]
            if json_rows and self._json_mask is not None:
                # xgrammar's JSON strings admit raw control characters, which JSON forbids
                # (a parser refuses them); compact JSON has none anywhere.
                bitmask[json_rows] &= self._json_mask
        return bitmask

    def _batch_matcher(self) -> Any:
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
        return self._batch

    # ------------------------------------------------------------------ compiling
    def _compile(self, kind: str, text: str) -> Any:
        """(Pool thread.) The compiled grammar of one constraint; raises ``InvalidConstraint``."""
        compiler = self._get_compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                import json

                choices = json.loads(text)
                rule = " | ".join(_ebnf_string(c) for c in choices)
                return compiler.compile_grammar(f"root ::= {rule}")
            return compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as e:
            message = _XGR_PREFIX.sub("", str(e)).strip()
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise InvalidConstraint(
                f"SamplingParams.{_FIELD[kind]}={shown!r} is invalid: it does not compile: {message}"
            ) from None

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
                info = xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
                )
                self._json_mask = _no_control_mask(info.decoded_vocab, self.bitmask_width)
                self._compiler = xgr.GrammarCompiler(info, max_threads=_COMPILE_THREADS)
            return self._compiler

    def _matcher(self, compiled: Any, stop_token_ids: list[int]) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _no_control_mask(decoded_vocab: Sequence[bytes], width: int) -> torch.Tensor:
    """[width] int32 bitmask allowing every token but those whose bytes hold a control
    character (below 0x20)."""
    allowed = np.ones(width * 32, dtype=bool)
    for token_id, raw in enumerate(decoded_vocab):
        if any(b < 0x20 for b in raw):
            allowed[token_id] = False
    words = np.packbits(allowed.reshape(-1, 32)[:, ::-1], axis=1, bitorder="big")  # [W, 4]
    # Bit t % 32 of word t // 32: little-endian words of 4 bytes, lowest bits first.
    packed = np.ascontiguousarray(words[:, ::-1]).view("<i4").reshape(width)
    return torch.from_numpy(packed.copy())


def _ebnf_string(text: str) -> str:
    """``text`` as an EBNF string literal (JSON's escapes, which the grammar parser reads)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def bitmask_rows(bitmask: torch.Tensor) -> np.ndarray:
    """For tests: the allowed token ids of each row, as a bool matrix [R, 32 W]."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1).bool().numpy()

"""Incremental detokenization with stop strings, one instance per request.

Text is produced the way vLLM's fast detokenizer does it: a ``tokenizers`` ``DecodeStream``
primed with the end of the prompt, so a token's text is what it adds to the text before it
(leading spaces included) and a character split over several byte-level tokens is held
until it is complete. Tokenizers without a Rust backend get the same algorithm in Python
over ``tokenizer.decode``.

What a caller sees is ``update()``'s delta; the deltas concatenate to ``output_text``. Two
things are held back from the deltas while the request runs:

* an incomplete character (it would show as U+FFFD);
* a tail that could be the start of a stop string, so that a stop string that later
  matches never shows, even in part (unless ``include_stop_str_in_output``).

When the request finishes (a stop string fires, or the caller says ``finished=True``)
everything left is released.

A resumed request (``ResumedOutput``: the prompt ends with an earlier run's output, of which
the client holds some text) replays the earlier output through the stream first, as that
run did, then continues: the text the earlier run held back is released now, and a stop
string across the resume point is found. Only the new run's text is returned.

A request that wants its final output only (``RequestOutputKind.FINAL_ONLY``) and has no
stop strings needs no text before it finishes, so its tokens are only collected and decoded
at the end in one call: ``decode(context + ids)`` past ``decode(context)``, about a tenth
of the host time of stepping the stream token by token. Where that text does not extend the context's (a decoder that is not
prefix-monotonic) the tokens go through the stream as usual, as they do when the text is
read before the end (an abort). Without stop strings the final ``output_text`` equals
``tokenizer.decode(output_token_ids, skip_special_tokens=...)`` for byte-level tokenizers
(decoded without ``clean_up_tokenization_spaces``, as vLLM does); with a stop string it is
that text cut before the first stop string (or after it, when it is included).
"""

from __future__ import annotations

from typing import Any, Protocol

import tokenizers.decoders

from engine.outputs import ResumedOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

# tokenizers >= 0.21; older versions take the pure-Python path.
_DecodeStream: Any = getattr(tokenizers.decoders, "DecodeStream", None)

# tokenizers' DecodeStream raises this when a decoder is not prefix-monotonic (vLLM #17448).
_INVALID_PREFIX = "Invalid prefix encountered"
# How much of the prompt primes the stream: enough context for leading spaces and
# multi-token characters, bounded so that priming is cheap.
_MIN_PROMPT_CONTEXT = 4
_MAX_PROMPT_CONTEXT = 24
_REPLACEMENT = "\ufffd"


class _Stream(Protocol):
    def step(self, tokenizer: Any, token_id: int) -> str | None: ...


class _PyDecodeStream:
    """DecodeStream's algorithm over ``tokenizer.decode``, for tokenizers without a Rust
    backend: the new text is what ``ids[prefix:]`` adds to ``ids[prefix:read]``, emitted
    only once it does not end in U+FFFD."""

    def __init__(self, ids: list[int], skip_special_tokens: bool) -> None:
        self.ids = list(ids)
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, tokenizer: Any, token_id: int) -> str | None:
        self.ids.append(token_id)
        prefix = tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        text = tokenizer.decode(
            self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens
        )
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return None
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return text[len(prefix) :]


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas and watches for stop strings."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        resumed: ResumedOutput | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = sampling_params.skip_special_tokens
        self.stop = list(sampling_params.stop)
        self.include_stop_str_in_output = sampling_params.include_stop_str_in_output
        self.output_token_ids: list[int] = []
        self.stop_reason: str | None = None
        """The stop string that ended the text, if any."""
        self.finished = False

        self._text = ""  # decoded so far, cut at a stop string; the tail may be unsent
        self._num_sent = 0  # chars of _text already returned as deltas
        self._start = 0  # chars of _text an earlier run sent (a resumed request)
        # Ids fed to the stream, and how many of them have produced their text so far.
        self._decoded_ids: list[int] = []
        self._num_emitted_ids = 0
        earlier = prompt_token_ids[-resumed.num_tokens :] if resumed is not None else []
        self._context = self._prompt_context(
            prompt_token_ids[: len(prompt_token_ids) - len(earlier)]
        )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if backend is not None and _DecodeStream is not None else None
        self._stream: _Stream = self._new_stream(self._context)
        # Final output only and no stop strings: ids wait here, undecoded, until the end.
        self._defer = (
            sampling_params.output_kind == RequestOutputKind.FINAL_ONLY
            and not self.stop
            and resumed is None
        )
        self._deferred: list[int] = []
        if resumed is not None:
            self._replay(earlier, resumed.text)

    def _replay(self, ids: list[int], sent: str) -> None:
        """Decode an earlier run's output ``ids`` as that run did; the client holds ``sent``."""
        self._decode(ids)
        if not self._text.startswith(sent):
            # Not the text this tokenizer makes of those ids: continue after what the client
            # holds (what the earlier run held back cannot be rebuilt).
            self._text = sent
            self._num_emitted_ids = len(self._decoded_ids)
        self._start = self._num_sent = len(sent)

    @property
    def output_text(self) -> str:
        """The text returned so far: the concatenation of every delta."""
        self._catch_up()
        return self._text[self._start : self._num_sent]

    def text_since(self, start: int) -> str:
        """The returned text from character ``start`` on (``output_text[start:]`` without
        copying what comes before)."""
        self._catch_up()
        return self._text[self._start + start : self._num_sent]

    @property
    def finished_by_stop_string(self) -> bool:
        return self.stop_reason is not None

    def update(
        self, new_token_ids: list[int], *, finished: bool = False, stop_terminated: bool = False
    ) -> str:
        """Add newly generated tokens and return the new text delta.

        ``finished``: no tokens will follow, so release everything held back (a pending
        incomplete character is decoded as ``tokenizer.decode`` would, U+FFFD included).
        ``stop_terminated``: the last id is EOS or one of ``stop_token_ids``; its text is
        left out unless ``include_stop_str_in_output``. Implies ``finished``.
        Once finished (by a stop string or by the caller), later calls return "".
        """
        if self.finished:
            self.output_token_ids += new_token_ids
            return ""
        finished = finished or stop_terminated
        to_decode = new_token_ids
        if stop_terminated and new_token_ids and not self.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        self.output_token_ids += new_token_ids
        if self._defer:
            self._deferred += to_decode
            if not finished:
                return ""
            if not self._decoded_ids and self._decode_at_once():
                return self._release(finished)
            to_decode, self._deferred = self._deferred, []
        return self._feed(to_decode, finished)

    def _feed(self, ids: list[int], finished: bool) -> str:
        """Stream ``ids`` into the text; the delta that can be shown now."""
        start = len(self._text)
        self._decode(ids)
        if finished:
            self._text += self._flush_pending()
        self._check_stop_strings(start)
        return self._release(finished)

    def _decode(self, ids: list[int]) -> None:
        """Step ``ids`` through the stream, appending the text they complete."""
        for token_id in ids:
            self._decoded_ids.append(token_id)
            piece = self._step(token_id)
            if piece is not None:
                self._text += piece
                self._num_emitted_ids = len(self._decoded_ids)

    def _decode_at_once(self) -> bool:
        """All deferred ids decoded in one call, as the text they add to the context; False
        (nothing done) where the decoded context is not a prefix of the whole."""
        skip = self.skip_special_tokens
        base = self.tokenizer.decode(self._context, skip_special_tokens=skip)
        full = self.tokenizer.decode(self._context + self._deferred, skip_special_tokens=skip)
        if not full.startswith(base):
            return False
        self._text = full[len(base) :]
        self._decoded_ids, self._deferred = self._deferred, []
        self._num_emitted_ids = len(self._decoded_ids)
        return True

    def _catch_up(self) -> None:
        """Text wanted before the end (an abort): stream the deferred ids, as without
        deferring; what is held back stays held back."""
        if self._deferred and not self.finished:
            pending, self._deferred = self._deferred, []
            self._feed(pending, finished=False)

    # ------------------------------------------------------------ stop strings
    def _check_stop_strings(self, start: int) -> None:
        """Look for stop strings in text that ends after ``start`` (the new text), and cut
        ``_text`` at the earliest one. Older text was checked by earlier updates."""
        if not self.stop or len(self._text) == start:
            return
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            i = self._text.find(stop, max(0, start - len(stop) + 1))
            if i >= 0 and (best is None or (i, i + len(stop)) < best[:2]):
                best = (i, i + len(stop), stop)
        if best is None:
            return
        begin, end, stop = best
        self._text = self._text[: end if self.include_stop_str_in_output else begin]
        self.stop_reason = stop
        self.finished = True

    def _release(self, finished: bool) -> str:
        """Return the text that can be shown now and mark it sent."""
        self.finished = self.finished or finished
        end = len(self._text)
        if not self.finished:
            end -= self._stop_prefix_len()
            end = max(end, self._num_sent)
        delta = self._text[self._num_sent : end]
        self._num_sent = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        text = self._text
        for n in range(min(len(text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = text[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self.stop):
                return n
        return 0

    # ----------------------------------------------------------------- decoding
    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """A prompt suffix whose text has no U+FFFD, so the stream starts neither inside nor
        before an incomplete character: the shortest of 4..24 tokens, else a shorter one,
        else none (a prompt that ends inside a character)."""
        n = len(prompt_token_ids)
        shortest = min(_MIN_PROMPT_CONTEXT, n)
        lengths = [*range(shortest, min(n, _MAX_PROMPT_CONTEXT) + 1), *range(shortest - 1, 0, -1)]
        for i in lengths:
            suffix = prompt_token_ids[-i:]
            text = self.tokenizer.decode(suffix, skip_special_tokens=self.skip_special_tokens)
            if _REPLACEMENT not in text:
                return list(suffix)
        return []

    def _new_stream(self, context: list[int]) -> _Stream:
        if self._backend is None:
            return _PyDecodeStream(context, self.skip_special_tokens)
        stream = _DecodeStream(skip_special_tokens=self.skip_special_tokens)
        # Primed step by step (``ids=`` needs tokenizers >= 0.22); the prompt's text is dropped.
        for token_id in context:
            stream.step(self._backend, token_id)
        return stream

    def _step(self, token_id: int) -> str | None:
        tokenizer = self._backend if self._backend is not None else self.tokenizer
        try:
            return self._stream.step(tokenizer, token_id)
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            # The stream's state is broken beyond repair; restart it without context.
            self._stream = self._new_stream([])
            return self._stream.step(tokenizer, token_id)

    def _flush_pending(self) -> str:
        """Text of ids the stream still holds (an incomplete character at the very end),
        decoded the way the full text decodes them."""
        pending = self._decoded_ids[self._num_emitted_ids :]
        if not pending:
            return ""
        self._num_emitted_ids = len(self._decoded_ids)
        skip = self.skip_special_tokens
        base = self.tokenizer.decode(self._context, skip_special_tokens=skip)
        full = self.tokenizer.decode(self._context + self._decoded_ids, skip_special_tokens=skip)
        if full.startswith(base + self._text):
            return full[len(base) + len(self._text) :]
        return self.tokenizer.decode(pending, skip_special_tokens=skip)

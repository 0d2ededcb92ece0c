"""Batched sampling: penalties, greedy / temperature / top-k / top-p / min-p, per-request seeds.

All rows of a step are processed together on the logits' device; the only host sync is the
wait for the results (``SampledTokens.result``), which ``launch`` leaves to the caller.
Order, as in vLLM and Hugging Face's logits processors:

1. Token restrictions: the structured-output bitmask (``engine.structured_output``),
   ``allowed_token_ids``, then banned tokens (``bad_words``; EOS and ``stop_token_ids``
   while a row is below ``min_tokens``) and ``logit_bias``, all as one sparse addition.
2. Penalties: repetition (HF style, tokens seen in prompt + output), then frequency and
   presence (OpenAI style, output tokens only).
3. Greedy rows take the argmax of these logits (bit-exact, no temperature).
4. Random rows: temperature, then top-k, top-p, min-p, then one exponential race
   (``argmax(probs / q)`` with ``q ~ Exp(1)``), which is a draw from ``probs``.

Rows that use none of a feature cost nothing for it: each is a tensor that is None when no
row of the step asks for it.

Seeded rows draw their ``q`` from a private generator seeded by ``(seed, output position)``,
so their tokens depend neither on the rest of the batch nor on preemption and resumption.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.kernels.utils import pinned
from engine.sampling import top_p as top_p_mod
from engine.sampling_params import SamplingParams
from engine.sequence import PLACEHOLDER

_MASK64 = (1 << 64) - 1

TokenLogprobs = tuple[list[int], list[float], list[int]]
"""One position's logprobs: token ids, their logprobs and ranks; the sampled (or prompt)
token first, then the top-n in rank order (the first may appear again among them)."""


@dataclass
class SamplingRow:
    """One row of logits to sample from, as the runner knows it."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated so far; its length is the output position that seeds a seeded row."""
    eos_token_id: int | None = None
    """Banned, with ``stop_token_ids``, until ``min_tokens`` outputs exist (unless ``ignore_eos``)."""
    pending_row: int | None = None
    """With async scheduling: the row of ``SamplingMetadata.build``'s ``pending_tokens`` that
    holds this row's last output token while that is still a ``PLACEHOLDER``."""

    @property
    def output_position(self) -> int:
        return len(self.output_token_ids)


@dataclass
class Penalties:
    """Penalty tensors of one step (rows without a penalty carry neutral values)."""

    repetition: torch.Tensor
    """[N] float32; 1.0 where off."""
    presence: torch.Tensor
    """[N] float32; 0.0 where off."""
    frequency: torch.Tensor
    """[N] float32; 0.0 where off."""
    prompt_tokens: tuple[torch.Tensor, torch.Tensor]
    """(row indices [P], token ids [P]): prompts of rows with a repetition penalty."""
    output_tokens: tuple[torch.Tensor, torch.Tensor]
    """(row indices [O], token ids [O]): outputs of rows with any penalty."""


@dataclass
class SamplingMetadata:
    """Everything the sampler needs for one step, as tensors on the logits' device.

    Optional tensors are None when no row of the step uses the feature, so the sampler
    skips that work without looking at the values (no host sync).
    """

    vocab_size: int
    temperature: torch.Tensor
    """[N] float32; 1.0 on greedy rows (they never use it)."""
    is_greedy: torch.Tensor
    """[N] bool."""
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None
    """[N] int64 in [1, V]; V where top-k is off (1 on greedy rows, which never use it)."""
    max_top_k: int
    """max(top_k) on the host, so top-k alone needs no full sort; 0 when top_k is None."""
    max_top_k_on: int
    """max(top_k) over the random rows with top-k on (0 when none): with top-p, whether the
    k-th lies among ``top_p.TOP_P_CANDIDATES``."""
    top_p: torch.Tensor | None
    """[N] float32; 1.0 where top-p is off."""
    min_p: torch.Tensor | None
    """[N] float32; 0.0 where min-p is off."""
    penalties: Penalties | None
    """Set when any row has a repetition, presence or frequency penalty."""
    token_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(row indices [B], token ids [B], float32 values [B]) added to the logits: ``logit_bias``,
    and -inf for banned tokens (``min_tokens`` not reached yet, one-token ``bad_words`` and
    those whose earlier tokens the output already ends with)."""
    pending_bans: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(row indices, token ids, rows of ``pending_tokens``, expected ids), each [C]: a
    ``bad_words`` ban that holds when the row's last output token, still a ``PLACEHOLDER``
    on the host, is the expected id (async scheduling)."""
    pending_tokens: torch.Tensor | None
    """The previous step's sampled tokens on the device, when ``pending_bans`` reads them."""
    allowed: tuple[torch.Tensor, torch.Tensor] | None
    """(row indices [A], keep [A, V] bool): rows with ``allowed_token_ids``."""
    grammar: tuple[torch.Tensor, torch.Tensor] | None
    """(rows [G] int64, bitmask [G, ceil(V / 32)] int32) on the device: the structured-output
    masks of the constrained rows, bit ``t % 32`` of word ``t // 32`` set where token ``t``
    is allowed (``engine.structured_output``); None when no row is constrained."""
    generators: dict[int, torch.Generator]
    """Row index -> private generator, for seeded random rows off CUDA."""
    seeded: tuple[torch.Tensor, torch.Tensor] | None
    """(rows [S], seeds [S]) int64 of the seeded random rows on CUDA: one launch draws
    their noise (``engine.kernels.sampling_triton``)."""
    generator: torch.Generator | None
    """The engine's generator for unseeded random rows; None means torch's default one."""
    any_unseeded_random: bool
    """Whether ``generator`` is needed this step."""
    num_logprobs: list[int | None]
    """Per row: how many top logprobs to return; None returns none."""
    max_num_logprobs: int | None
    """max(num_logprobs) over the rows that asked; None when no row did."""

    @property
    def num_rows(self) -> int:
        return len(self.num_logprobs)

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        pending_tokens: torch.Tensor | None = None,
        grammar: tuple[list[int], torch.Tensor] | None = None,
    ) -> SamplingMetadata:
        """Turn the step's rows into tensors, once per step. Loops over rows, never the vocab.

        ``pending_tokens``: the previous step's sampled tokens, still on the device, where
        the rows' ``PLACEHOLDER`` output tokens are (``SamplingRow.pending_row``); penalties
        and ``bad_words`` read them there. ``grammar``: the constrained rows and their
        structured-output bitmask (host memory, pinned on CUDA)."""
        if not rows:
            raise ValueError("SamplingMetadata.build needs at least one row")
        device = torch.device(device)
        params = [r.sampling_params for r in rows]
        greedy = [p.greedy for p in params]

        def f32(values: list[float]) -> torch.Tensor:
            return _to_device(torch.tensor(values, dtype=torch.float32), device)

        top_k = top_p = min_p = None
        max_top_k = max_top_k_on = 0
        if any(p.top_k_enabled and not g for p, g in zip(params, greedy, strict=True)):
            ks = [
                1 if g else min(p.top_k, vocab_size) if p.top_k_enabled else vocab_size
                for p, g in zip(params, greedy, strict=True)
            ]
            top_k = _to_device(torch.tensor(ks, dtype=torch.int64), device)
            max_top_k = max(ks)
            max_top_k_on = max(
                min(p.top_k, vocab_size)
                for p, g in zip(params, greedy, strict=True)
                if p.top_k_enabled and not g
            )
        if any(p.top_p < 1.0 and not g for p, g in zip(params, greedy, strict=True)):
            top_p = f32([p.top_p for p in params])
        if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy, strict=True)):
            min_p = f32([p.min_p for p in params])

        penalties = None
        if any(p.has_penalties for p in params):
            penalties = Penalties(
                repetition=f32([p.repetition_penalty for p in params]),
                presence=f32([p.presence_penalty for p in params]),
                frequency=f32([p.frequency_penalty for p in params]),
                prompt_tokens=_flatten(
                    [
                        r.prompt_token_ids if r.sampling_params.repetition_penalty != 1.0 else []
                        for r in rows
                    ],
                    device,
                ),
                output_tokens=_output_tokens(
                    [r if r.sampling_params.has_penalties else None for r in rows],
                    device,
                    pending_tokens,
                ),
            )

        token_bias, pending_bans = _token_bias(rows, vocab_size, device)
        allowed = _allowed(rows, vocab_size, device)

        generators: dict[int, torch.Generator] = {}
        seeded_rows: list[int] = []
        seeds: list[int] = []
        for i, (p, g) in enumerate(zip(params, greedy, strict=True)):
            if p.seed is not None and not g:
                seed = _row_seed(p.seed, rows[i].output_position)
                if device.type == "cuda":
                    seeded_rows.append(i)
                    seeds.append(seed)
                else:
                    generators[i] = torch.Generator(device=device).manual_seed(seed)
        seeded = None
        if seeded_rows:
            seeded = (
                _to_device(torch.tensor(seeded_rows, dtype=torch.int64), device),
                _to_device(torch.tensor(seeds, dtype=torch.int64), device),
            )

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]
        return cls(
            vocab_size=vocab_size,
            temperature=f32(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
            ),
            is_greedy=_to_device(torch.tensor(greedy, dtype=torch.bool), device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=top_k,
            max_top_k=max_top_k,
            max_top_k_on=max_top_k_on,
            top_p=top_p,
            min_p=min_p,
            penalties=penalties,
            token_bias=token_bias,
            pending_bans=pending_bans,
            pending_tokens=pending_tokens if pending_bans is not None else None,
            allowed=allowed,
            grammar=_grammar(grammar, device),
            generators=generators,
            seeded=seeded,
            generator=generator,
            any_unseeded_random=len(generators) + len(seeded_rows) < len(rows) - sum(greedy),
            num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[TokenLogprobs | None] | None
    """Per row: the sampled token and the top-n with logprobs and ranks (None for rows that
    did not ask); None when no row asked."""


class SampledTokens:
    """A step's sampled tokens on the device, on their way to the host.

    ``token_ids`` ([N] int64 on the device) can feed the next step before the host has them;
    ``result()`` waits for the copy and returns the ``SamplerOutput``."""

    def __init__(
        self,
        token_ids: torch.Tensor,
        packed: torch.Tensor | None = None,
        num_logprobs: list[int | None] | None = None,
    ) -> None:
        self.token_ids = token_ids
        # Without logprobs the ids alone travel; with them, [N, 3 + 2k] float64 rows (ids
        # fit exactly in float64): the sampled id and rank, the top-k ids, the logprobs.
        self._num_logprobs = num_logprobs
        src = token_ids if packed is None else packed
        self._done: torch.cuda.Event | None = None
        if src.is_cuda:
            # Into pinned memory, so the copy runs behind the sampling without a wait here.
            self._host = src.to("cpu", non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = src

    def result(self) -> SamplerOutput:
        if self._done is not None:
            self._done.synchronize()
        rows = self._host.tolist()
        if self._num_logprobs is None:
            return SamplerOutput(token_ids=rows, logprobs=None)
        return _unpack_logprobs(rows, self._num_logprobs)


class Sampler(nn.Module):
    """Stateless: the engine's generator travels in ``SamplingMetadata``."""

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of ``logits`` [N, V] float32 and wait for the tokens."""
        return self.launch(logits, metadata).result()

    def launch(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SampledTokens:
        """Sample one token per row of ``logits`` [N, V] float32, without waiting.

        Logprobs are "raw", as vLLM's default ``logprobs_mode="raw_logprobs"``: the
        log-softmax of the logits as the model produced them, before min_tokens, penalties,
        temperature and filtering.
        """
        md = metadata
        # logits: [N, V]
        if logits.dim() != 2 or tuple(logits.shape) != (md.num_rows, md.vocab_size):
            raise ValueError(
                f"logits must be [{md.num_rows}, {md.vocab_size}], got {list(logits.shape)}"
            )
        logits = logits.to(torch.float32, copy=True)  # never modify the caller's tensor
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]

        if md.grammar is not None:
            rows, bitmask = md.grammar
            # Only the constrained rows: the others pay nothing.
            sub = logits.index_select(0, rows)
            apply_token_bitmask_(sub, bitmask)
            logits.index_copy_(0, rows, sub)
        if md.allowed is not None:
            rows, keep = md.allowed
            logits.index_copy_(
                0, rows, logits.index_select(0, rows).masked_fill_(~keep, float("-inf"))
            )
        if md.token_bias is not None:
            rows, ids, values = md.token_bias
            # accumulate: a ban (-inf) wins over a bias of the same token, in any order.
            logits.index_put_((rows, ids), values, accumulate=True)
        if md.pending_bans is not None:
            assert md.pending_tokens is not None
            rows, ids, src, expect = md.pending_bans
            hit = md.pending_tokens.index_select(0, src) == expect
            add = torch.where(hit, float("-inf"), 0.0).to(logits.dtype)
            logits.index_put_((rows, ids), add, accumulate=True)
        if md.penalties is not None:
            logits = apply_penalties(logits, md.penalties)

        if md.all_greedy:
            sampled = logits.argmax(dim=-1)  # [N]
        else:
            sampled = self._sample_random(logits, md)
            if not md.all_random:
                sampled = torch.where(md.is_greedy, logits.argmax(dim=-1), sampled)

        if raw_logprobs is None:
            return SampledTokens(sampled)
        return SampledTokens(sampled, _pack_logprobs(raw_logprobs, sampled, md), md.num_logprobs)

    def _sample_random(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        probs = torch.softmax(filter_logits(logits, md), dim=-1)  # [N, V]

        # q ~ Exp(1) per entry; argmax(probs / q) is a draw from probs.
        q = torch.empty_like(probs)
        if md.any_unseeded_random:
            q.exponential_(generator=md.generator)
        for row, gen in md.generators.items():
            q[row].exponential_(generator=gen)
        if md.seeded is not None:
            from engine.kernels.sampling_triton import seeded_exponential_

            seeded_exponential_(q, *md.seeded)
        # A zero draw would turn a banned token's 0 / 0 into NaN, which argmax would pick.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)  # [N]


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Repetition penalty on tokens of prompt + output (divide positive logits, multiply
    negative ones), then ``logits -= frequency * count + presence * (count > 0)`` over output
    tokens."""
    pen = penalties
    counts = torch.zeros_like(logits)  # [N, V]
    out_rows, out_ids = pen.output_tokens
    counts.index_put_(
        (out_rows, out_ids), torch.ones_like(out_ids, dtype=logits.dtype), accumulate=True
    )
    seen = counts > 0  # [N, V]
    seen.index_put_(pen.prompt_tokens, seen.new_ones(()))  # no host scalar: no wait

    rep = pen.repetition.unsqueeze(1)  # [N, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - pen.frequency.unsqueeze(1) * counts
    return logits - pen.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: what random rows sample from.
    Removed tokens are -inf."""
    logits = logits / md.temperature.unsqueeze(1)  # [N, V]
    if md.top_p is not None:
        if md.max_top_k_on <= top_p_mod.TOP_P_CANDIDATES:
            logits = top_p_mod.apply_top_k_top_p(logits, md.top_k, md.top_p)
        else:  # a k-th beyond the candidates
            logits = apply_top_k_top_p_sorted(logits, md.top_k, md.top_p)
    elif md.top_k is not None:
        logits = apply_top_k(logits, md.top_k, md.max_top_k)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k alone: ``topk(max_top_k)`` instead of a full sort. Ties at the k-th are kept."""
    top = logits.topk(max_top_k, dim=-1).values  # [N, max_top_k], descending
    kth = top.gather(1, (top_k - 1).unsqueeze(1))  # [N, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_k_top_p_sorted(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p (on the top-k renormalised distribution), remove,
    by a full sort of the rows: for a k beyond ``top_p.TOP_P_CANDIDATES``.

    Ties at the k-th value are all kept; top-p keeps the smallest set of most likely tokens
    whose mass reaches p (always at least one), as Hugging Face's warpers do.
    """
    # A stable sort makes the choice among tied logits at the top-p edge deterministic.
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False, stable=True)  # [N, V]
    vocab = logits.shape[1]
    if top_k is not None:
        kth = logits_sort.gather(1, (vocab - top_k).unsqueeze(1))  # [N, 1]
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    remove = cum <= (1 - top_p).unsqueeze(1)
    remove[:, -1] = False
    logits_sort.masked_fill_(remove, float("-inf"))
    return logits_sort.scatter(1, logits_idx, logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the top token's."""
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [N, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _pack_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, md: SamplingMetadata
) -> torch.Tensor:
    """[N, 3 + 2k] float64: the sampled id and rank, the top-k ids, the sampled logprob, the
    top-k logprobs; one transfer for everything."""
    assert md.max_num_logprobs is not None
    return pack_token_logprobs(raw_logprobs, sampled, md.max_num_logprobs)


def pack_token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """For each row of ``logprobs`` [N, V] and its token (``tokens`` [N]): [N, 3 + 2k] float64
    rows of the token id, its rank (how many tokens are at least as likely, vLLM's), the
    top-k ids, the token's logprob and the top-k logprobs."""
    k = min(k, logprobs.shape[1])
    top_vals, top_ids = logprobs.topk(k, dim=-1)  # [N, k]
    token_vals = logprobs.gather(1, tokens.unsqueeze(1))  # [N, 1]
    ranks = (logprobs >= token_vals).sum(dim=-1, keepdim=True)  # [N, 1]
    return torch.cat(
        [
            tokens.unsqueeze(1).double(),
            ranks.double(),
            top_ids.double(),
            token_vals.double(),
            top_vals.double(),
        ],
        dim=1,
    )


def unpack_token_logprobs(row: list[float], n: int) -> TokenLogprobs:
    """One row of ``pack_token_logprobs`` as (ids, logprobs, ranks), keeping the top ``n``."""
    k = (len(row) - 3) // 2
    ids = [int(row[0]), *(int(t) for t in row[2 : 2 + n])]
    values = [row[k + 2], *row[k + 3 : k + 3 + n]]
    ranks = [int(row[1]), *range(1, n + 1)]
    return ids, values, ranks


def _unpack_logprobs(packed: list[list[float]], num_logprobs: list[int | None]) -> SamplerOutput:
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for row, n in zip(packed, num_logprobs, strict=True):
        token_ids.append(int(row[0]))
        logprobs.append(None if n is None else unpack_token_logprobs(row, n))
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf the logits [N, V] of tokens whose bit is 0 in ``bitmask`` [N, ceil(V / 32)]
    int32 (bit ``t % 32`` of word ``t // 32``), on the device, with no host sync: xgrammar's
    kernel (Triton on CUDA), or ``apply_token_bitmask_reference``."""
    try:
        import xgrammar as xgr
    except ImportError:  # pragma: no cover - xgrammar is a dependency
        apply_token_bitmask_reference(logits, bitmask)
        return
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The torch reference of ``apply_token_bitmask_``."""
    n, v = logits.shape
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [N, W, 32]
    allowed = bits.reshape(n, -1)[:, :v].bool()  # [N, V]
    logits.masked_fill_(~allowed, float("-inf"))


def _flatten(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of ``seqs``, both [sum of lengths] int64 on ``device``."""
    rows, ids = _flat_arrays(seqs)
    return _to_device(torch.from_numpy(rows), device), _to_device(torch.from_numpy(ids), device)


def _flat_arrays(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    # numpy reads a long list of ints about ten times faster than torch.tensor does.
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
    rows = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
    return rows, ids


def _output_tokens(
    rows: list[SamplingRow | None], device: torch.device, pending: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_flatten`` of the rows' output tokens (None: a row without penalties), with each
    ``PLACEHOLDER`` replaced on the device by its token in ``pending``. Only a row's last
    token can be one: the previous step's."""
    seqs = [r.output_token_ids if r is not None else [] for r in rows]
    where_np, ids_np = _flat_arrays(seqs)
    where = _to_device(torch.from_numpy(where_np), device)
    ids = _to_device(torch.from_numpy(ids_np), device)
    at_np = np.flatnonzero(ids_np == PLACEHOLDER)  # positions in the flat list
    if not at_np.size:
        return where, ids
    holes = where_np[at_np]  # their rows
    ends = np.cumsum([len(s) for s in seqs]) - 1  # each row's last position
    if not np.array_equal(ends[holes], at_np):
        raise ValueError("a placeholder output token before a row's last")
    sources = [r.pending_row for h in holes.tolist() if (r := rows[h]) is not None]
    if pending is None or None in sources:
        raise ValueError("output tokens hold placeholders but not where their tokens are")
    at = _to_device(torch.from_numpy(at_np.astype(np.int64)), device)
    src = _to_device(torch.tensor(sources, dtype=torch.int64), device)
    return where, ids.index_copy(0, at, pending.index_select(0, src))


def _token_bias(
    rows: list[SamplingRow], vocab_size: int, device: torch.device
) -> tuple[
    tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
]:
    """The sparse additions of ``SamplingMetadata``: ``token_bias`` and ``pending_bans``."""
    inf = float("-inf")
    b_rows: list[int] = []
    b_ids: list[int] = []
    b_vals: list[float] = []
    c_rows: list[int] = []
    c_ids: list[int] = []
    c_src: list[int] = []
    c_expect: list[int] = []
    for i, r in enumerate(rows):
        p = r.sampling_params
        if r.output_position < p.min_tokens:
            stop_ids = set(p.stop_token_ids)
            if r.eos_token_id is not None and not p.ignore_eos:
                stop_ids.add(r.eos_token_id)
            for t in sorted(stop_ids):
                if t < vocab_size:
                    b_rows.append(i)
                    b_ids.append(t)
                    b_vals.append(inf)
        if p.logit_bias:
            for t, value in p.logit_bias.items():
                if t < vocab_size:
                    b_rows.append(i)
                    b_ids.append(t)
                    b_vals.append(value)
        out = r.output_token_ids
        for word in p.bad_words_token_ids:
            last = word[-1]
            if last >= vocab_size:
                continue
            prefix = word[:-1]
            if not prefix:
                b_rows.append(i)
                b_ids.append(last)
                b_vals.append(inf)
                continue
            tail = out[len(out) - len(prefix) :]
            if len(tail) < len(prefix):
                continue
            if tail[-1] == PLACEHOLDER:
                if tail[:-1] != prefix[:-1]:
                    continue
                if r.pending_row is None:
                    raise ValueError("a placeholder output token but not where its token is")
                c_rows.append(i)
                c_ids.append(last)
                c_src.append(r.pending_row)
                c_expect.append(prefix[-1])
            elif tail == prefix:
                b_rows.append(i)
                b_ids.append(last)
                b_vals.append(inf)

    def i64(values: list[int]) -> torch.Tensor:
        return _to_device(torch.tensor(values, dtype=torch.int64), device)

    bias = None
    if b_rows:
        vals = _to_device(torch.tensor(b_vals, dtype=torch.float32), device)
        bias = (i64(b_rows), i64(b_ids), vals)
    pending = None
    if c_rows:
        pending = (i64(c_rows), i64(c_ids), i64(c_src), i64(c_expect))
    return bias, pending


def _grammar(
    grammar: tuple[list[int], torch.Tensor] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if grammar is None or not grammar[0]:
        return None
    rows, bitmask = grammar
    return (
        _to_device(torch.tensor(rows, dtype=torch.int64), device),
        bitmask.to(device, non_blocking=True) if device.type == "cuda" else bitmask,
    )


def _allowed(
    rows: list[SamplingRow], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    restricted = [
        (i, [t for t in ids if t < vocab_size])
        for i, r in enumerate(rows)
        if (ids := r.sampling_params.allowed_token_ids) is not None
    ]
    if not restricted:
        return None
    keep = torch.zeros(len(restricted), vocab_size, dtype=torch.bool)
    for j, (_, ids) in enumerate(restricted):
        keep[j, ids] = True
    row_ids = torch.tensor([i for i, _ in restricted], dtype=torch.int64)
    return _to_device(row_ids, device), _to_device(keep, device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``, without waiting for the step in flight."""
    return pinned(t, device).to(device, non_blocking=True)


def _row_seed(seed: int, position: int) -> int:
    """A 63-bit seed from (request seed, output position): splitmix64 over both."""
    x = _splitmix64((seed & _MASK64) ^ _splitmix64(position))
    return x >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)

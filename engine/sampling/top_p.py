"""Top-k then top-p without sorting the vocabulary.

Sorting every row of a large vocabulary was most of what top-p sampling cost per step
(``benchmarks/kernels/sampler.py``; docs/benchmark-log.md). The sort is not needed: top-p keeps every token at or above the *edge*, the smallest logit
whose tokens above it hold less than ``p`` of the mass. So:

1. the ``TOP_P_CANDIDATES`` largest logits of each row (``topk``, already sorted), and the
   row's log-sum-exp over what top-k keeps;
2. the candidates' cumulative mass gives the edge of every row whose candidates reach
   ``p``: a trained model's rows, which put their mass on few tokens;
3. the other rows (a flat distribution) find their edge by a search over the float32 values
   of the row (``engine.kernels.sampling_triton``: each pass weighs ``PIVOTS`` thresholds at
   once), run on the device without a host sync. Off CUDA the sort finds it instead.

The kept set is the one Hugging Face's ``TopPLogitsWarper`` keeps (the smallest set of most
likely tokens whose mass reaches ``p``, at least one), except at an exact tie at the edge:
every token equal to the edge is kept, as top-k keeps every token equal to the k-th.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOP_P_CANDIDATES = 1024
"""Largest logits per row whose mass decides the edge without the search: a ``topk`` this
wide costs a fraction of a full sort, and a trained model's rows put their mass on fewer
tokens. Tests set it small so that rows need the fallback."""


def edge_by_sort(logits: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same edges by a full sort of the rows (the reference; the path off CUDA)."""
    ordered = logits.sort(dim=-1, descending=True).values  # [N, V]
    return _edge_of_sorted(ordered, lse, top_p)[0]


def _edge_of_sorted(
    ordered: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge [N], reached [N]) over descending values: the last value whose tokens above it
    hold less than p, and whether these values' mass reaches p at all."""
    probs = (ordered - lse.unsqueeze(1)).exp()
    cum = probs.cumsum(dim=-1)
    above = F.pad(cum[:, :-1], (1, 0))  # mass strictly before each position
    kept = (above < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)  # a prefix, at least 1
    edge = ordered.gather(1, (kept - 1).clamp(min=0)).squeeze(1)
    return edge, cum[:, -1] >= top_p


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p (on the top-k renormalised distribution), remove;
    ``top_k`` [N] (V where off) must be at most ``TOP_P_CANDIDATES`` where on."""
    v = logits.shape[1]
    vals = logits.topk(min(v, TOP_P_CANDIDATES), dim=-1).values  # [N, C], descending
    neg_inf = logits.new_full((), float("-inf"))
    if top_k is not None:
        kth = vals.gather(1, (top_k.clamp(max=vals.shape[1]) - 1).unsqueeze(1))  # [N, 1]
        kth = torch.where((top_k < v).unsqueeze(1), kth, neg_inf)
        logits = logits.masked_fill(logits < kth, float("-inf"))
        vals = vals.masked_fill(vals < kth, float("-inf"))
    lse = logits.logsumexp(dim=-1)  # [N]
    edge, reached = _edge_of_sorted(vals, lse, top_p)
    need = ~reached & (top_p < 1.0)
    if logits.is_cuda:
        from engine.kernels.sampling_triton import edge_by_search

        edge_by_search(logits, lse, vals[:, -1].contiguous(), need, top_p, edge)
    elif bool(need.any()):  # off the GPU a host check costs nothing
        edge[need] = edge_by_sort(logits[need], lse[need], top_p[need])
    edge = torch.where(top_p < 1.0, edge, neg_inf)
    return logits.masked_fill(logits < edge.unsqueeze(1), float("-inf"))

"""Top-p without a sort (``engine.sampling.top_p``) against the full sort and Hugging Face.

The edge search is a Triton kernel, run where ``tests.sampling.triton_mode`` says.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from engine.kernels.sampling_triton import edge_by_search
from engine.sampling import top_p
from engine.sampling.sampler import apply_top_k_top_p_sorted
from tests.sampling.triton_mode import DEVICE, needs_triton


def _rows(gen: torch.Generator, n: int, v: int) -> torch.Tensor:
    """Peaked, flat and in-between rows, some with -inf entries (banned tokens)."""
    scale = torch.tensor([0.05, 0.3, 1.0, 3.0, 8.0])[torch.arange(n) % 5].unsqueeze(1)
    logits = torch.randn(n, v, generator=gen) * scale
    logits[::3, :: max(1, v // 7)] = float("-inf")
    return logits


def _masses(logits: torch.Tensor, edge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mass at or above, and strictly above, each row's edge."""
    probs = torch.softmax(logits.double(), dim=-1)
    at_or_above = (probs * (logits >= edge.unsqueeze(1))).sum(-1)
    above = (probs * (logits > edge.unsqueeze(1))).sum(-1)
    return at_or_above, above


@needs_triton
@pytest.mark.parametrize("v", [3000, 1024, 37])
def test_search_finds_the_edges_the_sort_finds(v: int) -> None:
    gen = torch.Generator().manual_seed(v)
    n = 20
    logits = _rows(gen, n, v)
    p = torch.tensor([0.05, 0.5, 0.9, 0.95, 0.999])[torch.arange(n) % 5]
    p = p[torch.randperm(n, generator=gen)]
    lse = logits.logsumexp(-1)
    expected = top_p.edge_by_sort(logits, lse, p)
    # Every row searched except one, which must keep what it had.
    need = torch.ones(n, dtype=torch.bool)
    need[3] = False
    hi = logits.amax(-1)  # any upper bound of the edge will do
    edge = torch.full((n,), 123.0)
    d = DEVICE
    edge_d = edge.to(d)
    edge_by_search(logits.to(d), lse.to(d), hi.to(d), need.to(d), p.to(d), edge_d)
    got = edge_d.cpu()
    assert got[3] == 123.0
    rows = need.nonzero().flatten()
    torch.testing.assert_close(got[rows], expected[rows], rtol=0, atol=0)
    # The edge is a value of its row; at or above it lies p of the mass, above it less.
    at_or_above, above = _masses(logits[rows], got[rows])
    assert (logits[rows] == got[rows].unsqueeze(1)).any(-1).all()
    assert (at_or_above >= p[rows].double() - 1e-5).all()
    assert (above < p[rows].double() + 1e-5).all()


@needs_triton
def test_search_keeps_the_whole_row_when_p_exceeds_its_rounded_mass() -> None:
    logits = torch.zeros(1, 4096)  # 4096 x 1/4096: a float32 sum lands within ulps of 1
    lse = logits.logsumexp(-1)
    p = torch.tensor([1.0 - 1e-9])
    edge = torch.zeros(1, device=DEVICE)
    edge_by_search(
        logits.to(DEVICE),
        lse.to(DEVICE),
        torch.zeros(1, device=DEVICE),
        torch.ones(1, dtype=torch.bool, device=DEVICE),
        p.to(DEVICE),
        edge,
    )
    assert edge.item() <= 0.0  # every token is kept: the edge is at or below them all


@pytest.mark.parametrize("candidates", [1024, 16, 1])
def test_candidates_and_fallback_keep_what_the_sort_keeps(candidates, monkeypatch) -> None:
    monkeypatch.setattr(top_p, "TOP_P_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(candidates)
    n, v = 30, 500
    logits = _rows(gen, n, v)
    p = torch.tensor([1.0, 0.05, 0.5, 0.9, 0.99, 0.3])[torch.arange(n) % 6]
    k = torch.tensor([v, 1, 3, min(candidates, 40), v, 7])[torch.randperm(n, generator=gen) % 6]
    k = k.clamp(max=candidates).where(k < v, k)
    ours = top_p.apply_top_k_top_p(logits, k, p)
    ref = apply_top_k_top_p_sorted(logits, k, p)
    for i in range(n):
        # The sorted path may also drop tokens whose probability is exactly 0; neither
        # path can sample those.
        positive = torch.softmax(ref[i], -1) > 0
        assert torch.equal(torch.isinf(ours[i]) & positive, torch.isinf(ref[i]) & positive), i
        assert torch.equal(ours[i][~torch.isinf(ours[i])], logits[i][~torch.isinf(ours[i])])
    # And Hugging Face's warpers, row by row (top-k first, then top-p, as generate()).
    for i in range(n):
        scores = logits[i : i + 1].clone()
        ids = torch.zeros(1, 1, dtype=torch.long)
        if k[i] < v:
            scores = TopKLogitsWarper(int(k[i]))(ids, scores)
        if p[i] < 1.0:
            scores = TopPLogitsWarper(float(p[i]))(ids, scores)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(scores[0])), i


def test_every_token_tied_at_the_edge_is_kept() -> None:
    # One token with most of the mass, then 50 tied ones: p needs only some of the ties.
    logits = torch.full((1, 200), -30.0)
    logits[0, 0] = 3.0
    logits[0, 10:60] = 0.0
    probs = torch.softmax(logits, -1)
    p = torch.tensor([float(probs[0, 0] + 5 * probs[0, 10])])  # the top one and ~5 ties
    ours = top_p.apply_top_k_top_p(logits, None, p)
    kept = ~torch.isinf(ours[0])
    assert kept[0]
    assert kept[10:60].all()
    assert kept.sum() == 51

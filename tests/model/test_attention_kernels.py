"""The Triton paged-attention kernels against the torch references.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) at small sizes; on
a CUDA device the same sweep runs at real model sizes (``-m gpu``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.attention import (
    attention_blocks,
    num_kv_splits,
    paged_attention_reference,
    store_kv_reference,
)
from engine.kernels.attention_triton import paged_attention_triton, store_kv_triton
from engine.kernels.elementwise_triton import INTERPRET
from engine.model.metadata import AttentionMetadata

CUDA = torch.cuda.is_available()
# The interpreter runs on CPU tensors; compiled kernels need CUDA ones.
DEVICE = "cpu" if INTERPRET or not CUDA else "cuda"


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, Dh]
    k: torch.Tensor  # [T, Hkv, Dh]
    v: torch.Tensor  # [T, Hkv, Dh]
    cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, Dh], context already written
    attn: AttentionMetadata


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    pad_tokens: int = 0,
    mixed_pad: tuple[int, int] | None = None,
) -> Batch:
    """seqs: (cached tokens, new tokens) per sequence; blocks are handed out shuffled so
    block tables are not contiguous. ``pad_tokens`` adds padding sequences as the CUDA-graph
    runner does for decode graphs (one query, seq_len 1, slot -1, block table of zeros);
    ``mixed_pad=(tokens, empty)`` pads as it does for mixed-step graphs: one sequence of
    ``tokens`` queries (seq_len as many, slot -1, block table of zeros), then ``empty``
    sequences without queries or context."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(need) + 3
    free = list(range(1, num_blocks))  # block 0 stays for padding sequences
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(nb)] for nb in need]
    max_blocks = max(need)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    slots: list[int] = []
    qsl, seq_lens = [0], []
    for (cached, new), table in zip(seqs, tables, strict=True):
        slots += [
            table[p // block_size] * block_size + p % block_size
            for p in range(cached, cached + new)
        ]
        qsl.append(qsl[-1] + new)
        seq_lens.append(cached + new)
    for _ in range(pad_tokens):
        slots.append(-1)
        qsl.append(qsl[-1] + 1)
        seq_lens.append(1)
        tables.append([0])
    if mixed_pad is not None:
        tokens, empty = mixed_pad
        slots += [-1] * tokens
        qsl += [qsl[-1] + tokens] + [qsl[-1] + tokens] * empty
        seq_lens += [tokens] + [0] * empty
        tables += [[0] * -(-tokens // block_size)] + [[0]] * empty
        max_blocks = max(max_blocks, len(tables[-empty - 1]))
    t = qsl[-1]
    q = torch.randn(t, num_heads, head_dim, generator=gen)
    k = torch.randn(t, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(t, num_kv_heads, head_dim, generator=gen)
    padded = [tb + [0] * (max_blocks - len(tb)) for tb in tables]
    dev = torch.device(DEVICE)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
        max_seq_len=max(seq_lens),
    )
    return Batch(q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), cache.to(dev, dtype), attn)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (cached, new) per sequence: pure decode, pure prefill, chunked prefill, and a mix.
SMALL_CASES = {
    "decode": [(5, 1), (17, 1), (0, 1), (40, 1)],
    # A sequence with no query this step: the decode path indexes sequences, not tokens.
    "decode_gap": [(5, 1), (8, 0), (17, 1)],
    "prefill": [(0, 7), (0, 19), (0, 1)],
    "chunked": [(9, 6), (32, 17), (3, 1)],
    "mixed": [(12, 1), (0, 23), (20, 5), (33, 1)],
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (6, 2, 32), (4, 4, 24)]
)
@pytest.mark.parametrize("block_size", [4, 16])
def test_attention_matches_reference(case, num_heads, num_kv_heads, head_dim, block_size):
    b = make_batch(
        SMALL_CASES[case], num_heads, num_kv_heads, head_dim, block_size, torch.float32, 0
    )
    store_kv_reference(b.cache, b.k, b.v, b.attn.slot_mapping)
    ref = paged_attention_reference(b.q, b.cache, b.attn, head_dim**-0.5)
    out = paged_attention_triton(b.q, b.cache, b.attn, head_dim**-0.5)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_matches_reference(window):
    b = make_batch(SMALL_CASES["mixed"], 4, 2, 16, 4, torch.float32, 1)
    store_kv_reference(b.cache, b.k, b.v, b.attn.slot_mapping)
    ref = paged_attention_reference(b.q, b.cache, b.attn, 0.25, sliding_window=window)
    out = paged_attention_triton(b.q, b.cache, b.attn, 0.25, sliding_window=window)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [2, 4, 16])
def test_split_decode_matches_unsplit(num_splits):
    b = make_batch([(70, 1), (3, 1), (0, 1), (129, 1)], 4, 2, 16, 8, torch.float32, 2)
    store_kv_reference(b.cache, b.k, b.v, b.attn.slot_mapping)
    ref = paged_attention_reference(b.q, b.cache, b.attn, 0.25)
    out = paged_attention_triton(b.q, b.cache, b.attn, 0.25, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        # Triton's interpreter computes bf16 tl.dot wrongly: the kernel takes float32
        # products there (the same path as for float32 inputs).
        torch.bfloat16,
    ],
)
def test_half_precision_matches_float32_reference(dtype):
    b = make_batch(SMALL_CASES["mixed"], 4, 2, 32, 16, dtype, 3)
    store_kv_reference(b.cache, b.k, b.v, b.attn.slot_mapping)
    ref = paged_attention_reference(b.q.float(), b.cache.float(), b.attn, 32**-0.5)
    out = paged_attention_triton(b.q, b.cache, b.attn, 32**-0.5)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_heads_before_positions_layout_gives_the_same_output():
    """The kernel reads the cache through its strides: a cache stored [2, blocks, Hkv, page,
    Dh] and viewed as [2, blocks, page, Hkv, Dh] gives the same result."""
    b = make_batch(SMALL_CASES["mixed"], 4, 2, 16, 4, torch.float32, 3)
    hnd = b.cache.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    assert not hnd.is_contiguous()
    assert torch.equal(hnd, b.cache)
    ref = paged_attention_triton(b.q, b.cache, b.attn, 0.25)
    assert torch.equal(paged_attention_triton(b.q, hnd, b.attn, 0.25), ref)


def test_padding_sequences_leave_real_rows_and_cache_alone():
    b = make_batch([(5, 1), (9, 1)], 4, 2, 16, 4, torch.float32, 4, pad_tokens=3)
    before = b.cache.clone()
    store_kv_triton(b.cache, b.k, b.v, b.attn.slot_mapping)
    written = b.attn.slot_mapping[:2]
    flat_before = before.view(2, -1, 2, 16)
    flat_after = b.cache.view(2, -1, 2, 16)
    untouched = torch.ones(flat_before.shape[1], dtype=torch.bool)
    untouched[written.cpu()] = False
    assert torch.equal(
        flat_after[:, untouched.to(flat_after.device)],
        flat_before[:, untouched.to(flat_before.device)],
    )
    ref = paged_attention_reference(b.q[:2], b.cache, _first(b.attn, 2), 0.25)
    out = paged_attention_triton(b.q, b.cache, b.attn, 0.25)
    assert rel_err(out[:2], ref) < TOL[torch.float32]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", ["decode", "prefill", "mixed"])
def test_mixed_graph_padding_leaves_real_rows_alone(case):
    """The layout of a mixed-step CUDA graph: the step's sequences, one sequence of padding
    tokens, empty ones; attention in its prefill layout whatever the step (decode steps
    included). The real rows are the reference's, and nothing is written for padding."""
    seqs = SMALL_CASES[case]
    n = len(seqs)
    b = make_batch(seqs, 4, 2, 16, 4, torch.float32, 5, mixed_pad=(7, 5))
    assert b.attn.num_seqs == n + 6
    b.attn.max_query_len = 2 * b.q.shape[0]  # as captured: above 1 whatever the step
    real = sum(new for _, new in seqs)
    before = b.cache.clone()
    store_kv_triton(b.cache, b.k, b.v, b.attn.slot_mapping)
    ref_cache = before.clone()
    store_kv_reference(ref_cache, b.k[:real], b.v[:real], b.attn.slot_mapping[:real])
    assert torch.equal(b.cache, ref_cache)
    first = _first(b.attn, n)
    first.max_query_len = max(new for _, new in seqs)
    ref = paged_attention_reference(b.q[:real], b.cache, first, 0.25)
    out = paged_attention_triton(b.q, b.cache, b.attn, 0.25)
    assert rel_err(out[:real], ref) < TOL[torch.float32]
    assert torch.isfinite(out).all()


def _first(attn: AttentionMetadata, n: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=attn.slot_mapping[:n],
        query_start_loc=attn.query_start_loc[: n + 1],
        seq_lens=attn.seq_lens[:n],
        block_tables=attn.block_tables[:n],
        query_start_loc_cpu=attn.query_start_loc_cpu[: n + 1],
        seq_lens_cpu=attn.seq_lens_cpu[:n],
        max_query_len=attn.max_query_len,
        max_seq_len=attn.max_seq_len,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference(dtype):
    b = make_batch(SMALL_CASES["chunked"], 4, 2, 16, 4, dtype, 5)
    ref = b.cache.clone()
    store_kv_reference(ref, b.k, b.v, b.attn.slot_mapping)
    # v as a strided view of a wider tensor, the way the model splits qkv.
    wide = torch.cat([b.k, b.v], dim=1)  # [T, 2 * Hkv, Dh]
    store_kv_triton(b.cache, wide[:, :2], wide[:, 2:], b.attn.slot_mapping)
    assert torch.equal(b.cache, ref)


def test_num_kv_splits_depends_on_batch_shape_only():
    assert num_kv_splits(256, 8, 1, 132) == 1
    assert num_kv_splits(4, 8, 5, 132) == 1  # prefill never splits
    assert num_kv_splits(1, 8, 1, 132) == 16
    assert num_kv_splits(8, 8, 1, 132) == 8
    assert num_kv_splits(17, 8, 1, 132) == 1
    for b in range(1, 40):
        s = num_kv_splits(b, 8, 1, 132)
        assert s & (s - 1) == 0
        assert 1 <= s <= 16


def test_attention_blocks_cover_the_group():
    for group in (1, 2, 3, 4, 7, 8, 16, 32):
        for q_len in (1, 100):
            block_q, block_m, block_n = attention_blocks(group, q_len)
            assert block_m >= 16
            assert block_m & (block_m - 1) == 0
            assert block_q * group <= block_m
            assert block_n >= 16


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (32, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_real_sizes_on_cuda(num_heads, num_kv_heads, head_dim, dtype):
    rng = random.Random(7)
    decode = [(rng.randrange(1, 2000), 1) for _ in range(64)]
    prefill = [(0, rng.randrange(1, 600)) for _ in range(6)] + [(700, 300), (1500, 128)]
    for seqs in (decode, prefill, decode[:3], decode[:20] + prefill[:3]):
        b = make_batch(seqs, num_heads, num_kv_heads, head_dim, 16, dtype, rng.randrange(1000))
        ref_cache = b.cache.clone()
        store_kv_reference(ref_cache, b.k, b.v, b.attn.slot_mapping)
        store_kv_triton(b.cache, b.k, b.v, b.attn.slot_mapping)
        assert torch.equal(b.cache, ref_cache)
        ref = paged_attention_reference(b.q.float(), b.cache.float(), b.attn, head_dim**-0.5)
        out = paged_attention_triton(b.q, b.cache, b.attn, head_dim**-0.5)
        assert rel_err(out, ref) < max(TOL[dtype], 3e-4)
        window = paged_attention_triton(b.q, b.cache, b.attn, head_dim**-0.5, sliding_window=256)
        ref_w = paged_attention_reference(
            b.q.float(), b.cache.float(), b.attn, head_dim**-0.5, sliding_window=256
        )
        assert rel_err(window, ref_w) < max(TOL[dtype], 3e-4)

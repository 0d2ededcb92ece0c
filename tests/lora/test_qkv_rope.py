"""The q/k/v expand fused with RoPE and the KV-cache write (``engine.kernels.lora_qkv_triton``)
against the three kernels it replaces, run one after the other, and against a float64
per-token reference followed by the model's torch RoPE; on CPU through Triton's interpreter.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from engine.config import KernelConfig
from engine.kernels import lora_qkv_triton as qkv_mod
from engine.kernels.attention import store_kv_reference
from engine.kernels.attention_triton import store_kv_triton
from engine.kernels.elementwise import apply_rotary_reference
from engine.kernels.elementwise_triton import INTERPRET, apply_rotary_triton
from engine.lora import BLOCK_MS, allocate_static_lora_metadata, build_lora_metadata
from tests.kernel_calls import counting_kernels

from .test_kernels import (
    BF16,
    DEVICE,
    F16,
    F32,
    TOL,
    ULP,
    Case,
    assert_rel,
    expand_mod,
    least_precise,
    make_setup,
    per_token_delta_batched,
    shrink_mod,
)

# The model-level tests below run the tiny model on CPU through the kernels: interpreter only
# (on CUDA the engine's tests take the same path).
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors need Triton's interpreter"
)


def heads_case(
    heads: tuple[int, int, int], tokens: int, ranks: tuple[int, ...], adapters: int, **kw
) -> tuple[Case, tuple[int, int, int]]:
    h, hkv, dh = heads
    return Case(tokens, ranks, adapters, (h * dh, hkv * dh, hkv * dh), **kw), heads


# (heads, kv heads, head_dim): llama-like GQA, head_dim not a power of two, one kv head.
CPU_CASES = [
    heads_case((4, 2, 16), 17, (8,), 4, dtype=F32, lora_dtype=F32),
    heads_case((4, 2, 16), 17, (16,), 3, dtype=F16, lora_dtype=F16, pattern="segments"),
    heads_case((6, 2, 24), 9, (1, 8, 16, 64), 4, dtype=BF16, lora_dtype=BF16),
    heads_case((2, 1, 32), 5, (8,), 2, dtype=F16, lora_dtype=F16, pattern="none"),
    heads_case((4, 4, 16), 12, (4,), 1, dtype=F32, lora_dtype=BF16, pattern="one"),
    # llama-3.1-8b's heads: the column blocks the GPU runs (4 heads, 64-wide halves).
    heads_case((32, 8, 128), 24, (1, 8, 16, 64), 4, dtype=F16, lora_dtype=F16, in_features=64),
]
GPU_CASES = [
    heads_case((32, 8, 128), t, r, a, dtype=d, lora_dtype=d, pattern=p, in_features=512)
    for t, p in ((1, "random"), (256, "random"), (200, "segments"))
    for r, a in (((16,), 32), ((1, 8, 16, 64), 4))
    for d in (BF16, F16)
]


def rope_tables(tokens: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple:
    """cos, sin [T, Dh]: random values rather than a model's tables, whose two halves are
    equal, so a kernel that swapped the halves would show."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(tokens, head_dim, generator=gen) * 2 - 1
    sin = torch.rand(tokens, head_dim, generator=gen) * 2 - 1
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


def check(case: Case, heads: tuple[int, int, int], *, per_slot: bool = False, pad: int = 0) -> None:
    """``pad``: static (CUDA graph) metadata with that many padding tokens after the real
    ones, which must write no cache and keep their q rotated."""
    num_heads, num_kv, head_dim = heads
    seed = zlib.crc32(f"{case.id}{heads}{per_slot}{pad}".encode()) % 1000
    st = make_setup(case, seed=seed)
    lay = st.layer
    x, y0, meta = st.x, st.y0, st.meta
    t = case.tokens + pad
    if pad:
        meta = allocate_static_lora_metadata(t, lay.lora_ranks.shape[0], DEVICE, block_m=16)
        build_lora_metadata(st.token_slots, DEVICE, out=meta)
        x = torch.cat([x, torch.randn(pad, x.shape[1], device=DEVICE, dtype=x.dtype)])
        y0 = torch.cat([y0, torch.randn(pad, y0.shape[1], device=DEVICE, dtype=y0.dtype)])
    if per_slot:  # what the GEMM over A stored under W gives: every slot's x · Aᵀ
        a = lay.lora_a_stacked.flatten(0, 2)
        h = (x.to(a.dtype) @ a.t()).to(x.dtype)
    else:
        h = shrink_mod.lora_shrink(x, lay.lora_a_stacked, lay.lora_ranks, meta)
    cos, sin = rope_tables(t, head_dim, case.dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size = 2 * t + 3, 4
    cache0 = torch.randn(2, num_blocks, block_size, num_kv, head_dim, generator=gen)
    cache0 = cache0.to(DEVICE, case.dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.2] = -1  # tokens that write no KV
    if pad:
        slots[case.tokens :] = -1
    slots = slots.to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv * head_dim
    b_args = (lay.lora_b_stacked, lay.lora_ranks)

    # The three kernels it replaces, one after the other.
    y_ref = y0.clone()
    if not meta.empty:
        expand_mod.lora_expand(
            y_ref, h, *b_args, lay.slice_offsets, lay.out_slices, meta, h_per_slot=per_slot
        )
    q_ref, k_ref, v_ref = y_ref.split([q_size, kv_size, kv_size], dim=-1)
    q_ref = q_ref.view(t, num_heads, head_dim)
    k_ref = k_ref.view(t, num_kv, head_dim)
    apply_rotary_triton(q_ref, k_ref, cos, sin)
    cache_ref = cache0.clone()
    store_kv_triton(cache_ref, k_ref, v_ref.view(t, num_kv, head_dim), slots)

    y = y0.clone()
    cache = cache0.clone()
    qkv_mod.lora_expand_qkv_rope(
        y, h, *b_args, meta, cos, sin, cache, slots, num_heads, h_per_slot=per_slot
    )
    # Products summed in another column order where the blocks differ: a few ulps of the
    # operands (values near 1) at most, also where RoPE's difference cancels most of them.
    close = {"rtol": 4 * ULP[case.dtype], "atol": 4 * ULP[case.dtype]}
    torch.testing.assert_close(y[:, :q_size], y_ref[:, :q_size], **close)
    torch.testing.assert_close(cache, cache_ref, **close)
    assert torch.equal(y[:, q_size:], y0[:, q_size:])  # k and v went to the cache only
    written = torch.zeros(cache0[0].numel() // (num_kv * head_dim), dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    flat, flat0 = cache.view(2, -1, kv_size).cpu(), cache0.view(2, -1, kv_size).cpu()
    assert torch.equal(flat[:, ~written], flat0[:, ~written])

    # Independent of our kernels: float64 per-token deltas, then the model's torch RoPE.
    expected = (st.y0.double().cpu() + per_token_delta_batched(st)).to(case.dtype).to(DEVICE)
    n = case.tokens
    q_exp, k_exp, v_exp = expected.split([q_size, kv_size, kv_size], dim=-1)
    q_exp, k_exp = apply_rotary_reference(
        q_exp.reshape(n, num_heads, head_dim),
        k_exp.reshape(n, num_kv, head_dim),
        cos[:n],
        sin[:n],
    )
    cache_exp = cache0.clone()
    store_kv_reference(cache_exp, k_exp, v_exp.reshape(n, num_kv, head_dim), slots[:n])
    tol = TOL[least_precise(case.dtype, case.lora_dtype)]
    assert_rel(y[:n, :q_size].float(), q_exp.reshape(n, q_size).float(), tol)
    assert_rel(cache.float(), cache_exp.float(), tol)


@pytest.mark.parametrize(("case", "heads"), CPU_CASES, ids=lambda c: getattr(c, "id", str(c)))
def test_fused_matches_expand_rope_store(case: Case, heads: tuple[int, int, int]) -> None:
    check(case, heads)


@pytest.mark.parametrize("per_slot", [False, True])
def test_fused_reads_h_per_slot_and_skips_padding(per_slot: bool) -> None:
    case, heads = heads_case((4, 2, 16), 11, (8,), 3, dtype=BF16, lora_dtype=BF16)
    check(case, heads, per_slot=per_slot, pad=5)


@pytest.mark.gpu  # too large for the interpreter
@pytest.mark.parametrize(("case", "heads"), GPU_CASES, ids=lambda c: getattr(c, "id", str(c)))
def test_fused_matches_expand_rope_store_sweep(case: Case, heads: tuple[int, int, int]) -> None:
    check(case, heads, per_slot=True)


def test_refuses_layouts_it_cannot_rotate() -> None:
    case, _ = heads_case((4, 2, 16), 3, (8,), 1)
    st = make_setup(case)
    h = torch.zeros(3, st.layer.lora_a_stacked.shape[0] * 3 * 8, device=DEVICE)
    cos = sin = torch.ones(3, 16, device=DEVICE)
    cache = torch.zeros(2, 4, 4, 2, 16, device=DEVICE)
    b_args = (st.layer.lora_b_stacked, st.layer.lora_ranks, st.meta, cos, sin)
    with pytest.raises(ValueError, match="5 q heads"):
        qkv_mod.lora_expand_qkv_rope(
            st.y0.clone(), h, *b_args, cache, torch.zeros(3, dtype=torch.long), 5, h_per_slot=True
        )


@needs_interpreter
def test_attention_layer_takes_the_fused_kernel(tiny_model_dir: Path) -> None:
    """The tiny model with four adapters, one step of five sequences on its Triton paths
    (the stacked product in every layer): the fused kernel runs once per layer and the
    logits are those of the three kernels apart."""
    from tests.model.test_llama_matches_transformers import (
        BLOCK_SIZE,
        PROMPT,
        PagedDriver,
        load_adapter_into,
        load_ours,
    )

    adapters = sorted((tiny_model_dir / "adapters").iterdir())

    def logits(fused_qkv_rope: bool) -> tuple[dict[str, torch.Tensor], int]:
        """The step's logits, and the fused kernel's launches."""
        model = load_ours(tiny_model_dir)
        config = KernelConfig(backend="triton", lora_fused_qkv_rope=fused_qkv_rope)
        kernels, calls = counting_kernels(config)
        model.set_kernels(kernels)
        for layer in model.lora_layers().values():
            layer.create_lora_buffers(len(adapters), max_rank=32, dtype=torch.float32)
        slots = {a.name: i for i, a in enumerate(adapters)}
        for a in adapters:
            load_adapter_into(model, a, slots[a.name])
        prompts = {a.name: list(range(5 + 3 * i, 12 + 5 * i)) for i, a in enumerate(adapters)}
        prompts["base"] = list(range(3, 3 + len(PROMPT) // 8))
        driver = PagedDriver(model, 64, BLOCK_SIZE, lora_kernel_layout=True)
        return driver.step(prompts, lora_slots=slots), calls["lora_expand_qkv_rope"]

    fused, launches = logits(fused_qkv_rope=True)
    assert launches == 2  # the tiny model's layers
    apart, launches = logits(fused_qkv_rope=False)
    assert launches == 0
    assert fused.keys() == apart.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], apart[name], rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_warm_up_compiles_each_tile_height_and_writes_no_kv(tiny_model_dir: Path) -> None:
    from tests.model.test_llama_matches_transformers import load_ours

    model = load_ours(tiny_model_dir, kernel_backend="triton", lora_fused_qkv_rope=True)
    kernels, calls = counting_kernels(model.kernels.config)
    model.set_kernels(kernels)
    for layer in model.lora_layers().values():
        layer.create_lora_buffers(2, max_rank=8, dtype=torch.float32)
    caches = [torch.randn(model.kv_cache_shape(4, 4)) for _ in range(model.num_layers)]
    model.bind_kv_caches(caches)
    before = [c.clone() for c in caches]
    assert model.warm_up_lora_fusions() == len(BLOCK_MS) == calls["lora_expand_qkv_rope"]
    assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True))
    off, _ = counting_kernels(KernelConfig(backend="triton", lora_fused_qkv_rope=False))
    model.set_kernels(off)
    assert model.warm_up_lora_fusions() == 0

"""The expand of a one-slice layer fused with the residual add and RMSNorm after it
(``engine.lora.kernels.norm``) against the two kernels it replaces, run one after the other,
and against a float64 per-token reference followed by the model's torch norm; on CPU through
Triton's interpreter. Then the tiny model with the fusion on and off, and its warm-up.
"""

from __future__ import annotations

import importlib
import os
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated
pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from engine.lora.kernels import norm as norm_mod
from engine.lora.layers import DeferredDelta, allocate_static_lora_metadata, build_lora_metadata
from engine.model import ops
from engine.model.fused_kernels import rms_norm_triton

from .test_kernels import (
    BF16,
    CUDA,
    DEVICE,
    F16,
    F32,
    MIXED,
    TOL,
    ULP,
    Case,
    assert_rel,
    count_calls,
    expand_mod,
    layers,
    make_setup,
    per_token_delta_batched,
)

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1"
)

if not CUDA and not isinstance(norm_mod._lora_expand_add_rms_norm_kernel, InterpretedFunction):
    # Imported before TRITON_INTERPRET was set (by another test module): decorate again.
    importlib.reload(norm_mod)

EPS = 1e-5

# (case, block_n): rows of one block, of several with a ragged last one, ranks below the
# largest and a largest that is not a power of two, adapters that skip the layer, tokens
# without adapter, one adapter for all tokens, none at all.
CPU_CASES = [
    (Case(17, (8,), 4, (48,), F32, F32), None),
    (Case(9, (16,), 3, (40,), BF16, BF16), 16),
    (Case(12, MIXED, 4, (64,), F16, F16, "segments"), 16),
    (Case(7, (100, 8), 3, (32,), BF16, BF16, max_rank=100), 8),
    (Case(5, (4,), 2, (48,), F16, F16, "none"), None),
    (Case(16, (16,), 1, (56,), BF16, BF16, "one"), 32),
]
GPU_CASES = [
    (Case(t, r, a, (4096,), d, d, p, in_features=512), None)
    for t, p in ((1, "random"), (256, "random"), (200, "segments"))
    for r, a in (((16,), 32), (MIXED, 4))
    for d in (BF16, F16)
]


def check(case: Case, block_n: int | None, *, pad: int = 0) -> None:
    """``pad``: static (CUDA graph) metadata with that many padding tokens after the real
    ones, which get the add and the norm alone."""
    seed = zlib.crc32(f"{case.id}{block_n}{pad}".encode()) % 1000
    st = make_setup(case, seed=seed)
    lay = st.layer
    x, y0, meta = st.x, st.y0, st.meta
    t, dim = case.tokens + pad, y0.shape[1]
    gen = torch.Generator().manual_seed(seed)
    if pad:
        meta = allocate_static_lora_metadata(t, lay.lora_ranks.shape[0], DEVICE, block_m=16)
        build_lora_metadata(st.token_slots, DEVICE, out=meta)
        x = torch.cat([x, torch.randn(pad, x.shape[1], generator=gen).to(DEVICE, x.dtype)])
        y0 = torch.cat([y0, torch.randn(pad, dim, generator=gen).to(DEVICE, y0.dtype)])
    # What the GEMM over A stored under W gives: every slot's x · Aᵀ, in the model dtype.
    a = lay.lora_a_stacked.flatten(0, 2)
    h = (x.to(a.dtype) @ a.t()).to(x.dtype)
    residual = (torch.randn(t, dim, generator=gen) * 2).to(DEVICE, case.dtype)
    weight = (torch.rand(dim, generator=gen) + 0.5).to(DEVICE, case.dtype)
    b_args = (lay.lora_b_stacked, lay.lora_ranks)

    normed, stream = norm_mod.lora_expand_add_rms_norm(
        y0, h, *b_args, meta, residual, weight, EPS, block_n=block_n
    )
    assert normed.dtype == stream.dtype == case.dtype

    # The two kernels it replaces, one after the other.
    y_ref = y0.clone()
    if not meta.empty:
        expand_mod.lora_expand(
            y_ref, h, *b_args, lay.slice_offsets, lay.out_slices, meta, h_per_slot=True
        )
    normed_ref, stream_ref = rms_norm_triton(y_ref, weight, EPS, residual)
    assert stream_ref is not None
    # The rank products summed in another order (and the interpreter's expand truncating
    # bfloat16 where the fused kernel rounds): a few ulps of values of order one.
    close = {"rtol": 4 * ULP[case.dtype], "atol": 4 * ULP[case.dtype]}
    torch.testing.assert_close(stream, stream_ref, **close)
    torch.testing.assert_close(normed, normed_ref, **close)

    # Each step in torch, rounded where the unfused kernels round: the same values but
    # where a float32 sum's order moves a rounding (the rank products, the sum of squares).
    slots = meta.token_slots[:t]
    on = slots.clamp(min=0)
    max_rank = lay.lora_b_stacked.shape[2]
    h_own = h.view(t, -1, max_rank)[torch.arange(t, device=DEVICE), on].float()  # [t, R]
    rank = torch.where(slots >= 0, lay.lora_ranks[on, 0], 0)
    h_own = h_own * (torch.arange(max_rank, device=DEVICE) < rank[:, None])
    delta = torch.einsum("tnr,tr->tn", lay.lora_b_stacked[on].float(), h_own)
    y_torch = (y0.float() + delta).to(case.dtype)
    normed_torch, stream_torch = ops.fused_add_rms_norm_reference(y_torch, residual, weight, EPS)
    for got, want in ((stream, stream_torch), (normed, normed_torch)):
        torch.testing.assert_close(got, want, **close)
        if case.dtype != F32:  # float32 keeps the sums' last bits
            assert (got == want).float().mean() >= 0.98

    # Independent of our kernels: float64 per-token deltas, then the model's torch norm.
    n = case.tokens
    y_exp = (st.y0.double().cpu() + per_token_delta_batched(st)).to(case.dtype).to(DEVICE)
    normed_exp, stream_exp = ops.fused_add_rms_norm_reference(y_exp, residual[:n], weight, EPS)
    tol = TOL[case.dtype]
    assert_rel(stream[:n].float(), stream_exp.float(), tol)
    assert_rel(normed[:n].float(), normed_exp.float(), tol)
    if pad:  # padding rows: the add and the norm of the GEMM's output alone
        normed_pad, stream_pad = ops.fused_add_rms_norm_reference(y0[n:], residual[n:], weight, EPS)
        torch.testing.assert_close(stream[n:], stream_pad, rtol=0, atol=0)
        torch.testing.assert_close(normed[n:], normed_pad, **close)


@pytest.mark.parametrize(("case", "block_n"), CPU_CASES, ids=lambda c: getattr(c, "id", str(c)))
def test_fused_matches_expand_then_add_rms_norm(case: Case, block_n: int | None) -> None:
    check(case, block_n)


def test_padding_tokens_get_the_norm_alone() -> None:
    check(Case(11, (8,), 3, (40,), BF16, BF16), 16, pad=5)


@pytest.mark.skipif(not CUDA, reason="cuda: too large for the interpreter")
@pytest.mark.parametrize(("case", "block_n"), GPU_CASES, ids=lambda c: getattr(c, "id", str(c)))
def test_fused_matches_expand_then_add_rms_norm_sweep(case: Case, block_n: int | None) -> None:
    check(case, block_n)


def test_refuses_what_is_not_one_slice_with_its_residual() -> None:
    st = make_setup(Case(3, (8,), 1, (32, 16)))
    lay = st.layer
    h = torch.zeros(3, lay.lora_a_stacked.shape[0] * 8, device=DEVICE)
    weight = torch.ones(48, device=DEVICE)
    args = (lay.lora_b_stacked, lay.lora_ranks, st.meta)
    with pytest.raises(ValueError, match="not one slice"):
        norm_mod.lora_expand_add_rms_norm(st.y0, h, *args, st.y0, weight, EPS)
    one = make_setup(Case(3, (8,), 1, (48,)))
    args = (one.layer.lora_b_stacked, one.layer.lora_ranks, one.meta)
    with pytest.raises(ValueError, match="residual"):
        norm_mod.lora_expand_add_rms_norm(one.y0, h, *args, one.y0[:2], weight, EPS)
    with pytest.raises(ValueError, match="every slot"):
        norm_mod.lora_expand_add_rms_norm(one.y0, h[:, :4], *args, one.y0, weight, EPS)


# ----------------------------------------------------------------------------- the model


def tiny_logits(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    """One step of five sequences on four adapters and none, on the model's Triton paths."""
    from tests.model.test_llama_matches_transformers import (
        BLOCK_SIZE,
        PROMPT,
        PagedDriver,
        load_adapter_into,
        load_ours,
    )

    adapters = sorted((tiny_model_dir / "adapters").iterdir())
    model = load_ours(tiny_model_dir)
    for layer in model.lora_layers().values():
        layer.create_lora_buffers(len(adapters), max_rank=32, dtype=torch.float32)
    slots = {a.name: i for i, a in enumerate(adapters)}
    for a in adapters:
        load_adapter_into(model, a, slots[a.name])
    prompts = {a.name: list(range(5 + 3 * i, 12 + 5 * i)) for i, a in enumerate(adapters)}
    prompts["base"] = list(range(3, 3 + len(PROMPT) // 8))
    driver = PagedDriver(model, 64, BLOCK_SIZE, lora_kernel_layout=True)
    return driver.step(prompts, lora_slots=slots)


@needs_interpreter
def test_norms_after_o_and_down_take_the_fused_kernel(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fusion, the norm after each layer's o_proj and down_proj (the next layer's,
    or the final one) adds the deltas, and the logits are those of the kernels apart."""
    monkeypatch.setattr(layers, "LORA_KERNELS", "triton")
    monkeypatch.setattr(ops, "MODEL_KERNELS", "triton")
    monkeypatch.setattr(layers, "FUSED_EXPAND_NORM", True)
    calls = count_calls(monkeypatch, norm_mod, "lora_expand_add_rms_norm")
    fused = tiny_logits(tiny_model_dir)
    assert len(calls) == 2 * 2  # o_proj and down_proj of the tiny model's two layers
    monkeypatch.setattr(layers, "FUSED_EXPAND_NORM", False)
    apart = tiny_logits(tiny_model_dir)
    assert len(calls) == 4
    assert fused.keys() == apart.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], apart[name], rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_deferred_delta_resolves_to_the_layer_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no norm takes it, a deferred output gives what ``forward`` gives."""
    monkeypatch.setattr(layers, "LORA_KERNELS", "triton")
    monkeypatch.setattr(ops, "MODEL_KERNELS", "triton")
    st = make_setup(Case(6, (8,), 2, (24,), F32, F32))
    lay = st.layer
    lay.create_lora_buffers(3, 8, F32)  # A under W: the stacked product
    a = torch.randn(8, lay.in_features)
    lay.set_lora(1, 0, a, torch.randn(24, 8))
    meta = build_lora_metadata([1, -1, 1, 1, -1, 1], DEVICE)
    out = lay.forward_deferred(st.x, meta)
    assert isinstance(out, DeferredDelta)
    torch.testing.assert_close(out.resolve(), lay(st.x, meta), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(layers, "FUSED_EXPAND_NORM", False)
    assert isinstance(lay.forward_deferred(st.x, meta), torch.Tensor)


@needs_interpreter
def test_warm_up_compiles_the_fused_norm(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.model.test_llama_matches_transformers import load_ours

    monkeypatch.setattr(layers, "LORA_KERNELS", "triton")
    monkeypatch.setattr(ops, "MODEL_KERNELS", "triton")
    monkeypatch.setattr(layers, "FUSED_QKV_ROPE", False)
    monkeypatch.setattr(layers, "FUSED_EXPAND_NORM", True)
    model = load_ours(tiny_model_dir)
    for layer in model.lora_layers().values():
        layer.create_lora_buffers(2, max_rank=8, dtype=torch.float32)
    calls = count_calls(monkeypatch, norm_mod, "lora_expand_add_rms_norm")
    assert model.warm_up_lora_fusions() == 1 == len(calls)
    monkeypatch.setattr(layers, "FUSED_EXPAND_NORM", False)
    assert model.warm_up_lora_fusions() == 0

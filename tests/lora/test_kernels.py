"""Batched LoRA kernels against their torch references and a per-token float64 loop.

On CPU every kernel runs through Triton's interpreter at small sizes (``TRITON_INTERPRET``,
set in tests/conftest.py); on CUDA the sweep adds the large shapes and a CUDA graph replayed
across adapter changes.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from engine.config import KernelConfig
from engine.kernels import lora_expand_triton as expand_mod
from engine.kernels import lora_shrink_triton as shrink_mod
from engine.kernels.dispatch import Kernels
from engine.kernels.lora import (
    add_lora_reference,
    lora_expand_reference,
    lora_shrink_reference,
)
from engine.lora import (
    LoRALinear,
    LoRAMetadata,
    allocate_static_lora_metadata,
    build_lora_metadata,
)
from engine.testing.forward import make_lora_metadata
from tests.kernel_calls import counting_kernels

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.gpu  # too large for the interpreter
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Relative error allowed against float64, by the least precise dtype on the path.
TOL = {F32: 1e-5, F16: 3e-3, BF16: 2e-2}
PRECISION = {F32: 0, F16: 1, BF16: 2}


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=PRECISION.__getitem__)


@dataclass(frozen=True)
class Case:
    tokens: int
    ranks: tuple[int, ...]  # per adapter, cycled
    adapters: int
    slices: tuple[int, ...]
    dtype: torch.dtype = F32  # x and y
    lora_dtype: torch.dtype = F32
    pattern: str = "random"  # random | one | none | segments
    in_features: int = 48
    max_rank: int = 0  # 0: the largest of ranks

    @property
    def id(self) -> str:
        names = {F32: "f32", BF16: "bf16", F16: "f16"}
        r = "mixed" if len(set(self.ranks)) > 1 else str(self.ranks[0])
        s = "x".join(map(str, self.slices))
        return (
            f"T{self.tokens}-r{r}-L{self.adapters}-S{s}-{names[self.dtype]}"
            f"-lora_{names[self.lora_dtype]}-{self.pattern}"
        )


MIXED = (1, 8, 16, 64)
QKV, GATE_UP, ONE = (32, 16, 16), (40, 24), (48,)

# Small enough for the interpreter, and between them every code path: tile heights 16/32,
# native fp16 dot, upcast bf16 and mixed-dtype dots, float32, rank loops of one and two
# steps, adapters skipping a slice, tokens without adapter, segments sorted across runs.
CPU_CASES = [
    Case(1, (8,), 1, ONE, pattern="one"),
    Case(3, (16,), 4, QKV, BF16, BF16),
    Case(17, (1,), 4, GATE_UP, F16, F16),
    Case(17, MIXED, 4, QKV, BF16, BF16, "segments"),
    Case(17, (8,), 4, QKV, pattern="none"),
    Case(17, (8,), 4, QKV, F16, BF16),
    Case(17, (16,), 4, GATE_UP, F32, BF16),
    Case(17, (8,), 4, ONE, BF16, F32, "segments"),
    Case(64, (64,), 32, QKV, F16, F16),
    Case(64, (16,), 1, GATE_UP, BF16, BF16, "one"),
    Case(64, MIXED, 4, ONE, F32, F32, "segments"),
    Case(33, (100, 8), 4, QKV, F16, F16, "segments", max_rank=128),
]

GPU_SWEEP = [
    Case(t, r, a, s, d, d, p)
    for t, r, a, s, d in itertools.product(
        (1, 3, 17, 64, 4096),
        ((1,), (8,), (16,), (64,), MIXED),
        (1, 4, 32),
        ((256,), (192, 64), (256, 64, 64)),
        (F32, BF16, F16),
    )
    for p in (("random", "segments") if t == 4096 else ("random",))
    if (t, a) != (1, 32)
] + [
    Case(4096, (16,), 32, (256, 64, 64), BF16, BF16, "one", in_features=256),
    Case(4096, MIXED, 32, (192, 64), F16, BF16, "segments", in_features=256),
    Case(4096, (8,), 4, (256, 64, 64), F32, BF16, "none", in_features=256),
]


@dataclass
class Setup:
    case: Case
    layer: LoRALinear
    # weights[slot][slice]: (A [r, K], B [N_s, r]) in float64, None where the adapter skips it.
    weights: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]]
    token_slots: list[int]
    x: torch.Tensor
    y0: torch.Tensor
    meta: LoRAMetadata = field(init=False)

    def __post_init__(self) -> None:
        self.meta = build_lora_metadata(self.token_slots, DEVICE)


def make_setup(case: Case, seed: int = 0) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    k = case.in_features
    layer = LoRALinear(k, list(case.slices), [f"s{i}" for i in range(len(case.slices))])
    layer.weight.data = torch.randn(layer.out_features, k, generator=gen).to(DEVICE, case.dtype)
    max_rank = case.max_rank or max(case.ranks)
    max_loras = case.adapters + 1  # one slot stays free
    layer.create_lora_buffers(max_loras, max_rank, case.lora_dtype)
    slots = rng.sample(range(max_loras), case.adapters)
    weights: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
    for i, slot in enumerate(slots):
        r = case.ranks[i % len(case.ranks)]
        pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for s, n in enumerate(case.slices):
            if i == 1 and s == 1:  # like an adapter on q and v only
                pairs.append(None)
                continue
            a = torch.randn(r, k, generator=gen, dtype=torch.float64) / k**0.5
            b = torch.randn(n, r, generator=gen, dtype=torch.float64) / r**0.5
            a, b = a.to(case.lora_dtype), b.to(case.lora_dtype)  # what the buffers can hold
            layer.set_lora(slot, s, a.to(DEVICE), b.to(DEVICE))
            pairs.append((a.double(), b.double()))
        weights[slot] = pairs
    token_slots = assign_slots(case, slots, rng)
    x = torch.randn(case.tokens, k, generator=gen).to(DEVICE, case.dtype)
    y0 = torch.randn(case.tokens, layer.out_features, generator=gen).to(DEVICE, case.dtype)
    return Setup(case, layer, weights, token_slots, x, y0)


def assign_slots(case: Case, slots: list[int], rng: random.Random) -> list[int]:
    t = case.tokens
    if case.pattern == "one":
        return [slots[-1]] * t
    if case.pattern == "none":
        return [-1] * t
    if case.pattern == "random":  # decode: one token per sequence, some without adapter
        return [rng.choice([*slots, -1]) for _ in range(t)]
    assert case.pattern == "segments"  # prefill chunks; a slot may own several runs
    out: list[int] = []
    while len(out) < t:
        out += [rng.choice([*slots, -1])] * rng.randint(1, max(1, t // 3))
    return out[:t]


def per_token_delta(st: Setup) -> torch.Tensor:
    """[T, N] float64: each token's own adapter applied to its own row, nothing shared."""
    x = st.x.double().cpu()
    no_adapter = [None] * len(st.case.slices)
    rows = []
    for t, slot in enumerate(st.token_slots):
        pairs = st.weights[slot] if slot >= 0 else no_adapter
        parts = [
            torch.zeros(n, dtype=torch.float64) if pair is None else pair[1] @ (pair[0] @ x[t])
            for pair, n in zip(pairs, st.case.slices, strict=True)
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def per_token_delta_batched(st: Setup, chunk: int = 512) -> torch.Tensor:
    """``per_token_delta`` for thousands of tokens: each token's gathered weights, in chunks."""
    c = st.case
    k, r = c.in_features, c.max_rank or max(c.ranks)
    max_loras = st.layer.lora_ranks.shape[0]
    a_all = torch.zeros(max_loras, len(c.slices), r, k, dtype=torch.float64)
    b_all = torch.zeros(max_loras, sum(c.slices), r, dtype=torch.float64)
    offsets = [0, *itertools.accumulate(c.slices)]
    for slot, pairs in st.weights.items():
        for s, pair in enumerate(pairs):
            if pair is not None:
                a_all[slot, s, : pair[0].shape[0]] = pair[0]
                b_all[slot, offsets[s] : offsets[s + 1], : pair[1].shape[1]] = pair[1]
    a_all, b_all = a_all.to(DEVICE), b_all.to(DEVICE)
    slots = torch.tensor(st.token_slots, device=DEVICE)
    out = torch.zeros(c.tokens, sum(c.slices), dtype=torch.float64, device=DEVICE)
    for lo in range(0, c.tokens, chunk):
        sl = slots[lo : lo + chunk].clamp(min=0)
        h = torch.einsum("tsrk,tk->tsr", a_all[sl], st.x[lo : lo + chunk].double())
        for s in range(len(c.slices)):
            b = b_all[sl, offsets[s] : offsets[s + 1]]  # [t, N_s, R]
            out[lo : lo + chunk, offsets[s] : offsets[s + 1]] = torch.einsum(
                "tnr,tr->tn", b, h[:, s]
            )
        out[lo : lo + chunk][slots[lo : lo + chunk] < 0] = 0
    return out.cpu()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


# Half a unit in the last place, relative: the rounding of y itself.
ULP = {F32: 6e-8, F16: 4.9e-4, BF16: 3.9e-3}


def assert_delta(y: torch.Tensor, y0: torch.Tensor, delta: torch.Tensor, tol: float) -> None:
    """y = y0 + delta within ``tol`` of delta plus y's own rounding."""
    assert torch.isfinite(y).all()
    expected = y0.double().cpu() + delta
    err = (y.double().cpu() - expected).norm()
    bound = tol * delta.norm() + 2 * ULP[y.dtype] * expected.norm()
    assert err <= bound, f"error {err:.3g} > {bound:.3g}"


def written_h(st: Setup, planes: torch.Tensor) -> torch.Tensor:
    """The shrink's split-K planes summed where it must have written them: tokens with a
    slot, columns within rank (elsewhere h is undefined, possibly NaN)."""
    h = planes.sum(0)
    slots = torch.tensor(st.token_slots, device=h.device)
    max_rank = st.layer.lora_a_stacked.shape[2]
    r = torch.arange(max_rank, device=h.device)
    cols = (r < st.layer.lora_ranks.unsqueeze(-1)).flatten(1)  # [L, S * R]
    mask = (slots >= 0)[:, None] & cols[slots.clamp(min=0)]
    return torch.where(mask, h, torch.zeros_like(h))


def use_kernels(layer: LoRALinear, **config: Any) -> Counter[str]:
    """Run ``layer`` under ``KernelConfig(**config)`` from now on; returns the counter of
    its Triton calls."""
    layer.kernels, calls = counting_kernels(KernelConfig(**config), DEVICE)
    return calls


def add_lora(*args: Any) -> None:
    """The shrink then the expand (``TritonKernels.add_lora``), default launch settings."""
    Kernels().triton.add_lora(*args)


def check_case(case: Case, seed: int = 0) -> None:
    st = make_setup(case, seed)
    lay, meta = st.layer, st.meta
    tol = TOL[least_precise(case.dtype, case.lora_dtype)]

    # Shrink against its reference (same float32 math, other summation order).
    h = shrink_mod.lora_shrink(st.x, lay.lora_a_stacked, lay.lora_ranks, meta)
    h_ref = lora_shrink_reference(st.x, lay.lora_a_stacked, lay.lora_ranks, meta)
    torch.testing.assert_close(written_h(st, h), h_ref, rtol=1e-4, atol=1e-4)
    if CUDA or case.tokens <= 17:  # split K (automatic on CUDA), forced on CPU once
        h2 = shrink_mod.lora_shrink(st.x, lay.lora_a_stacked, lay.lora_ranks, meta, split_k=2)
        torch.testing.assert_close(written_h(st, h2), h_ref, rtol=1e-4, atol=1e-4)

    # Expand against its reference, on the same h (cut in two split-K planes); rows without
    # adapter stay bit-identical.
    y, y_ref = st.y0.clone(), st.y0.clone()
    offsets = lay.slice_offsets.tolist()
    part = torch.randn_like(h_ref)
    planes = torch.stack([h_ref - part, part])
    expand_mod.lora_expand(
        y, planes, lay.lora_b_stacked, lay.lora_ranks, lay.slice_offsets, lay.out_slices, meta
    )
    lora_expand_reference(y_ref, h_ref, lay.lora_b_stacked, lay.lora_ranks, offsets, meta)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol + TOL[case.dtype])
    no_lora = torch.tensor([s < 0 for s in st.token_slots], device=DEVICE)
    assert torch.equal(y[no_lora], st.y0[no_lora])

    # accumulate=False writes the delta itself over whatever y held: 0 without an adapter.
    y_store, y_zero = torch.full_like(st.y0, float("nan")), torch.zeros_like(st.y0)
    expand_mod.lora_expand(
        y_store,
        planes,
        lay.lora_b_stacked,
        lay.lora_ranks,
        lay.slice_offsets,
        lay.out_slices,
        meta,
        accumulate=False,
    )
    lora_expand_reference(y_zero, h_ref, lay.lora_b_stacked, lay.lora_ranks, offsets, meta)
    torch.testing.assert_close(y_store, y_zero, rtol=tol, atol=tol + TOL[case.dtype])
    assert not y_store[no_lora].any()

    # Both kernels through add_lora against the float64 per-token loop.
    y = st.y0.clone()
    add_lora(
        y,
        st.x,
        lay.lora_a_stacked,
        lay.lora_b_stacked,
        lay.lora_ranks,
        lay.slice_offsets,
        lay.out_slices,
        meta,
    )
    expected = per_token_delta(st) if case.tokens <= 64 else per_token_delta_batched(st)
    if case.pattern == "none":
        assert torch.equal(y, st.y0)
    else:
        assert_delta(y, st.y0, expected, tol)
        # and against the engine's CPU path on the same buffers
        y_torch = st.y0.clone()
        add_lora_reference(y_torch, st.x, lay.lora_a, lay.lora_b, lay.out_slices, meta)
        assert_delta(y, st.y0, (y_torch.double() - st.y0.double()).cpu(), 2 * tol)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_kernels_match_references(case: Case) -> None:
    check_case(case)


# The sweep is generated only where it runs (the GPU): on CPU it would be hundreds of skips.
@needs_cuda
@pytest.mark.parametrize("case", GPU_SWEEP if CUDA else GPU_SWEEP[:1], ids=lambda c: c.id)
def test_kernels_match_references_sweep(case: Case) -> None:
    check_case(case, seed=zlib.crc32(case.id.encode()) % 1000)


def test_kernels_run_in_the_interpreter_on_cpu() -> None:
    kernels = [shrink_mod._lora_shrink_kernel, expand_mod._lora_expand_kernel]
    assert all(isinstance(k, InterpretedFunction) for k in kernels) != CUDA


def test_weights_past_the_rank_are_never_read() -> None:
    """Stale values past an adapter's rank (or in a slice it skips) change nothing: the
    kernels stop at the rank instead of relying on zero padding."""
    case = Case(17, (8, 3), 4, QKV, F16, F16, "segments", max_rank=16)
    st = make_setup(case)
    lay = st.layer
    clean = st.y0.clone()
    add_lora(
        clean,
        st.x,
        lay.lora_a_stacked,
        lay.lora_b_stacked,
        lay.lora_ranks,
        lay.slice_offsets,
        lay.out_slices,
        st.meta,
    )
    mask = torch.arange(16, device=DEVICE) < lay.lora_ranks.unsqueeze(-1)  # [L, S, R]
    lay.lora_a_stacked.masked_fill_(~mask.unsqueeze(-1), float("nan"))
    for s, (lo, hi) in enumerate(itertools.pairwise(lay.slice_offsets.tolist())):
        lay.lora_b_stacked[:, lo:hi].masked_fill_(~mask[:, s].unsqueeze(1), float("nan"))
    y = st.y0.clone()
    add_lora(
        y,
        st.x,
        lay.lora_a_stacked,
        lay.lora_b_stacked,
        lay.lora_ranks,
        lay.slice_offsets,
        lay.out_slices,
        st.meta,
    )
    assert torch.equal(y, clean)


@pytest.mark.parametrize("delta_into_gemm", [True, False])
def test_layer_forward_uses_the_kernels_when_forced(delta_into_gemm: bool) -> None:
    """Both shrink-kernel paths of ``LoRALinear.forward`` (the GEMM accumulating onto the
    expand's delta, or the expand adding to the GEMM's output) against the torch path."""
    # lora_stack_a_max=0: the stacked product has its own tests.
    settings = {"lora_delta_into_gemm": delta_into_gemm, "lora_stack_a_max": 0}
    st = make_setup(Case(17, (8,), 4, QKV, F16, F16))
    base = torch.nn.functional.linear(st.x, st.layer.weight)
    use_kernels(st.layer, backend="torch", **settings)
    y_torch = st.layer(st.x, st.meta)
    calls = use_kernels(st.layer, backend="triton", **settings)
    y = st.layer(st.x, st.meta)
    assert calls["lora_shrink"] == 1
    assert_rel((y - base).float(), (y_torch - base).float(), 1e-2)
    # Hand-built metadata has no kernel layout: the reference path, whatever the setting.
    y_hand = st.layer(st.x, make_lora_metadata(st.token_slots, DEVICE))
    assert calls["lora_shrink"] == 1
    torch.testing.assert_close(y_hand, y_torch)


@pytest.mark.parametrize("delta_into_gemm", [True, False])
def test_layer_bias_survives_the_kernel_path(delta_into_gemm: bool) -> None:
    """A layer with a bias (Qwen2's qkv) gives on the kernel path what the torch path gives,
    whichever way the delta meets the GEMM."""
    st = make_setup(Case(17, (8,), 4, QKV, F32, F32))
    lay = st.layer
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(lay.out_features, generator=gen).to(DEVICE)
    lay.bias = torch.nn.Parameter(bias, requires_grad=False)
    use_kernels(lay, backend="torch", lora_delta_into_gemm=delta_into_gemm)
    want = lay(st.x, st.meta)
    use_kernels(lay, backend="triton", lora_delta_into_gemm=delta_into_gemm)
    torch.testing.assert_close(lay(st.x, st.meta), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------- A stacked under W (small steps)

STACKED_CPU_CASES = [
    Case(1, (8,), 1, ONE, pattern="one"),
    Case(17, (8,), 4, QKV, BF16, BF16),
    Case(17, MIXED, 4, QKV, F16, F16, "segments"),
    Case(9, (8,), 2, QKV, F32, F32, "none"),
    Case(33, (16,), 1, GATE_UP, BF16, BF16, "one"),
]
STACKED_GPU_CASES = [
    Case(t, r, a, s, d, d, p, in_features=k)
    for t, p in ((1, "random"), (256, "random"), (256, "one"), (512, "segments"))
    for r, a in (((16,), 32), (MIXED, 4))
    for s, k in (((4096, 1024, 1024), 4096), ((4096,), 14336), ((256, 64, 64), 256))
    for d in (BF16, F16)
]


def check_stacked(case: Case) -> None:
    """The stacked GEMM's path: ``x · [W; A]ᵀ`` gives the base product and every slot's h,
    the per-slot expand reads each token's own, and the layer's output matches the shrink
    kernel's path and the float64 per-token loop."""
    st = make_setup(case, seed=zlib.crc32(case.id.encode()) % 1000)
    lay, meta = st.layer, st.meta
    use_kernels(lay, backend="triton")  # on CPU too, interpreted
    assert lay.weight_and_a is not None
    tol = TOL[least_precise(case.dtype, case.lora_dtype)]
    base = torch.nn.functional.linear(st.x, lay.weight)
    y, h = lay._stacked_product(st.x)  # y: the base product by another GEMM (other rounding)
    assert_rel(y, st.x.double() @ lay.weight.double().t(), TOL[case.dtype])
    num_loras, num_slices, max_rank, _ = lay.lora_a_stacked.shape
    a_rows = lay.lora_a_stacked.reshape(num_loras * num_slices * max_rank, -1)
    h_ref = st.x.double() @ a_rows.double().t()  # every slot's x · Aᵀ
    assert_rel(h.double(), h_ref, TOL[case.dtype])

    # The per-slot expand against the reference on each token's own slice of h.
    slots = torch.tensor(st.token_slots, device=DEVICE).clamp(min=0)
    h_own = h.view(case.tokens, num_loras, -1)[torch.arange(case.tokens, device=DEVICE), slots]
    y_kernel, y_ref = st.y0.clone(), st.y0.clone()
    b_args = (lay.lora_b_stacked, lay.lora_ranks, lay.slice_offsets, lay.out_slices, meta)
    expand_mod.lora_expand(y_kernel, h, *b_args, h_per_slot=True)
    lora_expand_reference(
        y_ref, h_own.float(), lay.lora_b_stacked, lay.lora_ranks, lay.slice_offsets.tolist(), meta
    )
    torch.testing.assert_close(y_kernel, y_ref, rtol=tol, atol=tol + TOL[case.dtype])

    # The layer, both ways, against the float64 loop; y is a view into the wider output.
    expected = per_token_delta(st) if case.tokens <= 64 else per_token_delta_batched(st)
    stacked = lay(st.x, meta, stack_a=True)
    apart = lay(st.x, meta, stack_a=False)
    if case.pattern == "none":  # no adapter in the step: the base GEMM alone
        torch.testing.assert_close(stacked, base, rtol=0, atol=0)
    else:
        if case.tokens > 1:  # a view into the wider product (one row has no row stride)
            assert stacked.stride(0) == lay.weight_and_a.shape[0]
        assert_delta(stacked, y, expected, tol)
        assert_delta(apart, base, expected, tol)


def test_stacked_product_only_where_it_pays() -> None:
    """The layer takes the stacked GEMM for steps of T tokens with ``T * rows of A`` up to
    ``lora_stack_a_max``, in layers whose A of all slots is at most
    ``lora_stack_a_max_bytes``; the shrink kernel otherwise. Both give the same output."""
    st = make_setup(Case(17, (8,), 4, QKV, F32, F32))
    lay = st.layer
    a = lay.lora_a_stacked
    rows, a_bytes = a.shape[0] * a.shape[1] * a.shape[2], a.numel() * a.element_size()
    outputs = []
    for max_product, max_bytes, shrinks in [
        (17 * rows, a_bytes, 0),
        (17 * rows - 1, a_bytes, 1),
        (17 * rows, a_bytes - 1, 1),
    ]:
        calls = use_kernels(
            lay, backend="triton", lora_stack_a_max=max_product, lora_stack_a_max_bytes=max_bytes
        )
        outputs.append(lay(st.x, st.meta))
        assert calls["lora_shrink"] == shrinks, (max_product, max_bytes)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_stacked_product_keeps_the_bias() -> None:
    """A layer with a bias (Qwen2's qkv) on the stacked path: the bias becomes a view of
    ``[bias; 0]``, so the one GEMM adds it to y and nothing to h."""
    gen = torch.Generator().manual_seed(5)
    lay = LoRALinear(48, list(QKV), ["q", "k", "v"], bias=True, dtype=F32, device=DEVICE)
    lay.weight.copy_(torch.randn(lay.weight.shape, generator=gen))
    assert lay.bias is not None
    lay.bias.copy_(torch.randn(lay.bias.shape, generator=gen))
    lay.create_lora_buffers(4, 8, F32)
    assert lay.can_stack_a
    for slot in range(3):
        for s, n in enumerate(QKV):
            a, b = torch.randn(8, 48, generator=gen), torch.randn(n, 8, generator=gen)
            lay.set_lora(slot, s, a.to(DEVICE), b.to(DEVICE))
    x = torch.randn(9, 48, generator=gen).to(DEVICE)
    meta = build_lora_metadata([0, 1, -1, 2, 0, 2, -1, 1, 0], DEVICE)
    use_kernels(lay, backend="torch")
    want = lay(x, meta)
    use_kernels(lay, backend="triton")
    torch.testing.assert_close(lay(x, meta, stack_a=True), want, rtol=1e-4, atol=1e-4)
    # Replacing the bias afterwards (as a loader might) leaves the stacked buffers stale:
    # the layer then takes the shrink kernel's path, with the new bias.
    lay.bias = torch.nn.Parameter(torch.zeros_like(lay.bias), requires_grad=False)
    assert not lay.can_stack_a
    with pytest.raises(ValueError, match="stack_a=True"):
        lay(x, meta, stack_a=True)
    use_kernels(lay, backend="torch")
    want_unbiased = lay(x, meta)
    use_kernels(lay, backend="triton")
    torch.testing.assert_close(lay(x, meta), want_unbiased, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", STACKED_CPU_CASES, ids=lambda c: c.id)
def test_stacked_product_matches_references(case: Case) -> None:
    check_stacked(case)


@needs_cuda
@pytest.mark.parametrize("case", STACKED_GPU_CASES if CUDA else [], ids=lambda c: c.id)
def test_stacked_product_matches_references_sweep(case: Case) -> None:
    check_stacked(case)


# ------------------------------------------------------------------------ expand + SiLU

GATE_UP_PAIR = (40, 40)
FUSED_CPU_CASES = [
    Case(17, (8,), 4, GATE_UP_PAIR, BF16, BF16),
    Case(17, MIXED, 4, GATE_UP_PAIR, F16, F16, "segments"),
    Case(5, (16,), 2, GATE_UP_PAIR, F32, F32),
    Case(9, (8,), 2, GATE_UP_PAIR, BF16, BF16, "none"),
    Case(33, (4,), 1, GATE_UP_PAIR, F16, BF16, "one"),
]
FUSED_GPU_CASES = [
    Case(t, r, a, (i, i), d, d, p, in_features=k)
    for t, p in ((1, "random"), (256, "random"), (256, "one"), (4096, "segments"))
    for r, a in (((16,), 32), (MIXED, 4))
    for d in (BF16, F16)
    for i, k in ((14336, 4096), (1000, 256))
]


def check_expand_silu(case: Case, pad: int = 0) -> None:
    """The fused kernel against lora_expand followed by the SiLU kernel (bit for bit), and
    against the float64 per-token loop followed by torch's SiLU. ``pad``: on static (CUDA
    graph) metadata with that many padding tokens."""
    from engine.kernels.elementwise import silu_and_mul_reference
    from engine.kernels.elementwise_triton import silu_and_mul_triton

    st = make_setup(case, seed=zlib.crc32(case.id.encode()) % 1000)
    lay = st.layer
    meta = st.meta
    x, y0 = st.x, st.y0
    if pad:  # padded rows of a CUDA graph batch: no adapter, activation still applied
        max_loras = lay.lora_ranks.shape[0]
        meta = allocate_static_lora_metadata(case.tokens + pad, max_loras, DEVICE, block_m=16)
        build_lora_metadata(st.token_slots, DEVICE, out=meta)
        x = torch.cat([x, torch.randn(pad, x.shape[1], device=DEVICE, dtype=x.dtype)])
        y0 = torch.cat([y0, torch.randn(pad, y0.shape[1], device=DEVICE, dtype=y0.dtype)])
    h = shrink_mod.lora_shrink(x, lay.lora_a_stacked, lay.lora_ranks, meta)
    y = y0.clone()
    if not meta.empty:
        expand_mod.lora_expand(
            y, h, lay.lora_b_stacked, lay.lora_ranks, lay.slice_offsets, lay.out_slices, meta
        )
    unfused = silu_and_mul_triton(y)
    # With the expand's column block the products are summed in the same order (numpy's
    # matmul in the interpreter is not order-stable across shapes): equal bit for bit.
    max_rank = lay.lora_b_stacked.shape[2]
    same_block = expand_mod.expand_config(max_rank, meta.block_m, case.slices[0])[0]
    args = (y0, h, lay.lora_b_stacked, lay.lora_ranks, meta)
    assert torch.equal(expand_mod.lora_expand_silu_and_mul(*args, block_n=same_block), unfused)
    out = expand_mod.lora_expand_silu_and_mul(*args)  # the launch the engine makes
    torch.testing.assert_close(out, unfused, rtol=ULP[case.dtype] * 4, atol=1e-6)
    expected = (st.y0.double().cpu() + per_token_delta_batched(st)).to(case.dtype)
    tol = TOL[least_precise(case.dtype, case.lora_dtype)]
    reference = silu_and_mul_reference(expected.to(DEVICE))
    assert_rel(out[: case.tokens].float(), reference.float(), tol)


@pytest.mark.parametrize("case", FUSED_CPU_CASES, ids=lambda c: c.id)
def test_expand_silu_matches_expand_then_silu(case: Case) -> None:
    check_expand_silu(case)


@needs_cuda
@pytest.mark.parametrize("case", FUSED_GPU_CASES if CUDA else [], ids=lambda c: c.id)
def test_expand_silu_matches_expand_then_silu_sweep(case: Case) -> None:
    check_expand_silu(case)


def test_expand_silu_covers_padding_rows_of_static_metadata() -> None:
    check_expand_silu(Case(11, (8,), 4, GATE_UP_PAIR, BF16, BF16), pad=5)


def test_layer_silu_and_mul_takes_the_fused_kernel() -> None:
    """``LoRALinear.silu_and_mul`` launches the fused kernel where the kernels run on
    prefill-tall tiles, and gives what the torch paths give."""
    min_block_m = KernelConfig().lora_fused_silu_min_block_m
    st = make_setup(Case(40, (8,), 2, GATE_UP_PAIR, F32, F32, "segments"))
    decode_meta = build_lora_metadata(st.token_slots, DEVICE, block_m=16)
    st.meta = build_lora_metadata(st.token_slots, DEVICE, block_m=min_block_m)
    # lora_stack_a_max=0: the shrink kernel's path (stack_a=True below takes the other).
    use_kernels(st.layer, backend="torch", lora_stack_a_max=0)
    expected = st.layer.silu_and_mul(st.x, st.meta)
    calls = use_kernels(st.layer, backend="triton", lora_stack_a_max=0)
    fused = "lora_expand_silu_and_mul"
    out = st.layer.silu_and_mul(st.x, st.meta)
    assert calls[fused] == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Decode tiles (16 tall): the expand and the SiLU kernel apart, same result.
    torch.testing.assert_close(
        st.layer.silu_and_mul(st.x, decode_meta), expected, rtol=1e-5, atol=1e-5
    )
    assert calls[fused] == 1
    # The stacked GEMM's path takes the fused kernel at decode tiles too.
    stacked = st.layer.silu_and_mul(st.x, decode_meta, stack_a=True)
    assert calls[fused] == 2
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-5)
    calls = use_kernels(
        st.layer, backend="triton", lora_stack_a_max=0, lora_fused_silu_stacked=False
    )
    torch.testing.assert_close(
        st.layer.silu_and_mul(st.x, decode_meta, stack_a=True), expected, rtol=1e-5, atol=1e-5
    )
    assert calls[fused] == 0
    calls = use_kernels(st.layer, backend="triton", lora_stack_a_max=0, lora_fused_silu=False)
    torch.testing.assert_close(st.layer.silu_and_mul(st.x, st.meta), expected, rtol=1e-5, atol=1e-5)
    assert calls[fused] == 0
    with pytest.raises(ValueError, match="two equal slices"):
        make_setup(Case(3, (8,), 1, GATE_UP)).layer.silu_and_mul(st.x[:3, :48])


# ------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("seed", range(20))
def test_tiles_cover_every_adapter_token_once(seed: int) -> None:
    rng = random.Random(seed)
    num_tokens, max_loras = rng.randint(0, 300), rng.choice([1, 4, 32])
    slots = [rng.choice(range(-1, max_loras)) for _ in range(num_tokens)]
    if seed % 2:  # prefill-like runs
        slots = sorted(slots, key=lambda s: rng.random() if s < 0 else s)
    meta = build_lora_metadata(slots, "cpu")
    assert meta.tiles is not None
    assert meta.sorted_token_ids is not None
    sorted_ids = meta.sorted_token_ids.tolist()
    assert sorted(sorted_ids) == list(range(num_tokens))
    seen: list[int] = []
    for slot, start, n in meta.tiles.t().tolist():
        assert 1 <= n <= meta.block_m
        tile = sorted_ids[start : start + n]
        assert all(slots[t] == slot for t in tile)
        seen += tile
    # Every token once: those without an adapter in tiles of slot -1.
    assert sorted(seen) == list(range(num_tokens))
    assert meta.token_slots.tolist() == slots
    # Fields start 16-byte aligned whatever T (Triton compiles per pointer alignment).
    assert meta.sorted_token_ids.data_ptr() % 16 == meta.tiles.data_ptr() % 16 == 0
    assert [(s, ix.tolist()) for s, ix in meta.groups] == [
        (s, [t for t, x in enumerate(slots) if x == s]) for s in sorted(set(slots) - {-1})
    ]
    # The static capacity is enough for any assignment.
    static = allocate_static_lora_metadata(
        max(num_tokens, 1), max_loras, "cpu", block_m=meta.block_m
    )
    assert meta.max_tiles <= static.max_tiles


def test_block_m_follows_the_longest_segment() -> None:
    assert build_lora_metadata([0, 1, 2, -1], "cpu").block_m == 16
    assert build_lora_metadata([0] * 20 + [1], "cpu").block_m == 32
    assert build_lora_metadata([3] * 200, "cpu").block_m == 32
    assert build_lora_metadata([3] * 200, "cpu", block_m=16).max_tiles == 13
    assert build_lora_metadata([-1] * 5, "cpu").empty


def test_static_metadata_is_refreshed_in_place_and_pads() -> None:
    static = allocate_static_lora_metadata(8, 4, DEVICE, block_m=16)
    assert not static.empty  # graphs capture the kernels whatever the first step holds
    assert static.packed is not None
    ptr = static.packed.data_ptr()
    filled = build_lora_metadata([2, 2, -1, 0], DEVICE, out=static)
    assert filled is static
    assert static.packed.data_ptr() == ptr
    assert static.token_slots.tolist() == [2, 2, -1, 0, -1, -1, -1, -1]
    assert static.tiles is not None
    # Tokens 2 and 4-7 (padding) have no adapter: a tile of slot -1 first.
    assert static.tiles.tolist() == [[-1, 0, 2, 0, 0], [0, 5, 6, 0, 0], [5, 1, 2, 0, 0]]
    assert static.sorted_token_ids is not None
    assert static.sorted_token_ids.tolist() == [2, 4, 5, 6, 7, 3, 0, 1]
    step = build_lora_metadata(
        [1] * 8, DEVICE, num_tokens=8, max_tiles=static.max_tiles, block_m=16
    )
    step.copy_into(static)
    assert static.packed.data_ptr() == ptr
    assert static.tiles.tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [8, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="layout differs"):
        build_lora_metadata([1] * 4, DEVICE).copy_into(static)
    with pytest.raises(ValueError, match="do not fit"):
        build_lora_metadata([1] * 9, DEVICE, out=static)


def test_kernels_on_static_metadata_skip_padding() -> None:
    """Padded tokens (slot -1) and unused tiles of graph buffers leave y as it was."""
    st = make_setup(Case(11, (8,), 4, QKV, F16, F16))
    lay = st.layer
    static = allocate_static_lora_metadata(16, 5, DEVICE, block_m=16)
    build_lora_metadata(st.token_slots, DEVICE, out=static)
    x = torch.cat([st.x, torch.randn(5, st.x.shape[1], device=DEVICE, dtype=st.x.dtype)])
    y0 = torch.cat([st.y0, torch.randn(5, st.y0.shape[1], device=DEVICE, dtype=st.y0.dtype)])
    y, y_eager = y0.clone(), st.y0.clone()
    args = (
        lay.lora_a_stacked,
        lay.lora_b_stacked,
        lay.lora_ranks,
        lay.slice_offsets,
        lay.out_slices,
    )
    add_lora(y, x, *args, static)
    add_lora(y_eager, st.x, *args, st.meta)
    assert torch.equal(y[:11], y_eager)
    assert torch.equal(y[11:], y0[11:])


@needs_cuda
def test_cuda_graph_replays_across_adapter_changes() -> None:
    """Capture once on static metadata; new slots and new weights in the slots need no
    re-capture."""
    case = Case(64, MIXED, 4, (256, 64, 64), BF16, BF16, in_features=256)
    st = make_setup(case)
    lay = st.layer
    static = allocate_static_lora_metadata(64, 5, DEVICE, block_m=16)
    x = st.x.clone()
    build_lora_metadata(st.token_slots, DEVICE, out=static)
    lay(x, static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = lay(x, static)
    rng = random.Random(1)
    for step in range(3):
        slots = [rng.choice([-1, 0, 1, 2, 3, 4]) for _ in range(64 - 7 * step)]  # shrinking batch
        if step == 2:  # a new adapter in slot 2, another rank
            lay.clear_lora(2)
            for s, n in enumerate(case.slices):
                lay.set_lora(
                    2, s, torch.randn(5, 256, device=DEVICE) / 16, torch.randn(n, 5, device=DEVICE)
                )
        build_lora_metadata(slots, DEVICE, out=static)
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = lay(x[: len(slots)], build_lora_metadata(slots, DEVICE))
        # Not bit-identical: the eager step may split K differently (atomics).
        torch.testing.assert_close(y_static[: len(slots)], eager, rtol=2e-2, atol=2e-2)

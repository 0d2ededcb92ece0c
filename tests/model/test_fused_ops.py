"""The fused Triton kernels of the model's elementwise ops against their torch references.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) at small sizes; on
a CUDA device they are compiled, and ``TestRealSizesOnCuda`` (``-m gpu``) adds Llama-3.1-8B
sizes, a CUDA graph and the step-time target.

Where results may differ, and by how much: RoPE and the residual add use only products and
sums that both sides round at the same points, so they must be bit-exact in every dtype.
RMSNorm's float32 sum of squares is reduced in a different order than torch's and ``rsqrt``
differs by an ulp between implementations; SiLU's ``exp`` and division are numpy's
(interpreter) or the GPU's approximate ones rather than torch's. Those differences are a few
float32 ulps (``F32_ULPS``; for SiLU on the GPU also about 2 * |gate| more, as the
approximate ``exp`` rounds its argument ``-gate * log2(e)`` first); in half precision they show only where such an ulp straddles a rounding
boundary of the dtype, so a rare element may differ (``HALF_MISMATCH_FRACTION``): by one
ulp of the dtype, or two where a later multiply (by the weight, by ``up``) scales a one-ulp
difference of the rounded intermediate into the next binade. Rounding at the wrong point (say, skipping the cast before the
weight multiply) makes a large share of elements differ, which these bounds catch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import EngineArgs
from engine.config import HAS_TRITON, KernelConfig
from engine.kernels import elementwise
from engine.kernels.dispatch import Kernels
from engine.model.llama import LlamaForCausalLM, rope_inv_freq
from engine.model.loader import load_model
from engine.testing.forward import PagedDriver
from tests.kernel_calls import counting_kernels

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from engine.kernels import elementwise_triton  # noqa: E402 (needs triton)
from engine.kernels.elementwise_triton import (  # noqa: E402
    INTERPRET,
    apply_rotary_triton,
    rms_norm_triton,
    silu_and_mul_triton,
)

CUDA = torch.cuda.is_available()
# The interpreter runs on CPU tensors; compiled kernels need CUDA ones.
DEVICE = "cpu" if INTERPRET or not CUDA else "cuda"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
EPS = 1e-5
# Float32 ulps allowed between kernel and reference: each side is within ~2 ulps of the exact
# value (reduction order of a <= 4096-term sum of squares, rsqrt; exp, IEEE division).
F32_ULPS = 8
# Share of half-precision elements allowed to differ (by one ulp of the dtype): a few float32
# ulps of disagreement straddle a rounding boundary of the dtype with probability about
# F32_ULPS * 2**(mantissa bits - 23): 1e-3 for float16, 1.2e-4 for bfloat16.
HALF_MISMATCH_FRACTION = {F16: 2e-3, BF16: 5e-4}

# (tokens, hidden): decode-sized and prefill-sized token counts, odd hidden sizes; 4096 at
# few tokens only, to keep the interpreter fast.
NORM_SHAPES = [(1, 64), (7, 96), (33, 1000), (256, 64), (3, 4096)]
# (tokens, intermediate): several column blocks (BLOCK is at most 2048) and a ragged last one.
SILU_SHAPES = [(1, 64), (7, 96), (256, 128), (5, 2500)]
# (tokens, q heads, kv heads, head_dim): GQA, MHA, a head_dim whose half is not a power of 2.
ROPE_SHAPES = [(1, 4, 2, 16), (7, 6, 6, 24), (17, 4, 1, 32), (9, 32, 8, 128)]


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    # Float bits as integers ordered like the floats, so that a difference counts ulps.
    bits = x.view({F32: torch.int32, F16: torch.int16, BF16: torch.int16}[x.dtype]).long()
    sign_bit = 1 << (x.element_size() * 8 - 1)
    return torch.where(bits < 0, -(bits + sign_bit), bits)


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, f32_ulps: torch.Tensor | int = F32_ULPS
) -> None:
    """Equal up to ``f32_ulps`` (per element, or one bound) on float32, and up to two ulps on
    a rare element in half types."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.isfinite(expected).all()
    ulps = (ordered_bits(actual.cpu()) - ordered_bits(expected.cpu())).abs()
    if actual.dtype == F32:
        excess = ulps - torch.as_tensor(f32_ulps).cpu()
        worst = int(excess.argmax())
        assert int(excess.max()) <= 0, f"{int(ulps.flatten()[worst])} float32 ulps apart"
        return
    assert int(ulps.max()) <= 2, f"{int(ulps.max())} {actual.dtype} ulps apart"
    mismatched = int((ulps > 0).sum())
    allowed = 2 + HALF_MISMATCH_FRACTION[actual.dtype] * ulps.numel()
    assert mismatched <= allowed, f"{mismatched} of {ulps.numel()} elements differ"


def silu_f32_ulps(gate_up: torch.Tensor) -> torch.Tensor:
    """Float32 ulps allowed per element of SiLU-and-mul: F32_ULPS, plus 2 * |gate| for the
    approximate exp, whose argument -gate * log2(e) is rounded (relative 2**-24) first."""
    gate = gate_up[:, : gate_up.shape[1] // 2].float().abs()
    return F32_ULPS + 2 * gate.ceil().long()


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(dtype)


def rope_cos_sin(num_tokens: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # cos, sin: [T, Dh] float32 at random positions, as LlamaForCausalLM.forward builds them.
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 100_000, (num_tokens,), generator=gen)
    inv_freq = rope_inv_freq(head_dim, {"rope_type": "default", "rope_theta": 500000.0}, 8192)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "dim"), NORM_SHAPES)
def test_rms_norm_matches_reference(num_tokens: int, dim: int, dtype: torch.dtype) -> None:
    x = randn(num_tokens, dim, dtype=dtype, seed=dim, scale=3.0)
    weight = randn(dim, dtype=dtype, seed=1, scale=0.5) + 1
    normed, residual = rms_norm_triton(x, weight, EPS)
    assert residual is None
    assert_matches(normed, elementwise.rms_norm_reference(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "dim"), NORM_SHAPES)
def test_fused_add_rms_norm_matches_reference(
    num_tokens: int, dim: int, dtype: torch.dtype
) -> None:
    x = randn(num_tokens, dim, dtype=dtype, seed=dim)
    residual = randn(num_tokens, dim, dtype=dtype, seed=dim + 1, scale=4.0)
    weight = randn(dim, dtype=dtype, seed=2, scale=0.5) + 1
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = rms_norm_triton(x, weight, EPS, residual)
    ref_normed, ref_residual = elementwise.fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert new_residual is not None
    assert torch.equal(new_residual, ref_residual)  # one rounded add: bit-exact
    assert_matches(normed, ref_normed)
    assert torch.equal(x, x_before)
    assert torch.equal(residual, residual_before)


def test_rms_norm_keeps_torch_type_promotion_of_the_weight() -> None:
    # A float32 weight on bfloat16 activations: torch's `weight * h.to(bf16)` is float32.
    x = randn(5, 96, dtype=BF16, seed=3)
    weight = randn(96, dtype=F32, seed=4) + 1
    normed, _ = rms_norm_triton(x, weight, EPS)
    assert normed.dtype == F32
    assert_matches(normed, elementwise.rms_norm_reference(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "inter"), SILU_SHAPES)
def test_silu_and_mul_matches_reference(num_tokens: int, inter: int, dtype: torch.dtype) -> None:
    # |gate| up to ~10: SiLU stays out of float16's subnormals, where a one-ulp difference
    # times a large `up` would be many ulps of the product.
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, seed=inter, scale=2.0)
    out = silu_and_mul_triton(gate_up)
    assert out.shape == (num_tokens, inter)
    assert_matches(out, elementwise.silu_and_mul_reference(gate_up), silu_f32_ulps(gate_up))


def test_silu_and_mul_reads_a_strided_gate_up() -> None:
    # Rows of a wider buffer (a token stride larger than 2 * I).
    wide = randn(6, 300, dtype=BF16, seed=5, scale=3.0)
    gate_up = wide[:, :256]
    assert_matches(
        silu_and_mul_triton(gate_up),
        elementwise.silu_and_mul_reference(gate_up),
        silu_f32_ulps(gate_up),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_dtype", ["float32", "model"])
@pytest.mark.parametrize(("num_tokens", "num_heads", "num_kv_heads", "head_dim"), ROPE_SHAPES)
def test_rotary_in_place_on_qkv_is_bit_exact(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cos_dtype: str,
    dtype: torch.dtype,
) -> None:
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=head_dim, scale=2.0)
    cos, sin = rope_cos_sin(num_tokens, head_dim, seed=num_tokens)
    if cos_dtype == "model":  # precast once per step, as the model does
        cos, sin = cos.to(dtype), sin.to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q3 = q.view(num_tokens, num_heads, head_dim)  # views into qkv: strided tokens
    k3 = k.view(num_tokens, num_kv_heads, head_dim)
    ref_q, ref_k = elementwise.apply_rotary_reference(q3, k3, cos, sin)
    v_before = v.clone()
    apply_rotary_triton(q3, k3, cos, sin)
    assert torch.equal(q3, ref_q)
    assert torch.equal(k3, ref_k)
    assert torch.equal(v, v_before)


def test_apply_rotary_takes_flat_head_views() -> None:
    kernels, _ = counting_kernels(KernelConfig(backend="triton"))
    qkv = randn(5, (4 + 2 * 2) * 16, dtype=BF16, seed=6)
    cos, sin = rope_cos_sin(5, 16, seed=7)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)  # [T, H * Dh] and [T, Hkv * Dh]
    ref_q, ref_k = elementwise.apply_rotary_reference(q.view(5, 4, 16), k.view(5, 2, 16), cos, sin)
    out_q, out_k = kernels.apply_rotary(q, k, cos, sin)
    assert out_q.shape == (5, 4, 16)
    assert out_k.shape == (5, 2, 16)
    assert out_q.data_ptr() == q.data_ptr()  # rotated in place, no copy
    assert torch.equal(out_q, ref_q)
    assert torch.equal(out_k, ref_k)


def test_no_tokens_launch_nothing() -> None:
    x = torch.empty(0, 64, dtype=BF16, device=DEVICE)
    weight = torch.ones(64, dtype=BF16, device=DEVICE)
    assert rms_norm_triton(x, weight, EPS)[0].shape == (0, 64)
    normed, residual = rms_norm_triton(x, weight, EPS, x)
    assert normed.shape == (0, 64)
    assert residual is not None
    assert residual.shape == (0, 64)
    assert silu_and_mul_triton(torch.empty(0, 128, dtype=BF16, device=DEVICE)).shape == (0, 64)
    q = torch.empty(0, 4, 16, dtype=BF16, device=DEVICE)
    apply_rotary_triton(q, q[:, :2], *rope_cos_sin(0, 16, seed=0))


def test_kernels_reject_inputs_they_cannot_handle() -> None:
    x = randn(4, 64, dtype=F32, seed=8).t()  # [64, 4] with stride (1, 64)
    with pytest.raises(ValueError, match="unit-stride"):
        rms_norm_triton(x, torch.ones(4, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="unit-stride"):
        silu_and_mul_triton(x)
    rows = x.t().contiguous()  # [4, 64]
    with pytest.raises(ValueError, match="one shape and dtype"):
        rms_norm_triton(rows, torch.ones(64, device=DEVICE), EPS, rows.to(BF16))
    q = rows.view(4, 4, 16)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary_triton(q[..., :15], q[..., :15], *rope_cos_sin(4, 15, seed=0))


@pytest.mark.parametrize(
    ("backend", "uses_triton"),
    [("triton", True), ("torch", False), ("auto", DEVICE == "cuda")],
)
def test_kernel_backend_picks_the_path(backend: str, uses_triton: bool) -> None:
    kernels, calls = counting_kernels(KernelConfig(backend=backend))
    x = randn(3, 64, dtype=BF16, seed=9)
    weight = torch.ones(64, dtype=BF16, device=DEVICE)
    kernels.rms_norm(x, weight, EPS)
    kernels.fused_add_rms_norm(x, x, weight, EPS)
    kernels.silu_and_mul(x)
    kernels.apply_rotary(x[:, :32], x[:, 32:], *rope_cos_sin(3, 16, seed=1))
    expected = 1 if uses_triton else 0
    assert calls == Counter(
        rms_norm=expected,
        fused_add_rms_norm=expected,
        silu_and_mul=expected,
        apply_rotary=expected,
    )


def test_unknown_kernel_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="kernel_backend"):
        EngineArgs(model="m", kernel_backend="cuda")


# ----------------------------------------------------------------------------- whole model


def load_tiny(model_dir: Path, dtype: str, backend: str = "auto") -> LlamaForCausalLM:
    args = EngineArgs(
        model=str(model_dir),
        device=DEVICE,
        dtype=dtype,
        disable_log_stats=True,
        kernel_backend=backend,
    )
    return load_model(args.create_engine_config())


def run_steps(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Two sequences: a batched prefill, then three decode steps; logits of every step."""
    driver = PagedDriver(model, num_blocks=32, block_size=4)
    prompts = {"a": list(range(3, 22)), "b": list(range(40, 47))}
    out = driver.step(prompts)
    logits = [torch.cat([out["a"], out["b"]])]
    for step in range(3):
        out = driver.step({"a": [50 + step], "b": [60 + step]})
        logits.append(torch.cat([out["a"], out["b"]]))
    return logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_gives_the_same_logits_with_triton_kernels(
    tiny_model_dir: Path, dtype: str
) -> None:
    model = load_tiny(tiny_model_dir, dtype, backend="torch")
    kernels, kernel_calls = counting_kernels(model.kernels.config, DEVICE)
    model.set_kernels(kernels)
    expected = run_steps(model)
    assert not kernel_calls
    # The elementwise kernels; attention has its own tests (test_attention_kernels.py).
    attention = ("store_kv", "paged_attention")
    kernels, kernel_calls = counting_kernels(KernelConfig(backend="triton"), DEVICE, attention)
    model.set_kernels(kernels)
    actual = run_steps(model)
    # Per forward: input and post-attention norm of every layer plus the final norm; one
    # RoPE and one SiLU-and-mul per layer. Four forwards.
    layers = model.num_layers
    assert kernel_calls == Counter(
        rms_norm=4,
        fused_add_rms_norm=4 * 2 * layers,
        apply_rotary=4 * layers,
        silu_and_mul=4 * layers,
    )
    for got, ref in zip(actual, expected, strict=True):
        # float32: a few ulps per op; bfloat16: a rare one-ulp difference in an activation
        # moves logits by well under 2**-7 of their scale (on CPU they come out equal).
        rel = 1e-5 if dtype == "float32" else 1e-2
        torch.testing.assert_close(got, ref, rtol=0, atol=rel * float(ref.abs().max()))
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------------- CUDA only

# Llama-3.1-8B sizes at a decode batch of 256.
T8B, D8B, H8B, HKV8B, DH8B, I8B = 256, 4096, 32, 8, 128, 14336


@pytest.mark.gpu
class TestRealSizesOnCuda:
    @staticmethod
    def layer_inputs(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
        cos, sin = rope_cos_sin(T8B, DH8B, seed=seed)
        return {
            "x": randn(T8B, D8B, dtype=dtype, seed=seed),
            "residual": randn(T8B, D8B, dtype=dtype, seed=seed + 1, scale=4.0),
            "weight": randn(D8B, dtype=dtype, seed=seed + 2, scale=0.5) + 1,
            "qkv": randn(T8B, (H8B + 2 * HKV8B) * DH8B, dtype=dtype, seed=seed + 3),
            "gate_up": randn(T8B, 2 * I8B, dtype=dtype, seed=seed + 4, scale=2.0),
            "cos": cos.to(dtype),
            "sin": sin.to(dtype),
        }

    @staticmethod
    def layer_ops(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One decoder layer's elementwise work through the dispatch (auto: Triton)."""
        ops = Kernels()
        normed, residual = ops.fused_add_rms_norm(inp["x"], inp["residual"], inp["weight"], EPS)
        qkv = inp["qkv"]
        q, k = ops.apply_rotary(
            qkv[:, : H8B * DH8B], qkv[:, H8B * DH8B : (H8B + HKV8B) * DH8B], inp["cos"], inp["sin"]
        )
        return normed, residual, q, k, ops.silu_and_mul(inp["gate_up"])

    @staticmethod
    def reference(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        normed, residual = elementwise.fused_add_rms_norm_reference(
            inp["x"], inp["residual"], inp["weight"], EPS
        )
        qkv = inp["qkv"].view(T8B, -1, DH8B)
        q, k = elementwise.apply_rotary_reference(
            qkv[:, :H8B], qkv[:, H8B : H8B + HKV8B], inp["cos"], inp["sin"]
        )
        return normed, residual, q, k, elementwise.silu_and_mul_reference(inp["gate_up"])

    def check(
        self, got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], gate_up: torch.Tensor
    ) -> None:
        normed, residual, q, k, act = got
        ref_normed, ref_residual, ref_q, ref_k, ref_act = ref
        assert torch.equal(residual, ref_residual)
        assert torch.equal(q, ref_q)
        assert torch.equal(k, ref_k)
        assert_matches(normed, ref_normed)
        assert_matches(act, ref_act, silu_f32_ulps(gate_up))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_llama_8b_sizes_match_reference(self, dtype: torch.dtype) -> None:
        inp = self.layer_inputs(dtype, seed=0)
        ref = self.reference(inp)  # before layer_ops rotates qkv in place
        self.check(self.layer_ops(inp), ref, inp["gate_up"])

    def test_cuda_graph_replays_on_new_inputs(self) -> None:
        static = self.layer_inputs(BF16, seed=10)
        self.layer_ops({**static, "qkv": static["qkv"].clone()})  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.layer_ops(static)
        for seed in (20, 30):
            fresh = self.layer_inputs(BF16, seed=seed)
            ref = self.reference(fresh)
            for name, tensor in fresh.items():
                static[name].copy_(tensor)
            graph.replay()
            torch.cuda.synchronize()
            self.check(outputs, ref, fresh["gate_up"])

    def test_token_count_compiles_no_new_kernels(self) -> None:
        def compiled_variants() -> dict[str, int]:
            device = torch.cuda.current_device()
            return {
                name: len(getattr(elementwise_triton, name).device_caches[device][0])
                for name in ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel")
            }

        counts = []
        for num_tokens in (1, 7, 256, 3):
            x = randn(num_tokens, D8B, dtype=BF16, seed=num_tokens)
            weight = torch.ones(D8B, dtype=BF16, device=DEVICE)
            rms_norm_triton(x, weight, EPS, x)
            silu_and_mul_triton(randn(num_tokens, 2 * I8B, dtype=BF16, seed=1))
            qkv = randn(num_tokens, (H8B + 2 * HKV8B) * DH8B, dtype=BF16, seed=2)
            q = qkv[:, : H8B * DH8B].view(num_tokens, H8B, DH8B)
            k = qkv[:, H8B * DH8B : (H8B + HKV8B) * DH8B].view(num_tokens, HKV8B, DH8B)
            apply_rotary_triton(q, k, *rope_cos_sin(num_tokens, DH8B, seed=3))
            counts.append(compiled_variants())
        assert all(c == counts[0] for c in counts), counts  # the first call compiled them all

"""The seeded rows' noise kernel (``engine.kernels.sampling_triton``): Exp(1) by its CDF, one stream
per seed, other rows untouched; run where ``tests.sampling.triton_mode`` says."""

from __future__ import annotations

import math

import torch

from engine.kernels import sampling_triton as noise
from tests.sampling.triton_mode import DEVICE, needs_triton

pytestmark = needs_triton


def _fill(n: int, v: int, rows: list[int], seeds: list[int]) -> torch.Tensor:
    q = torch.full((n, v), -1.0, device=DEVICE)
    noise.seeded_exponential_(
        q,
        torch.tensor(rows, dtype=torch.int64, device=DEVICE),
        torch.tensor(seeds, dtype=torch.int64, device=DEVICE),
    )
    return q.cpu()


def test_seeded_rows_get_exponential_noise_and_the_rest_is_untouched() -> None:
    v = 3000  # not a multiple of the block
    q = _fill(5, v, rows=[3, 0], seeds=[2**62 + 12345, 7])
    assert (q[[1, 2, 4]] == -1.0).all()
    for row in (0, 3):
        x = q[row].double()
        assert (x >= 0).all()
        assert x.isfinite().all()
        # Against Exp(1)'s CDF 1 - e^-t at its quartiles (3000 draws: sd of a fraction 0.008).
        for t in (math.log(4 / 3), math.log(2), math.log(4)):
            assert abs((x <= t).double().mean().item() - (1 - math.exp(-t))) < 0.04, (row, t)
        assert abs(x.mean().item() - 1.0) < 0.08


def test_one_stream_per_seed_whatever_the_row() -> None:
    a = _fill(4, 600, rows=[1, 2], seeds=[11, 22])
    b = _fill(3, 600, rows=[0], seeds=[22])
    assert torch.equal(a[2], b[0])  # the same seed draws the same noise in any row
    assert not torch.equal(a[1], a[2])
    c = _fill(3, 600, rows=[0], seeds=[23])
    assert (c[0] != b[0]).float().mean() > 0.99

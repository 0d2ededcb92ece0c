"""Token sampling (batched, on device) and incremental detokenization (per request, on host)."""

from __future__ import annotations

from engine.sampling.detokenizer import IncrementalDetokenizer
from engine.sampling.sampler import (
    Penalties,
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
)

__all__ = [
    "IncrementalDetokenizer",
    "Penalties",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
]

"""Structured output: JSON schemas, regular expressions, choices and grammars per request,
applied as a token bitmask in the sampler (``engine.structured_output.manager``)."""

from __future__ import annotations

from engine.structured_output.manager import (
    GrammarState,
    InvalidConstraint,
    StructuredOutputManager,
)

__all__ = ["GrammarState", "InvalidConstraint", "StructuredOutputManager"]

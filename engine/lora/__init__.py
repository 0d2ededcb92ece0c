"""Multi-LoRA: the layers that add adapters' deltas (``LoRALinear``), the per-step metadata
that maps tokens to adapter slots (``LoRAMetadata`` and its builders), the adapter manager
(disk, host and device slots) and PEFT loading. The model uses what is exported here and
nothing deeper.

Names are imported lazily: the scheduler imports ``engine.lora.request`` and must not load
torch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BLOCK_MS": "engine.lora.metadata",
    "ColumnParallelLoRALinear": "engine.lora.sharded",
    "LoRALinear": "engine.lora.layers",
    "LoRAMetadata": "engine.lora.metadata",
    "RowParallelLoRALinear": "engine.lora.sharded",
    "allocate_static_lora_metadata": "engine.lora.metadata",
    "build_lora_metadata": "engine.lora.metadata",
    "tile_capacity": "engine.lora.metadata",
}

if TYPE_CHECKING:
    from engine.lora.layers import LoRALinear
    from engine.lora.metadata import (
        BLOCK_MS,
        LoRAMetadata,
        allocate_static_lora_metadata,
        build_lora_metadata,
        tile_capacity,
    )
    from engine.lora.sharded import ColumnParallelLoRALinear, RowParallelLoRALinear


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "BLOCK_MS",
    "ColumnParallelLoRALinear",
    "LoRALinear",
    "LoRAMetadata",
    "RowParallelLoRALinear",
    "allocate_static_lora_metadata",
    "build_lora_metadata",
    "tile_capacity",
]

"""The user's handle on an adapter, as in vLLM."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

# Ids handed to requests made without one: far above the small ids people write by hand
# (and the broker's registry hands out), so the two never name different adapters alike.
_AUTO_ID_START = 1 << 31
_auto_ids: dict[str, int] = {}
_auto_counter = itertools.count(_AUTO_ID_START)
_auto_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class LoRARequest:
    """An adapter by name, id and path. Two requests are the same adapter when their names
    are equal (vLLM's rule); ``lora_int_id`` is the engine's key for it, a positive integer:
    left out, this process assigns one per name."""

    lora_name: str
    lora_int_id: int = None  # type: ignore[assignment]  # None: assigned in __post_init__
    lora_path: str = ""
    base_model_name: str | None = None
    """The model the adapter was trained on (informational, as in vLLM)."""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if self.lora_int_id is None:
            object.__setattr__(self, "lora_int_id", _auto_id(self.lora_name))
        if (
            not isinstance(self.lora_int_id, int)
            or isinstance(self.lora_int_id, bool)
            or not 1 <= self.lora_int_id < 2**63
        ):
            raise ValueError(
                f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid: must be an integer "
                ">= 1 (or left out: one is assigned)"
            )
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be a non-empty path")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)


def _auto_id(name: str) -> int:
    with _auto_lock:
        if name not in _auto_ids:
            _auto_ids[name] = next(_auto_counter)
        return _auto_ids[name]

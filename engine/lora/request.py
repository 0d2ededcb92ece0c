"""The user's handle on an adapter, as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_int_id`` is a unique positive integer per adapter; equal ids mean the same adapter."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(
                f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid: must be an integer >= 1"
            )
        if not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be a non-empty path")

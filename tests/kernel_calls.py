"""A ``Kernels`` whose Triton side counts its calls: tests see which path a layer or a model
took without patching any module."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from engine.config import KernelConfig
from engine.kernels.dispatch import Kernels, TorchKernels, TritonKernels


class CountingTriton(TritonKernels):
    """``TritonKernels`` that counts each call by name, then runs it; the calls named in
    ``torch_for`` run the torch references instead (uncounted), for tests of the others."""

    def __init__(
        self,
        config: KernelConfig,
        device: torch.device | str | None = None,
        torch_for: tuple[str, ...] = (),
    ) -> None:
        super().__init__(config, config.launch_for(device))
        self.calls: Counter[str] = Counter()
        self.torch_for = torch_for
        self.reference = TorchKernels()

    def __getattribute__(self, name: str) -> Any:
        if name in super().__getattribute__("torch_for"):
            return getattr(super().__getattribute__("reference"), name)
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        calls = super().__getattribute__("calls")

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def counting_kernels(
    config: KernelConfig | None = None,
    device: torch.device | str | None = None,
    torch_for: tuple[str, ...] = (),
) -> tuple[Kernels, Counter[str]]:
    """(kernels under ``config``, the counter of their Triton calls)."""
    config = config or KernelConfig()
    triton = CountingTriton(config, device, torch_for)
    return Kernels(config, device, triton=triton), triton.calls

"""Errors named for the condition. Each carries a stable ``code`` that reaches clients."""

from __future__ import annotations


class LoRAStreamError(Exception):
    """Base class; ``code`` is stable and travels on the wire."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(LoRAStreamError, ValueError):
    code = "invalid_request"


class PromptTooLong(InvalidRequest):
    code = "prompt_too_long"


class InvalidSamplingParams(InvalidRequest):
    code = "invalid_sampling_params"


class AdapterError(LoRAStreamError, ValueError):
    """An adapter cannot be used; the engine keeps serving everyone else."""

    code = "adapter_error"


class AdapterNotFound(AdapterError):
    code = "adapter_not_found"


class AdapterRankTooLarge(AdapterError):
    code = "adapter_rank_too_large"


class AdapterUnsupported(AdapterError):
    """DoRA, bias, an unknown target module, or another PEFT feature we do not run."""

    code = "adapter_unsupported"


class AdapterShapeMismatch(AdapterError):
    code = "adapter_shape_mismatch"


class AdapterCorrupt(AdapterError):
    """Unreadable files, invalid config values, NaN/Inf scaling or weights."""

    code = "adapter_corrupt"


class AdapterPathNotAllowed(AdapterError):
    """A registry path outside ``--lora-root``, or an adapter file that resolves outside its
    adapter directory."""

    code = "adapter_path_not_allowed"


class AdapterLoadTimeout(AdapterError):
    """Reading the adapter's files took longer than the engine allows."""

    code = "adapter_load_timeout"


class UnsupportedModel(LoRAStreamError, ValueError):
    code = "unsupported_model"


class RequestTimeout(LoRAStreamError):
    """Preparing the request (tokenizing its prompt) took longer than the engine allows."""

    code = "request_timeout"


class EngineDead(LoRAStreamError, RuntimeError):
    code = "engine_dead"


class TensorParallelRankDied(EngineDead):
    """A tensor-parallel rank process exited: the engine cannot run a step without it."""


class RequestAborted(LoRAStreamError):
    code = "aborted"

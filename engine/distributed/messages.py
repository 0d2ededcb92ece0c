"""What rank 0 sends the other ranks, as msgpack (msgspec ``Struct``s; no pickle).

Each rank process reads one stream of messages from its stdin pipe, in order:
``WorkerStart`` once, then ``StepPlan`` / ``StepTokens`` per step, and ``Stop``. A frame is
an 8-byte little-endian length and the msgpack body; ``read_message`` decodes it against the
union of message types once, at the edge.

``StepPlan`` is everything a step's forward pass needs that rank 0 decided: the adapter
manager's calls since the last step and the adapter in each device slot, the step's packed
integer inputs (``engine.worker.model_runner.PackedInputs``: its scalars, and its buffer as
raw int64 bytes), the CUDA graph it replays, and the rows whose logits are gathered.
``StepTokens`` announces a broadcast of a step's sampled tokens over the device group (the
next step's placeholders read them on every rank).
"""

from __future__ import annotations

import dataclasses
import struct
from types import SimpleNamespace
from typing import IO, Any

import msgspec
import torch

from engine.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    LoRAConfig,
    LoRAModulePath,
    ParallelConfig,
    SchedulerConfig,
    torch_dtype,
)

_LENGTH = struct.Struct("<Q")


class LoRACall(msgspec.Struct, array_like=True, frozen=True):
    kind: str
    lora_id: int
    name: str
    path: str


class WorkerStart(msgspec.Struct, tag="start", frozen=True):
    rank: int
    world_size: int
    store_path: str
    config: dict[str, Any]
    """``encode_config``'s plain values."""


class StepPlan(msgspec.Struct, tag="step", frozen=True):
    seq: int
    """This step's number (rank 0 counts launches)."""
    prev_seq: int
    """The step whose sampled tokens fill this one's placeholders (-1: none)."""
    lora_calls: list[LoRACall]
    slot_ids: list[int]
    """Adapter id in each device slot after rank 0's activation (0: none); empty without LoRA."""
    stage: bytes
    """The packed int64 inputs, ``PackedInputs.total`` elements."""
    token_slots_lora: bytes | None
    num_tokens: int
    num_seqs: int
    num_real_seqs: int
    num_real_tokens: int
    width: int
    num_logits: int
    max_seq_len: int
    fills_offset: int
    num_fills: int
    graph_size: int
    """0: eager; else the graph's token (mixed) or sequence (decode) count."""
    graph_mixed: bool
    prompt_rows: list[int]
    """Rows of the hidden states whose logits are gathered for prompt logprobs."""


class StepTokens(msgspec.Struct, tag="tokens", frozen=True):
    seq: int
    num: int
    """int64 tokens rank 0 broadcasts next over the device group."""


class Stop(msgspec.Struct, tag="stop", frozen=True):
    pass


Message = WorkerStart | StepPlan | StepTokens | Stop

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def write_message(stream: IO[bytes], message: Message) -> None:
    body = _encoder.encode(message)
    stream.write(_LENGTH.pack(len(body)) + body)
    stream.flush()


def read_message(stream: IO[bytes]) -> Message:
    """The next message; ``EOFError`` when rank 0's end is closed (it exited or died)."""
    head = _read_exact(stream, _LENGTH.size)
    return _decoder.decode(_read_exact(stream, _LENGTH.unpack(head)[0]))


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError("rank 0 closed the channel")
    return data


def encode_config(config: EngineConfig) -> dict[str, Any]:
    """The resolved config as plain values, the Hugging Face config as its attributes (the
    model code only reads them): the other ranks then need not import transformers, which
    would double their start-up time."""
    lora = config.lora
    hf = config.hf_config
    return {
        "model": config.model,
        "hf_config": hf.to_dict() if hasattr(hf, "to_dict") else dict(vars(hf)),
        "tokenizer": config.tokenizer,
        "dtype": _dtype_name(config.dtype),
        "device": str(config.device),
        "seed": config.seed,
        "max_model_len": config.max_model_len,
        "cache": dataclasses.asdict(config.cache),
        "scheduler": dataclasses.asdict(config.scheduler),
        "lora": None
        if lora is None
        else {
            "max_loras": lora.max_loras,
            "max_lora_rank": lora.max_lora_rank,
            "max_cpu_loras": lora.max_cpu_loras,
            "lora_dtype": _dtype_name(lora.lora_dtype),
            "fully_sharded_loras": lora.fully_sharded_loras,
            "target_modules": list(lora.target_modules),
            "preload": [[m.name, m.path] for m in lora.preload],
        },
        "enforce_eager": config.enforce_eager,
        "log_stats": config.log_stats,
        "kernel": dataclasses.asdict(config.kernel),
        "max_cudagraph_capture_size": config.max_cudagraph_capture_size,
        "served_model_name": config.served_model_name,
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
    }


def decode_config(data: dict[str, Any], rank: int) -> EngineConfig:
    """Rank ``rank``'s config: rank 0's, on the ``rank``-th device after rank 0's on CUDA."""
    device = torch.device(data["device"])
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + rank)
    lora = data["lora"]
    return EngineConfig(
        model=data["model"],
        tokenizer=data["tokenizer"],
        hf_config=SimpleNamespace(**data["hf_config"]),
        dtype=torch_dtype(data["dtype"]),
        device=device,
        seed=data["seed"],
        max_model_len=data["max_model_len"],
        cache=CacheConfig(**data["cache"]),
        scheduler=SchedulerConfig(**data["scheduler"]),
        lora=None
        if lora is None
        else LoRAConfig(
            max_loras=lora["max_loras"],
            max_lora_rank=lora["max_lora_rank"],
            max_cpu_loras=lora["max_cpu_loras"],
            lora_dtype=torch_dtype(lora["lora_dtype"]),
            fully_sharded_loras=lora["fully_sharded_loras"],
            target_modules=tuple(lora["target_modules"]),
            preload=tuple(LoRAModulePath(n, p) for n, p in lora["preload"]),
        ),
        enforce_eager=data["enforce_eager"],
        log_stats=data["log_stats"],
        kernel=KernelConfig(
            **data["kernel"]
            | {"launch_overrides": tuple((k, v) for k, v in data["kernel"]["launch_overrides"])}
        ),
        max_cudagraph_capture_size=data["max_cudagraph_capture_size"],
        served_model_name=data["served_model_name"],
        parallel=ParallelConfig(tensor_parallel_size=data["tensor_parallel_size"]),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""Tensor parallelism: one process per rank, rank 0 the engine core's own.

- ``group``: the process group and its collectives (NCCL on CUDA, gloo on CPU);
- ``messages``: what rank 0 sends the other ranks (msgpack over their stdin);
- ``ranks``: rank 0's side of the other processes (start, feed, watch, stop);
- ``runner``: ``TPModelRunner``, rank 0's launch plus the other ranks' ``follow`` loop;
- ``worker``: the entry point of ranks 1..N-1.

The model's sharded layers are ``engine.model.parallel`` and ``engine.lora.sharded``.
"""

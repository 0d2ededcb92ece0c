"""GPU benchmarks, run from the repository root as modules (``python -m benchmarks.bench``):

- ``bench``: throughput of the engine, base model and adapters side by side, against
  transformers + PEFT, and the decode step against the HBM roofline (BENCHMARKS.md);
- ``bench_serve``: the same requests offline and through Redis (the service's overhead);
- ``kernels.decode_step``: the CUDA-graph decode step under kernel settings (A/B of
  ``EngineArgs``' kernel fields, the way launch tables are tuned);
- ``kernels.attention``, ``kernels.lora``, ``kernels.sampler``: single kernels' sweeps;
- ``utils``: what they share (checkpoints at real shapes, engines, timing).

``--device cpu`` (with ``--shape tiny``) is a dry run where a benchmark has one
(tests/docs).
"""

"""Developer tooling, not used by the engine at run time: tiny and random-shape checkpoints
with PEFT adapters (``tiny``: the tests, the demo, the benchmarks) and a driver that runs a
model through its paged KV cache without the scheduler (``forward``: the model tests)."""

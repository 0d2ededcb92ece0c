"""Every kernel of the engine, each Triton kernel beside its pure-torch reference.

====================  ==========================  =========================================
work                  reference                   Triton
====================  ==========================  =========================================
RMSNorm, SiLU, RoPE   ``elementwise``             ``elementwise_triton``
paged attention       ``attention``               ``attention_triton``
LoRA shrink/expand    ``lora``                    ``lora_shrink_triton``,
                                                  ``lora_expand_triton`` (+ SiLU),
                                                  ``lora_qkv_triton`` (+ RoPE, KV write)
sampling              ``engine.sampling``         ``sampling_triton``
====================  ==========================  =========================================

One way of compiling: a Triton module decorates its kernels with ``@triton.jit`` when it is
imported, and is imported only where a Triton path runs (``dispatch.Kernels``, the
sampler), never by this package. Triton reads ``TRITON_INTERPRET`` when it decorates, so
tests on CPU set it before anything imports a Triton module, and a CPU-only install needs no
Triton. ``Kernels`` is the one dispatch: it reads the engine's ``KernelConfig`` (backend,
fusion switches, stacking limits) and the device's launch settings (``configs/<GPU>.json``).
"""

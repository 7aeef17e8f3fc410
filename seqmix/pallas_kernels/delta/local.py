"""`chunk_delta_rule` on the arrays one device holds: the implementations and the choice among
them. The op checks its arguments before it gets here; the sequence-parallel form runs this on
each device's shard."""

import jax.numpy as jnp

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.delta import pallas_gpu, pallas_tpu
from seqmix.pallas_kernels.delta.reference import delta_reference
from seqmix.pallas_kernels.delta.xla import delta_xla

IMPLEMENTATIONS = [
    registry.Implementation("pallas_gpu", pallas_gpu.delta_pallas_gpu, pallas_gpu.supports, ("gpu",)),
    registry.Implementation("pallas_tpu", pallas_tpu.delta_pallas_tpu, pallas_tpu.supports, ("tpu",)),
    registry.Implementation("xla", delta_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", delta_reference, registry.always, ()),
]


def local_delta_rule(q, k, v, beta, log_gate, *, scale: float, initial_state, segment_ids, chunk_size: int,
                     impl: str):
    """(o [B,T,H,V] in q's dtype, final_state [B,H,K,V] float32) of `chunk_delta_rule`'s checked
    arguments; log_gate [B,T,H,W] float32 as `log_gates.log_gate_of` makes it (W = 1: per head or
    no decay; W = K: per key)."""
    call = registry.KernelCall(q.shape[-1], v.shape[-1], chunk_size)
    implementation = registry.choose(IMPLEMENTATIONS, impl, call, "chunk_delta_rule")
    return implementation.run(q, k, v, beta=beta.astype(jnp.float32), log_gate=log_gate, scale=scale,
                              initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)

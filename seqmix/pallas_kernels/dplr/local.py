"""`chunk_dplr` on the arrays one device holds: the implementations and the choice among them.
The op checks its arguments before it gets here; the sequence-parallel form runs this on each
device's shard."""

import jax.numpy as jnp

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.dplr import pallas_gpu, pallas_tpu
from seqmix.pallas_kernels.dplr.reference import dplr_reference
from seqmix.pallas_kernels.dplr.xla import dplr_xla

IMPLEMENTATIONS = [
    registry.Implementation("pallas_gpu", pallas_gpu.dplr_pallas_gpu, pallas_gpu.supports, ("gpu",)),
    registry.Implementation("pallas_tpu", pallas_tpu.dplr_pallas_tpu, pallas_tpu.supports, ("tpu",)),
    registry.Implementation("xla", dplr_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", dplr_reference, registry.always, ()),
]


def local_dplr(q, k, v, a, b, log_g, *, scale: float, initial_state, segment_ids, chunk_size: int, impl: str):
    """(o [B,T,H,V] in q's dtype, final_state [B,H,K,V] float32) of `chunk_dplr`'s checked arguments."""
    call = registry.KernelCall(q.shape[-1], v.shape[-1], chunk_size)
    implementation = registry.choose(IMPLEMENTATIONS, impl, call, "chunk_dplr")
    f32 = lambda x: x.astype(jnp.float32)
    return implementation.run(q, k, v, a=f32(a), b=f32(b), log_g=f32(log_g), scale=scale,
                              initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)

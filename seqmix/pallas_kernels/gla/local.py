"""`chunk_gla` on the arrays one device holds: the implementations and the choice among them.
The op checks its arguments before it gets here; the sequence-parallel form runs this on each
device's shard."""

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.gla import pallas_gpu, pallas_tpu
from seqmix.pallas_kernels.gla.reference import gla_reference
from seqmix.pallas_kernels.gla.xla import gla_xla

IMPLEMENTATIONS = [
    registry.Implementation("pallas_gpu", pallas_gpu.gla_pallas_gpu, pallas_gpu.supports, ("gpu",)),
    registry.Implementation("pallas_tpu", pallas_tpu.gla_pallas_tpu, pallas_tpu.supports, ("tpu",)),
    registry.Implementation("xla", gla_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", gla_reference, registry.always, ()),
]


def local_gla(q, k, v, log_gate, *, scale: float, initial_state, segment_ids, chunk_size: int, impl: str):
    """(o [B,T,H,V] in q's dtype, final_state [B,H,K,V] float32) of `chunk_gla`'s checked
    arguments, log_gate [B,T,H,K or 1] float32 as `log_gate_of` makes it."""
    call = registry.KernelCall(q.shape[-1], v.shape[-1], chunk_size)
    implementation = registry.choose(IMPLEMENTATIONS, impl, call, "chunk_gla")
    return implementation.run(q, k, v, log_gate=log_gate, scale=scale, initial_state=initial_state,
                              segment_ids=segment_ids, chunk_size=chunk_size)

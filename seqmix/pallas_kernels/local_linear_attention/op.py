"""`local_linear_attention`: the one public op of the family, and its dispatch."""

import jax.numpy as jnp

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.local_linear_attention.reference import local_linear_attention_reference
from seqmix.pallas_kernels.local_linear_attention.xla import local_linear_attention_xla

# No Pallas implementation yet: on CPU, the only backend that has run it, the XLA path's matmuls
# over key moments already dominate (its cost is the method's, O(T^2 D^2)).
IMPLEMENTATIONS = [
    registry.Implementation("xla", local_linear_attention_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", local_linear_attention_reference, registry.always, ()),
]


def local_linear_attention(q, k, v, mask, *, scale: float, ridge: float, block_size: int = 64, impl="auto"):
    """Each query's local linear estimate of the values (Zuo et al. 2025):

        p_j   = softmax_j(scale * q_i . k_j)  over the keys j that mask[i] allows
        (b,W) = argmin sum_j p_j ||v_j - b - W (k_j - q_i)||^2 + ridge ||W||_F^2
        o_i   = b = v_bar + Cov(v, k) (Cov(k, k) + ridge I)^-1 (q_i - k_bar)

    with k_bar, v_bar and the covariances p-weighted. q [B,Tq,H,D], k [B,Tk,H,D], v [B,Tk,H,Dv]
    (one key head per query head: repeat grouped heads first), bfloat16 or float32, computed in
    float32; mask [B,Tq,Tk] bool: what each query sees (causality, segments, a cache's filled
    slots); ridge > 0; block_size: queries and keys per block of the xla path.
    impl: "auto" (`xla`), "xla" (blockwise, memory O(T D^2)) or "reference" (every weight and
    covariance materialised, memory O(T^2 + T D^2)).
    Departs from the kernel contract: a mask instead of segment_ids (the op attends like softmax
    attention, to a prompt's cache as well as to itself) and no state, which it does not have.
    Returns o [B,Tq,H,Dv] float32, 0 for a query that sees no key.
    """
    op = "local_linear_attention"
    if q.ndim != 4 or k.shape != q.shape[:1] + k.shape[1:2] + q.shape[2:] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: q [B,Tq,H,D], k [B,Tk,H,D] and v [B,Tk,H,Dv] must agree, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if mask.shape != (q.shape[0], q.shape[1], k.shape[1]) or mask.dtype != jnp.bool_:
        raise ValueError(f"{op}: mask must be bool [B,Tq,Tk] = {(q.shape[0], q.shape[1], k.shape[1])}, "
                         f"got {mask.dtype} {mask.shape}")
    if not ridge > 0 or block_size < 1:
        raise ValueError(f"{op}: ridge must be positive and block_size at least 1, got {ridge}, {block_size}")
    implementation = registry.choose(IMPLEMENTATIONS, impl, (q.shape, v.shape), op)
    return implementation.run(q, k, v, mask, scale=scale, ridge=ridge, block_size=block_size)

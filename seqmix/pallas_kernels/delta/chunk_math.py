"""The (gated) delta rule on one chunk of one (batch, head), for both Pallas kernels: `chunk_forward`
and `chunk_backward`, which `sweep_gpu` and `sweep_tpu` run chunk after chunk.

The algebra is `delta.algebra`'s (the one definition, shared with `delta.xla`; read it for the
derivation); this module supplies what a kernel body computes its own way, on 2-D tiles
(`tile_math`: no reshapes, transposes or slices of a tile, no scans, no `lax.linalg`), so that the
same functions trace inside Triton and Mosaic TPU kernel bodies: the gates' sums and their
cotangents as masked sums, the segment masks from the chunk's groups, and the decayed products
(`_decayed_products`), differentiated by `jax.vjp`, with a decay per key (KDA) or one per head
(Gated DeltaNet, broadcast over the keys).

Shapes (C = chunk length, W = gate width: K per key, 1 per head or no decay):
  q, k [C, K] (q already scaled) and v [C, V], in the inputs' dtype (bfloat16 or float32);
  beta [C, 1] and log_gate [C, W] float32; groups [C, 1] int32: reset group relative to the state
  entering the chunk (0 = same segment); state [V, K] float32, value-major (the transpose of the
  public [K, V]) like the GLA kernels' state, so both families share `layout` and the kernel sweeps,
  and a per-key decay is a broadcast along the lanes.
Precision: with bfloat16 inputs, only products of two input tiles (q k^T, k k^T under a decay per
head) run as bfloat16 matmuls, which are exact products accumulated in float32; everything touching
the triangular inverse or the state is a float32 matmul at full precision, since its errors would
compound along the recurrence.
Numerics: no exponential exceeds 1, however strong the decay. Decays between tokens enter as
exp(G_i - G_j) with i >= j, masked before the exp, or, per key across sub-blocks of a long chunk,
factored around a reference token between j and i (`tile_math.pair_products`); the state's reads and
writes take exp(G_i) and exp(G_C - G_i), both <= 1. Never exp(-G) from the chunk start.
"""

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels.chunked import Gates, segment_masks
from seqmix.pallas_kernels.delta import algebra
from seqmix.pallas_kernels.tile_math import (
    as_row, cumulative_gates, decay_to_chunk_end, eye, masked_sums, matmul_nt, pair_products, strictly_causal,
)


def _decayed_products(q, k, gates, groups, earlier, matmul_dtype):
    """(key_products [C, C]: sum_d k_id k_jd exp(G_id - G_jd) for j < i; query_products [C, C]: the
    same of q_i and k_j for j < i, and q_i.k_i for j = i), in one segment, 0 elsewhere, float32.
    gates G [C, W]; earlier [C, C] bool: j < i in one segment. A decay per head (W = 1) is one
    [C, C] decay matrix on q k^T and k k^T (matmuls in matmul_dtype); a decay per key (W = K) goes by
    `tile_math.pair_products`, its key products' diagonal dropped."""
    if gates.shape[1] == 1:
        # The diagonal's 1 is no exp(G_i - G_i), so the backward pass sends nothing through it.
        decay = jnp.exp(jnp.where(earlier, gates - as_row(gates), -jnp.inf))
        return (decay * matmul_nt(k, k, matmul_dtype),
                jnp.where(eye(q.shape[0]), 1.0, decay) * matmul_nt(q, k, matmul_dtype))
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    (keys,), (queries,) = pair_products([k32, q32], [k32], gates, groups)
    return jnp.where(eye(q.shape[0]), 0.0, keys), queries


def _gates(log_gate):
    """`chunked.Gates` of one chunk's log_gate [C, W] float32, summed by masked sums (no scans)."""
    return Gates(to_here=cumulative_gates(log_gate), to_end=decay_to_chunk_end(log_gate),
                 total=jnp.sum(log_gate, axis=0, keepdims=True))


def chunk_forward(q, k, v, beta, log_gate, groups, state, matmul_dtype):
    """One chunk, after the previous one: (o [C, V] float32, state leaving the chunk [V, K] float32)."""
    gates, masks = _gates(log_gate), segment_masks(groups)
    products = _decayed_products(q, k, gates.to_here, groups, masks.earlier, matmul_dtype)
    terms = algebra.terms(q, k, v, beta, gates, masks, products)
    written, state_out = algebra.step(terms.carry, state)
    return algebra.output(terms, written, state), state_out


def chunk_backward(q, k, v, beta, log_gate, groups, state, d_out, d_state_out, matmul_dtype):
    """Cotangents (dq, dk, dv, dbeta, dlog_gate, d_state entering the chunk) of `chunk_forward`, from
    d_out [C, V] and d_state_out [V, K] float32, recomputing the chunk's forward terms."""
    del matmul_dtype  # The products are recomputed in float32 (below); the rest is float32 anyway.
    size = q.shape[0]
    gates, masks = _gates(log_gate), segment_masks(groups)
    # Float32 products of the (bfloat16-exact) inputs equal the forward's bfloat16 matmuls, and keep
    # their transposed matmuls, dq and dk, at full precision like the rest of this pass.
    products, pullback = jax.vjp(
        lambda q, k, to_here: _decayed_products(q, k, to_here, groups, masks.earlier, jnp.float32),
        q.astype(jnp.float32), k.astype(jnp.float32), gates.to_here)
    terms = algebra.terms(q, k, v, beta, gates, masks, products)
    written = algebra.written(terms.carry, state)
    d_written, d_state = algebra.step_backward(terms.carry, *algebra.output_backward(terms, d_out), d_state_out)
    dq, dk, dv, d_beta, d_gates = algebra.local_backward(
        q, k, v, beta, terms, lambda d_key, d_query: pullback((d_key, d_query)), state, written, d_out, d_written,
        d_state_out)
    # G_i sums log_gate_s for s <= i, E_j for s > j; the chunk total all of them.
    d_log_gate = (masked_sums(d_gates.to_here, ~strictly_causal(size))
                  + masked_sums(d_gates.to_end, strictly_causal(size)) + d_gates.total)
    return dq, dk, dv, d_beta, d_log_gate, d_state

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
factored around a reference token between j and i (`_per_key_products`); the state's reads and
writes take exp(G_i) and exp(G_C - G_i), both <= 1. Never exp(-G) from the chunk start.
"""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.chunked import Gates, segment_masks
from seqmix.pallas_kernels.delta import algebra
from seqmix.pallas_kernels.tile_math import (
    SUB_BLOCK, as_row, cumulative_gates, decay_to_chunk_end, decayed_products, eye, masked_sums, matmul,
    matmul_nt, pairwise_decays, self_products, strictly_causal,
)


def _per_key_products(q, k, gates, groups):
    """`_decayed_products` for a decay per key: q, k [C, K] float32, gates G [C, K].

    A chunk of one sub-block (C <= SUB_BLOCK, the GPU kernel's) is one elementwise [C, C, K] block
    (`tile_math.pairwise_decays`), without slices, which the Triton lowering cannot take. A longer
    chunk goes by sub-blocks of SUB_BLOCK rows (sublane slices): against their own columns
    elementwise; against the earlier tokens j < s, s the sub-block's first token, as one matmul
    factored around G_ref = G_{s-1}, so that exp(G_i - G_ref) and exp(G_ref - G_j) are both <= 1.
    The product does not depend on G_ref, so G_ref takes no gradient (`stop_gradient`): it would
    only be two cancelling terms. A sub-block's own [c, c] block reaches its columns of the [c, C]
    row through a 0/1 matmul, exact, rather than a concatenation along the lanes. The key and query
    products share the exponentials.
    """
    size = q.shape[0]

    def own_block(q, k, gates, groups):
        decays = pairwise_decays(gates, strictly_causal(groups.shape[0]) & (groups == as_row(groups)))
        return decayed_products(k, k, decays), decayed_products(q, k, decays) + self_products(q, k)

    if size <= SUB_BLOCK:
        return own_block(q, k, gates, groups)
    token = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    key_rows, query_rows = [], []
    for start in range(0, size, SUB_BLOCK):
        rows = slice(start, min(start + SUB_BLOCK, size))
        width = rows.stop - start
        placement = (lax.broadcasted_iota(jnp.int32, (width, size), 1)
                     == lax.broadcasted_iota(jnp.int32, (width, size), 0) + start).astype(jnp.float32)
        keys, queries = (matmul(block, placement) for block in own_block(q[rows], k[rows], gates[rows], groups[rows]))
        if start:
            reference = lax.stop_gradient(gates[start - 1:start])
            to_reference = jnp.exp(gates[rows] - reference)
            before = token < start
            k_earlier = jnp.where(before, k * jnp.exp(jnp.where(before, reference - gates, -jnp.inf)), 0.0)
            same_group = groups[rows] == as_row(groups)
            keys = keys + jnp.where(same_group, matmul_nt(k[rows] * to_reference, k_earlier), 0.0)
            queries = queries + jnp.where(same_group, matmul_nt(q[rows] * to_reference, k_earlier), 0.0)
        key_rows.append(keys)
        query_rows.append(queries)
    return jnp.concatenate(key_rows, axis=0), jnp.concatenate(query_rows, axis=0)


def _decayed_products(q, k, gates, groups, earlier, matmul_dtype):
    """(key_products [C, C]: sum_d k_id k_jd exp(G_id - G_jd) for j < i; query_products [C, C]: the
    same of q_i and k_j for j < i, and q_i.k_i for j = i), in one segment, 0 elsewhere, float32.
    gates G [C, W]; earlier [C, C] bool: j < i in one segment. A decay per head (W = 1) is one
    [C, C] decay matrix on q k^T and k k^T (matmuls in matmul_dtype); a decay per key (W = K) goes by
    `_per_key_products`."""
    if gates.shape[1] == 1:
        # The diagonal's 1 is no exp(G_i - G_i), so the backward pass sends nothing through it.
        decay = jnp.exp(jnp.where(earlier, gates - as_row(gates), -jnp.inf))
        return (decay * matmul_nt(k, k, matmul_dtype),
                jnp.where(eye(q.shape[0]), 1.0, decay) * matmul_nt(q, k, matmul_dtype))
    return _per_key_products(q.astype(jnp.float32), k.astype(jnp.float32), gates, groups)


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

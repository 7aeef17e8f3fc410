"""The per-chunk algebra of the (gated) delta rule, shared by both Pallas kernels.

One chunk of one (batch, head), on 2-D tiles (`tile_math`: no reshapes, transposes or slices of a
tile, no `lax.linalg`), so the same functions trace inside Triton and Mosaic TPU kernel bodies.
It is the math of `delta.xla` for a single chunk (read that module's docstring for the derivation),
with a decay per key (KDA) or one per head (Gated DeltaNet, broadcast over the keys). With G_i the
inclusive sum of log_gate inside the chunk (per key), Gamma_i = exp(G_i), and S the state entering
the chunk:

    (I + L) U = diag(beta) (V - (Gamma * K) S),    L_ij = beta_i sum_d k_id k_jd exp(G_id - G_jd), j < i
    o_t = (Gamma_t * q_t)^T S + sum_{j<=t} (sum_d q_td k_jd exp(G_td - G_jd)) U_j
    S'  = Diag(Gamma_C) S + sum_j (k_j * Gamma_C / Gamma_j) U_j^T

(L only within a segment). U = values - weights S with values = X diag(beta) V and
weights = X diag(beta) (Gamma * K), X = (I + L)^-1 (`triangular.unit_lower_inverse`). The backward pass is
written out (`chunk_backward`), as in `delta.xla`: it reuses X for the transposed solve rather than
differentiating through the inverse's doubling levels; only the decayed products (`_decayed_products`)
are differentiated by `jax.vjp`.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.chunked import to_width
from seqmix.pallas_kernels.tile_math import (
    SUB_BLOCK, as_row, cumulative_gates, decay_to_chunk_end, decayed_products, eye, masked_sums, matmul,
    matmul_nt, matmul_tn, pairwise_decays, self_products, strictly_causal,
)
from seqmix.pallas_kernels.triangular import unit_lower_inverse


def _row_sums(x):
    """[C, D] -> [C, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


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


def _decayed_products(q, k, gates, groups, matmul_dtype):
    """(key_products [C, C]: sum_d k_id k_jd exp(G_id - G_jd) for j < i; query_products [C, C]: the
    same of q_i and k_j for j < i, and q_i.k_i for j = i), in one segment, 0 elsewhere, float32.
    gates G [C, W]: a decay per head (W = 1) is one [C, C] decay matrix on q k^T and k k^T (matmuls
    in matmul_dtype); a decay per key (W = K) goes by `_per_key_products`."""
    size = q.shape[0]
    if gates.shape[1] == 1:
        earlier = strictly_causal(size) & (groups == as_row(groups))
        # The diagonal's 1 is no exp(G_i - G_i), so the backward pass sends nothing through it.
        decay = jnp.exp(jnp.where(earlier, gates - as_row(gates), -jnp.inf))
        return (decay * matmul_nt(k, k, matmul_dtype),
                jnp.where(eye(size), 1.0, decay) * matmul_nt(q, k, matmul_dtype))
    return _per_key_products(q.astype(jnp.float32), k.astype(jnp.float32), gates, groups)


class _Terms(NamedTuple):
    """A chunk's terms (float32 but for the bool masks). to_end E [C,W]: log decay from token j
    (exclusive) to the chunk end; reads_state, writes_state [C,1]: the token's segment continues the
    carried state, or is still open at the chunk end; earlier [C,C]: j < i in the same segment;
    key_products, query_products [C,C] (`_decayed_products`); inverse X = (I + L)^-1 [C,C];
    values [C,V] and weights [C,K] (the solved system); k_read, q_read [C,K]: exp(G_i) * k_i and
    exp(G_i) * q_i for tokens reading the carried state; k_written [C,K]: exp(E_j) * k_j for tokens
    writing into the state the chunk passes on; chunk_decay [1,W]: exp(G_C) if the carried state
    survives the chunk, else 0."""

    to_end: jax.Array
    earlier: jax.Array
    reads_state: jax.Array
    writes_state: jax.Array
    key_products: jax.Array
    query_products: jax.Array
    inverse: jax.Array
    values: jax.Array
    weights: jax.Array
    k_read: jax.Array
    q_read: jax.Array
    k_written: jax.Array
    chunk_decay: jax.Array


def _terms(q, k, v, beta, log_gate, gates, groups, products) -> _Terms:
    """gates: G = cumulative_gates(log_gate) [C, W]; products: `_decayed_products` of them."""
    key_products, query_products = products
    size = q.shape[0]
    to_end = decay_to_chunk_end(log_gate)
    earlier = strictly_causal(size) & (groups == as_row(groups))
    last_group = jnp.max(groups, axis=0, keepdims=True)  # groups never decrease along a row
    reads_state, writes_state = groups == 0, groups == last_group
    inverse = unit_lower_inverse(beta * key_products)
    k32, q32 = k.astype(jnp.float32), q.astype(jnp.float32)
    k_read = jnp.where(reads_state, jnp.exp(gates) * k32, 0.0)
    chunk_total = jnp.sum(log_gate, axis=0, keepdims=True)
    return _Terms(
        to_end=to_end, earlier=earlier, reads_state=reads_state, writes_state=writes_state,
        key_products=key_products, query_products=query_products, inverse=inverse,
        values=matmul(inverse, beta * v.astype(jnp.float32)), weights=matmul(inverse, beta * k_read),
        k_read=k_read, q_read=jnp.where(reads_state, jnp.exp(gates) * q32, 0.0),
        k_written=jnp.where(writes_state, jnp.exp(to_end) * k32, 0.0),
        chunk_decay=jnp.where(last_group == 0, jnp.exp(chunk_total), 0.0),
    )


def _written(terms, state):
    """U [C, V]: the values the chunk's tokens write, given the state [V, K] entering it."""
    return terms.values - matmul_nt(terms.weights, state)


def chunk_forward(q, k, v, beta, log_gate, groups, state, matmul_dtype):
    """One chunk, after the previous one: (o [C, V] float32, state leaving the chunk [V, K] float32)."""
    gates = cumulative_gates(log_gate)
    terms = _terms(q, k, v, beta, log_gate, gates, groups, _decayed_products(q, k, gates, groups, matmul_dtype))
    written = _written(terms, state)
    out = matmul(terms.query_products, written) + matmul_nt(terms.q_read, state)
    return out, terms.chunk_decay * state + matmul_tn(written, terms.k_written)


def chunk_backward(q, k, v, beta, log_gate, groups, state, d_out, d_state_out, matmul_dtype):
    """Cotangents (dq, dk, dv, dbeta, dlog_gate, d_state entering the chunk) of `chunk_forward`, from
    d_out [C, V] and d_state_out [V, K] float32, recomputing the chunk's forward terms."""
    del matmul_dtype  # The products are recomputed in float32 (below); the rest is float32 anyway.
    size, width = q.shape[0], log_gate.shape[1]
    q32, k32, v32 = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    gates = cumulative_gates(log_gate)
    # Float32 products of the (bfloat16-exact) inputs equal the forward's bfloat16 matmuls, and keep
    # their transposed matmuls, dq and dk, at full precision like the rest of this pass.
    products, products_pullback = jax.vjp(
        lambda q, k, gates: _decayed_products(q, k, gates, groups, jnp.float32), q32, k32, gates)
    terms = _terms(q, k, v, beta, log_gate, gates, groups, products)
    written = _written(terms, state)

    # Through the state: U = values - weights S^T, o = P U + q_read S^T, S' = decay S + U^T k_written.
    d_written = matmul_tn(terms.query_products, d_out) + matmul_nt(terms.k_written, d_state_out)
    d_state = (terms.chunk_decay * d_state_out + matmul_tn(d_out, terms.q_read)
               - matmul_tn(d_written, terms.weights))
    d_q_read = matmul(d_out, state)
    d_k_written = matmul(written, d_state_out)

    # Through the solve: [values | weights] = X [beta v | beta k_read], so d[beta v | beta k_read] =
    # X^T d[values | weights] and d(I + L) = -X^T d[values | weights] [values | weights]^T.
    d_weights = -matmul(d_written, state)
    d_beta_v = matmul_tn(terms.inverse, d_written)
    d_beta_k_read = matmul_tn(terms.inverse, d_weights)
    d_lower = jnp.where(terms.earlier,
                        -(matmul_nt(d_beta_v, terms.values) + matmul_nt(d_beta_k_read, terms.weights)), 0.0)
    d_k_read = beta * d_beta_k_read

    # L_ij = beta_i A_ij and the scores P_ij, A and P the decayed key and query products.
    d_beta = (_row_sums(d_beta_v * v32) + _row_sums(d_beta_k_read * terms.k_read)
              + _row_sums(d_lower * terms.key_products))
    d_query_products = jnp.where(terms.earlier | eye(size), matmul_nt(d_out, written), 0.0)
    dq, dk, d_gates = products_pullback((d_lower * beta, d_query_products))
    d_gates = d_gates + to_width(d_q_read * terms.q_read + d_k_read * terms.k_read, width)
    d_to_end = to_width(d_k_written * terms.k_written, width)
    d_chunk_total = to_width(jnp.sum(d_state_out * state, axis=0, keepdims=True), width)
    # G_i sums log_gate_s for s <= i, E_j for s > j; the chunk total all of them.
    d_log_gate = (masked_sums(d_gates, ~strictly_causal(size)) + masked_sums(d_to_end, strictly_causal(size))
                  + d_chunk_total * terms.chunk_decay)

    exp_gates = jnp.exp(gates)
    dq = dq + jnp.where(terms.reads_state, exp_gates * d_q_read, 0.0)
    dk = (dk + jnp.where(terms.reads_state, exp_gates * d_k_read, 0.0)
          + jnp.where(terms.writes_state, jnp.exp(terms.to_end) * d_k_written, 0.0))
    return dq, dk, beta * d_beta_v, d_beta, d_log_gate, d_state

"""The per-chunk algebra of the (gated) delta rule, shared by both Pallas kernels.

One chunk of one (batch, head), on 2-D tiles (`tile_math`: no reshapes, transposes or slices of a
tile, no `lax.linalg`), so the same functions trace inside Triton and Mosaic TPU kernel bodies.
It is the math of `delta.xla` for a single chunk (read that module's docstring for the derivation):
with G_i the inclusive sum of log_a inside the chunk and S the state entering it,

    (I + L) U = diag(beta) (V - exp(G) K S),   L_ij = beta_i exp(G_i - G_j) (k_i.k_j), j < i
    o_t = exp(G_t) S^T q_t + sum_{j<=t} exp(G_t - G_j) (q_t.k_j) U_j
    S'  = exp(G_C) S + sum_j exp(G_C - G_j) k_j U_j^T

(L only within a segment). U = values - weights S with values = X diag(beta) V and
weights = X diag(beta) exp(G) K, X = (I + L)^-1 (`unit_lower_inverse`). The backward pass is written
out (`chunk_backward`), as in `delta.xla`: it reuses X for the transposed solve rather than
differentiating through the inverse's doubling levels.

Shapes (C = chunk length):
  q, k [C, K] (q already scaled) and v [C, V], in the inputs' dtype (bfloat16 or float32);
  beta, log_a [C, 1] float32; groups [C, 1] int32: reset group relative to the state entering the
  chunk (0 = same segment); state [V, K] float32, value-major (the transpose of the public [K, V])
  like the GLA kernels' state, so both families share `layout` and the kernel sweeps.
Precision: with bfloat16 inputs, only products of two input tiles (q k^T, k k^T) run as bfloat16
matmuls, which are exact products accumulated in float32; everything touching the triangular
inverse or the state is a float32 matmul at full precision, since its errors would compound along
the recurrence. Decays only enter as exp(G_i - G_j) with i >= j, masked before the exp: no
exponential exceeds 1, however strong the decay.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.tile_math import (
    as_column, as_row, cumulative_gates, decay_to_chunk_end, eye, masked_sums, matmul, matmul_nt, matmul_tn,
    strictly_causal,
)


def unit_lower_inverse(lower):
    """(I + L)^-1 for a strictly lower-triangular L [C, C] float32, by block doubling.

    X_1 = I inverts the 1x1 diagonal blocks; given X_b, the inverse of every aligned b-block on the
    diagonal, X_2b = X_b - X_b O_b X_b inverts the aligned 2b-blocks, where O_b keeps L's entries in
    the lower off-diagonal b-block of each 2b-block (block row 2m+1, block column 2m): for a 2b-block
    [[A, 0], [O, B]] the inverse is [[A^-1, 0], [-B^-1 O A^-1, B^-1]]. Exact in ceil(log2 C) levels
    of full-tile matmuls with masks, for any C (a last, partial 2b-block works alike). Each level
    multiplies exact inverses of smaller diagonal blocks, never powers of L: the Neumann series
    sum_n (-L)^n, with entries of L up to 2 (beta near 2), overflows float32.
    """
    size = lower.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    inverse = eye(size).astype(jnp.float32)
    level = 0
    while (1 << level) < size:
        row_block, col_block = rows >> level, cols >> level  # block indices at block size b = 2^level
        coupling = jnp.where((row_block == col_block + 1) & ((row_block & 1) == 1), lower, 0.0)
        inverse = inverse - matmul(matmul(inverse, coupling), inverse)
        level += 1
    return inverse


def _row_sums(x):
    """[C, D] -> [C, 1]."""
    return jnp.sum(x, axis=1, keepdims=True)


class _Terms(NamedTuple):
    """A chunk's terms (float32 but for the bool masks). gates G [C,1]: log decay from the chunk start
    to token i, inclusive; to_end E [C,1]: from token j (exclusive) to the chunk end; reads_state,
    writes_state [C,1]: the token's segment continues the carried state, or is still open at the
    chunk end; earlier [C,C]: j < i in the same segment; decay [C,C]: exp(G_i - G_j) on `earlier`,
    1 on the diagonal, 0 elsewhere; key_products k_i.k_j and query_products q_i.k_j [C,C]; inverse
    X = (I + L)^-1 [C,C]; values [C,V] and weights [C,K] (the solved system); k_read, q_read [C,K]:
    exp(G_i) k_i and exp(G_i) q_i for tokens reading the carried state; k_written [C,K]:
    exp(E_j) k_j for tokens writing into the state the chunk passes on; chunk_decay [1,1]: exp(G_C)
    if the carried state survives the chunk, else 0."""

    gates: jax.Array
    to_end: jax.Array
    earlier: jax.Array
    reads_state: jax.Array
    writes_state: jax.Array
    decay: jax.Array
    key_products: jax.Array
    query_products: jax.Array
    inverse: jax.Array
    values: jax.Array
    weights: jax.Array
    k_read: jax.Array
    q_read: jax.Array
    k_written: jax.Array
    chunk_decay: jax.Array


def _terms(q, k, v, beta, log_a, groups, matmul_dtype) -> _Terms:
    size = q.shape[0]
    gates, to_end = cumulative_gates(log_a), decay_to_chunk_end(log_a)
    earlier = strictly_causal(size) & (groups == as_row(groups))
    last_group = jnp.max(groups, axis=0, keepdims=True)  # groups never decrease along a row
    reads_state, writes_state = groups == 0, groups == last_group
    # Masked before the exp: every exponential is <= 1. The diagonal's 1 is no exp(G_i - G_i), so
    # the backward pass sends nothing through it (its +x and -x on G_i would only add rounding noise).
    decay = jnp.where(eye(size), 1.0, jnp.exp(jnp.where(earlier, gates - as_row(gates), -jnp.inf)))
    key_products = matmul_nt(k, k, matmul_dtype)
    inverse = unit_lower_inverse(jnp.where(earlier, beta * decay * key_products, 0.0))
    k32, q32 = k.astype(jnp.float32), q.astype(jnp.float32)
    k_read = jnp.where(reads_state, jnp.exp(gates) * k32, 0.0)
    chunk_total = jnp.sum(log_a, axis=0, keepdims=True)
    return _Terms(
        gates=gates, to_end=to_end, earlier=earlier, reads_state=reads_state, writes_state=writes_state,
        decay=decay, key_products=key_products, query_products=matmul_nt(q, k, matmul_dtype), inverse=inverse,
        values=matmul(inverse, beta * v.astype(jnp.float32)), weights=matmul(inverse, beta * k_read),
        k_read=k_read, q_read=jnp.where(reads_state, jnp.exp(gates) * q32, 0.0),
        k_written=jnp.where(writes_state, jnp.exp(to_end) * k32, 0.0),
        chunk_decay=jnp.where(last_group == 0, jnp.exp(chunk_total), 0.0),
    )


def _scores(terms):
    """exp(G_i - G_j) (q_i.k_j) for j <= i in the same segment, [C, C]."""
    return jnp.where(terms.earlier | eye(terms.earlier.shape[0]), terms.decay * terms.query_products, 0.0)


def _written(terms, state):
    """U [C, V]: the values the chunk's tokens write, given the state [V, K] entering it."""
    return terms.values - matmul_nt(terms.weights, state)


def chunk_forward(q, k, v, beta, log_a, groups, state, matmul_dtype):
    """One chunk, after the previous one: (o [C, V] float32, state leaving the chunk [V, K] float32)."""
    terms = _terms(q, k, v, beta, log_a, groups, matmul_dtype)
    written = _written(terms, state)
    out = matmul(_scores(terms), written) + matmul_nt(terms.q_read, state)
    return out, terms.chunk_decay * state + matmul_tn(written, terms.k_written)


def chunk_backward(q, k, v, beta, log_a, groups, state, d_out, d_state_out, matmul_dtype):
    """Cotangents (dq, dk, dv, dbeta, dlog_a, d_state entering the chunk) of `chunk_forward`, from
    d_out [C, V] and d_state_out [V, K] float32, recomputing the chunk's forward terms."""
    terms = _terms(q, k, v, beta, log_a, groups, matmul_dtype)
    size = q.shape[0]
    written = _written(terms, state)
    q32, k32, v32 = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)

    # Through the state: U = values - weights S^T, o = P U + q_read S^T, S' = decay S + U^T k_written.
    d_written = matmul_tn(_scores(terms), d_out) + matmul_nt(terms.k_written, d_state_out)
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

    # L_ij = beta_i D_ij (k_i.k_j) and the scores P_ij = D_ij (q_i.k_j), D the decays.
    d_beta = (_row_sums(d_beta_v * v32) + _row_sums(d_beta_k_read * terms.k_read)
              + _row_sums(d_lower * terms.decay * terms.key_products))
    d_key_products = d_lower * beta * terms.decay
    d_scores = matmul_nt(d_out, written)
    d_query_products = jnp.where(terms.earlier | eye(size), d_scores * terms.decay, 0.0)
    # d exponent of D_ij = exp(G_i - G_j): +G_i (row sums), -G_j (column sums).
    d_exponent = jnp.where(terms.earlier, (d_lower * beta * terms.key_products + d_scores * terms.query_products)
                           * terms.decay, 0.0)
    d_gates = (_row_sums(d_exponent) - as_column(jnp.sum(d_exponent, axis=0, keepdims=True))
               + _row_sums(d_q_read * terms.q_read) + _row_sums(d_k_read * terms.k_read))
    d_to_end = _row_sums(d_k_written * terms.k_written)
    d_chunk_total = jnp.sum(_row_sums(d_state_out * state), axis=0, keepdims=True)
    # G_i sums log_a_s for s <= i, E_j for s > j; the chunk total all of them.
    d_log_a = (masked_sums(d_gates, ~strictly_causal(size)) + masked_sums(d_to_end, strictly_causal(size))
               + d_chunk_total * terms.chunk_decay)

    exp_gates = jnp.exp(terms.gates)
    dq = matmul(d_query_products, k32) + jnp.where(terms.reads_state, exp_gates * d_q_read, 0.0)
    dk = (matmul(d_key_products, k32) + matmul_tn(d_key_products, k32) + matmul_tn(d_query_products, q32)
          + jnp.where(terms.reads_state, exp_gates * d_k_read, 0.0)
          + jnp.where(terms.writes_state, jnp.exp(terms.to_end) * d_k_written, 0.0))
    return dq, dk, beta * d_beta_v, d_beta, d_log_a, d_state

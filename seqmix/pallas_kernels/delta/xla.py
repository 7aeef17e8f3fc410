"""The (gated) delta rule, chunked in plain jnp (differentiated by JAX).

Per chunk, with G_i the inclusive sum of log_a inside the chunk and S the state entering it, the
value token t writes is U_t = beta_t (v_t - a_t S_{t-1}^T k_t). Unrolled inside the chunk:

    U_t + beta_t sum_{j<t} exp(G_t - G_j) (k_t.k_j) U_j = beta_t (v_t - exp(G_t) S^T k_t)

a unit lower-triangular system (I + diag(beta) M) U = diag(beta) (V - exp(G) K S), the UT/WY
form of the product of Householder-like factors. Solved once per chunk for [V | exp(G) K], it
gives U = values - weights @ S with S left open; then

    o_t = exp(G_t) S^T q_t + sum_{j<=t} exp(G_t - G_j) (q_t.k_j) U_j
    S'  = exp(G_C) S + sum_j exp(G_C - G_j) k_j U_j^T

Everything but the carry of S is batched over all chunks; the sequential part is two [C,K]-by-
[K,V] products per chunk. The triangular solve is forward substitution (LAPACK trsm on CPU), in
float32; never the Neumann series of M, whose powers overflow. Segments cut M, the reads of S and
the writes into S' exactly as in the GLA family (`chunked.segment_masks`).
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.segments import padded_groups, reset_groups, zero_padded


def delta_xla(q, k, v, beta, *, log_a, scale, initial_state, segment_ids, chunk_size):
    batch, length, heads, key_dim = q.shape
    value_dim, out_dtype = v.shape[-1], q.dtype
    padded = length + (-length % chunk_size)
    valid, groups = reset_groups(segment_ids, batch, length)

    def chunks(x, dtype=jnp.float32):  # [B,T,H,D] -> [N,B,H,C,D], zero at padding
        return chunked.chunk_major(zero_padded(x, valid, padded, dtype), chunk_size)

    q, k, v = chunks(q.astype(jnp.float32) * scale), chunks(k), chunks(v)
    beta, log_a = chunks(beta[..., None]), chunks(log_a[..., None])
    masks = chunked.segment_masks(chunked.chunk_major(padded_groups(groups, padded, chunk_size)[..., None], chunk_size))

    # Decays as sums of log_a, masked before the exp: every exponential is <= 1. The diagonal's
    # exp(G_t - G_t) = 1 stays out of the graph: its gradient, +x and -x through G_t, leaves
    # rounding noise larger than the true d log_a under strong decay.
    to_here = chunked.prefix_sums(log_a)
    to_end = chunked.shift(chunked.prefix_sums(log_a, reverse=True), -1)
    total = jnp.sum(log_a, axis=chunked.CHUNK_AXIS, keepdims=True)
    up_to = masks.earlier | chunked.eye(chunk_size)
    decay = jnp.where(chunked.eye(chunk_size), 1.0,
                      jnp.exp(jnp.where(masks.earlier, to_here - jnp.swapaxes(to_here, -1, -2), -jnp.inf)))

    system = jnp.where(masks.earlier, beta * decay * chunked.mm_nt(k, k), 0.0) + chunked.eye(chunk_size)
    reading_keys = jnp.where(masks.reads_state, jnp.exp(to_here) * k, 0.0)
    solved = lax.linalg.triangular_solve(system, beta * jnp.concatenate([v, reading_keys], axis=-1),
                                         left_side=True, lower=True, unit_diagonal=True)
    values, weights = solved[..., :value_dim], solved[..., value_dim:]
    k_written = jnp.where(masks.writes_state, jnp.exp(to_end) * k, 0.0)
    chunk_decay = jnp.where(masks.keeps_state, jnp.exp(total), 0.0)

    def step(state, chunk):
        values, weights, k_written, chunk_decay = chunk
        written = values - chunked.mm(weights, state)
        return chunk_decay * state + chunked.mm_tn(k_written, written), (state, written)

    state0 = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    final, (incoming, written) = lax.scan(step, state0, (values, weights, k_written, chunk_decay))
    scores = jnp.where(up_to, decay * chunked.mm_nt(q, k), 0.0)
    q_read = jnp.where(masks.reads_state, jnp.exp(to_here) * q, 0.0)
    out = chunked.mm(scores, written) + chunked.mm(q_read, incoming)
    return chunked.time_major(out)[:, :length].astype(out_dtype), final

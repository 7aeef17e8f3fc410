"""The (gated) delta rule, chunked in plain jnp, with its backward pass written out.

Per chunk, with G_i the inclusive sum of the log decays inside the chunk (a scalar per head, or a
vector over the keys for KDA's per-key gate; products and exponentials below are then per key) and
S the state entering it, the value token t writes is U_t = beta_t (v_t - S'_t^T k_t), with S'_t the
decayed state before token t. Unrolled inside the chunk:

    U_t + beta_t sum_{j<t} (exp(G_t - G_j) k_t).k_j U_j = beta_t (v_t - S^T (exp(G_t) k_t))

a unit lower-triangular system (I + diag(beta) M) U = diag(beta) (V - exp(G) K S), the UT/WY
form of the product of Householder-like factors. Solved once per chunk for [V | exp(G) K], it
gives U = values - weights @ S with S left open; then

    o_t = S^T (exp(G_t) q_t) + sum_{j<=t} (exp(G_t - G_j) q_t).k_j U_j
    S'  = exp(G_C) S + sum_j (exp(G_C - G_j) k_j) U_j^T

M and the output's score matrix are the decayed products of keys and queries with the keys: one
[C, C] decay matrix times k k^T and q k^T for a per-head gate, `per_key_decay.products` for a
per-key one. Everything but the carry of S is batched over a block's chunks (the sequence is swept
in blocks, `chunked.sweep_forward`); the sequential part is two [C,K]-by-[K,V] products per chunk.
The system is solved through its inverse, built by block doubling (`triangular.unit_lower_inverse`) in
float32, never by the Neumann series of M, whose powers overflow; the backward pass multiplies by
its transpose. Against LAPACK's trsm (one call per matrix, column-major operands that force layout
copies around it) this halved the fwd+bwd time at T = 4k, and it keeps the pass in XLA's own ops:
the threaded trsm ran 20x slower whenever another process held one of the cores. The forward pass
keeps only the state entering each chunk; the backward pass recomputes the rest.
Segments cut M, the reads of S and the writes into S' as in the GLA family
(`chunked.segment_masks`). Arrays are chunk-major (see `chunked`): q, k [N,B,H,C,K], v [N,B,H,C,V],
beta [N,B,H,C,1], log_gate [N,B,H,C,W] (W = 1 per head, K per key), groups [N,B,1,C,1], states
[B,H,K,V], all float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked, per_key_decay
from seqmix.pallas_kernels.tile_math import eye
from seqmix.pallas_kernels.triangular import unit_lower_inverse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Terms:
    """A chunk's precomputed terms, chunk-major ([N,B,H,...]): key_scores [C,C], the decayed key
    products exp(G_i - G_j) (k_i.k_j) for j < i in one segment (0 elsewhere, so that the system
    is I + diag(beta) key_scores); query_scores [C,C], the same of (q_i.k_j) for j <= i; inverse
    (I + L)^-1 [C,C]; k_read [C,K] (keys whose prediction reads the carried state, exp(G_i) k_i);
    solved = [values | weights] [C,V+K]; q_read [C,K] (queries reading the carried state,
    exp(G_i) q_i); k_written [C,K] (keys written into it, exp(E_j) k_j); chunk_decay [1,W].
    With a per-head gate (W = 1), also decay exp(G_i - G_j) [C,C] (1 on the diagonal, 0 above it and
    across segments) and strict, the same with 0 on the diagonal: multiplying by them also applies
    the masks (materialised once: the masks rebuilt from the segment groups inside every consumer
    cost 15% of the fwd+bwd time). A per-key gate (W = K) has no such matrix (`per_key_decay`)."""

    gates: chunked.Gates
    masks: chunked.SegmentMasks
    decay: jax.Array | None
    strict: jax.Array | None
    key_scores: jax.Array
    query_scores: jax.Array
    inverse: jax.Array
    k_read: jax.Array
    solved: jax.Array
    q_read: jax.Array
    k_written: jax.Array
    chunk_decay: jax.Array


def _terms(q, k, v, beta, log_gate, groups) -> _Terms:
    gates, masks = chunked.gates(log_gate), chunked.segment_masks(groups)
    size = q.shape[chunked.CHUNK_AXIS]
    if log_gate.shape[-1] == 1:
        decay = chunked.head_decay(gates.to_here, masks.earlier)
        strict = lax.optimization_barrier(decay - eye(size))
        key_scores, query_scores = strict * chunked.mm_nt(k, k), decay * chunked.mm_nt(q, k)
    else:
        decay = strict = None
        (key_scores,), (query_scores,) = per_key_decay.products((k, q), (k,), gates.to_here, masks.earlier)
        key_scores = jnp.where(eye(size), 0.0, key_scores)
    inverse = unit_lower_inverse(beta * key_scores)
    k_read = jnp.where(masks.reads_state, jnp.exp(gates.to_here) * k, 0.0)
    solved = chunked.mm(inverse, beta * jnp.concatenate([v, k_read], axis=-1))
    return _Terms(
        gates=gates, masks=masks, decay=decay, strict=strict, key_scores=key_scores, query_scores=query_scores,
        inverse=inverse, k_read=k_read, solved=solved,
        q_read=jnp.where(masks.reads_state, jnp.exp(gates.to_here) * q, 0.0),
        k_written=jnp.where(masks.writes_state, jnp.exp(gates.to_end) * k, 0.0),
        chunk_decay=jnp.where(masks.keeps_state, jnp.exp(gates.total), 0.0),
    )


def _forward(q, k, v, beta, log_gate, groups, state0):
    """Chunk-major float32 inputs -> (out [N,B,H,C,V], final state, the state entering each chunk
    [N,B,H,K,V])."""
    terms = _terms(q, k, v, beta, log_gate, groups)
    value_dim = v.shape[-1]

    def step(state, chunk):
        solved, k_written, chunk_decay = chunk
        written = solved[..., :value_dim] - chunked.mm(solved[..., value_dim:], state)
        return chunk_decay * state + chunked.mm_tn(k_written, written), (state, written)

    final, (incoming, written) = lax.scan(step, state0,
                                          (terms.solved, terms.k_written, chunked.as_row_scale(terms.chunk_decay)))
    out = chunked.mm(terms.query_scores, written) + chunked.mm(terms.q_read, incoming)
    return out, final, incoming


def _scores_backward(terms, q, k, d_key_scores, d_query_scores):
    """(dq, dk, d_to_here) through key_scores and query_scores, given their cotangents (unmasked)."""
    if terms.decay is None:
        d_key_scores = jnp.where(eye(q.shape[chunked.CHUNK_AXIS]), 0.0, d_key_scores)  # no diagonal
        (dk_by_rows, dq), (dk_by_columns,), d_to_here = per_key_decay.products_backward(
            (k, q), (k,), terms.gates.to_here, terms.masks.earlier, ((d_key_scores,), (d_query_scores,)))
        return dq, dk_by_rows + dk_by_columns, d_to_here
    # Per head: key_scores = strict (k_i.k_j) and query_scores = decay (q_i.k_j), the decays
    # exp(G_i - G_j) [C,C] with G_i's cotangent the row sums, G_j's minus the column sums.
    d_key_products = d_key_scores * terms.strict
    d_query_products = d_query_scores * terms.decay
    off_diagonal = jnp.where(eye(q.shape[chunked.CHUNK_AXIS]), 0.0, terms.query_scores)
    d_exponent = d_key_scores * terms.key_scores + d_query_scores * off_diagonal
    d_to_here = (jnp.sum(d_exponent, axis=-1) - jnp.sum(d_exponent, axis=-2))[..., None]
    dq = chunked.mm(d_query_products, k)
    dk = chunked.mm(d_key_products + jnp.swapaxes(d_key_products, -1, -2), k) + chunked.mm_tn(d_query_products, q)
    return dq, dk, d_to_here


def _backward(q, k, v, beta, log_gate, groups, incoming, d_out, d_final):
    """Chunk-major cotangents of `_forward`'s inputs (and of the incoming state) from those of its
    outputs, given the state entering each chunk."""
    terms = _terms(q, k, v, beta, log_gate, groups)
    masks, value_dim, width = terms.masks, v.shape[-1], log_gate.shape[-1]
    weights = terms.solved[..., value_dim:]
    written = terms.solved[..., :value_dim] - chunked.mm(weights, incoming)

    # The carried state, backwards: U_n = values_n - weights_n S_n, S_n+1 = decay_n S_n + K_n^T U_n.
    read_back = chunked.mm_tn(terms.q_read, d_out)
    d_written_by_out = chunked.mm_tn(terms.query_scores, d_out)

    def step(d_next, chunk):
        weights, k_written, chunk_decay, read_back, d_written = chunk
        d_written = d_written + chunked.mm(k_written, d_next)
        return chunk_decay * d_next + read_back - chunked.mm_tn(weights, d_written), (d_next, d_written)

    d_state0, (d_outgoing, d_written) = lax.scan(
        step, d_final, (weights, terms.k_written, chunked.as_row_scale(terms.chunk_decay), read_back, d_written_by_out),
        reverse=True)

    # The solve: solved = A^-1 Y with Y = beta [V | k_read]; dY = A^-T d_solved.
    d_solved = jnp.concatenate([d_written, -chunked.mm_nt(d_written, incoming)], axis=-1)
    d_rhs = chunked.mm_tn(terms.inverse, d_solved)
    d_lower = -chunked.mm_nt(d_rhs, terms.solved)
    rhs = jnp.concatenate([v, terms.k_read], axis=-1)
    d_beta = jnp.sum(d_rhs * rhs, axis=-1, keepdims=True) + jnp.sum(d_lower * terms.key_scores, axis=-1,
                                                                     keepdims=True)
    dv = beta * d_rhs[..., :value_dim]
    d_k_read = beta * d_rhs[..., value_dim:]

    # The system is I + diag(beta) key_scores; the output reads query_scores U.
    dq, dk, d_to_here = _scores_backward(terms, q, k, d_lower * beta, chunked.mm_nt(d_out, written))

    dq_read = chunked.mm_nt(d_out, incoming)
    d_k_written = chunked.mm_nt(written, d_outgoing)
    exp_here = jnp.exp(terms.gates.to_here)
    dq = dq + jnp.where(masks.reads_state, exp_here * dq_read, 0.0)
    dk = (dk + jnp.where(masks.reads_state, exp_here * d_k_read, 0.0)
          + jnp.where(masks.writes_state, jnp.exp(terms.gates.to_end) * d_k_written, 0.0))
    d_to_here = d_to_here + chunked.to_width(dq_read * terms.q_read + d_k_read * terms.k_read, width)
    d_decay = chunked.as_row_scale(jnp.sum(d_outgoing * incoming, axis=-1, keepdims=True))  # [N,B,H,1,K]
    d_total = chunked.to_width(d_decay, width) * terms.chunk_decay
    d_log_gate = chunked.gate_cotangent(d_to_here, chunked.to_width(d_k_written * terms.k_written, width), d_total)
    return (dq, dk, dv, d_beta, d_log_gate), d_state0


# The longest chunk this path walks, whatever the call's chunk_size: at T = 4k, fwd+bwd on this
# 2-core CPU (K = V = 64) took 50 / 42 ms at C = 64 / 32 with a per-head gate, and 83 / 66 / 184 ms
# at C = 16 / 32 / 64 with Kimi's per-key gate, whose 32-token halves of a 64-token chunk often
# decay past `per_key_decay`'s limit and take its elementwise path.
LONGEST_CHUNK = 32

_swept = chunked.swept(_forward, _backward, LONGEST_CHUNK)


def delta_xla(q, k, v, beta, *, log_gate, scale, initial_state, segment_ids, chunk_size):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; beta [B,T,Hv]; log_gate [B,T,Hv,W] float32; initial_state
    [B,Hv,K,V] or None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state
    [B,Hv,K,V] float32). Chunks are chunk_size tokens long, at most LONGEST_CHUNK."""
    return _swept(q, k, v, beta[..., None], log_gate, scale=scale, initial_state=initial_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)

"""The per-chunk algebra of the DPLR generalized delta rule, shared by both Pallas kernels.

One chunk of one (batch, value head), on 2-D tiles (`tile_math`: no reshapes or transposes of a
tile, no `lax.linalg`), so the same functions trace inside Triton and Mosaic TPU kernel bodies. It
is the math of `dplr.xla` for a single chunk (read that module's docstring for the derivation):
with G the inclusive sum of log_g inside the chunk (per key), E_j = G_C - G_j and S the state
entering the chunk,

    (I - L_ab) U = A_read S + L_ak V,    U = X L_ak V + X A_read S,    X = (I - L_ab)^-1
    O  = Q_read S + P_qb U + P_qk V
    S' = exp(G_C) S + B_write^T U + K_write^T V

with L_ax[t, j] = (a_t exp(G_{t-1} - G_j)).x_j for j < t and P_qx[t, j] = (q_t exp(G_t - G_j)).x_j
for j <= t, both within a segment. X comes from `triangular.unit_lower_inverse` (block
doubling, never Neumann powers). The backward kernel differentiates `chunk_forward` with
`jax.vjp` (`chunk_backward`), as the GLA kernels do, so both passes share one definition.

Numerics: the four decayed products share the one gate G (`tile_math.pair_products`: an elementwise
[c, c, K] block masked before the exp, and across 16-token sub-blocks of a longer chunk a matmul
factored around the gate of the token before the sub-block): no exponential exceeds 1. P_qx
directly; L_ax as the rows of P'(a_{t+1}, x) moved down by one, so that L's first subdiagonal
a_t.x_{t-1} is P's undecayed diagonal and stays out of the gates' graph (its exp(G_{t-1} - G_{t-1})
would send +u and -u to the gates, rounding noise that swamps their true gradient under strong
decay). Rows move by exact 0/1 matmuls, as tiles cannot be sliced on Triton.

Shapes (C = chunk length): q, k [C, K] (q already scaled) and v [C, V] in the inputs' dtype; a, b,
log_g [C, K] float32; groups [C, 1] int32, the reset group relative to the state entering the chunk
(0 = same segment); state [V, K] float32, value-major (the transpose of the public [K, V]) as in
the other families' kernels. Everything is computed in float32: every product feeds the triangular
solve or the state, whose errors compound along the recurrence.
"""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.tile_math import (
    as_row, cumulative_gates, decay_to_chunk_end, masked_sums, matmul, matmul_nt, matmul_tn, pair_products,
    strictly_causal,
)
from seqmix.pallas_kernels.triangular import unit_lower_inverse


def _row_mover(size: int, step: int):
    """[C, C] 0/1 float32: matmul(mover, x) moves x's rows `step` places later (zeros in)."""
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    return (rows == lax.broadcasted_iota(jnp.int32, (size, size), 1) + step).astype(jnp.float32)


def _decayed_products(q, k, a, b, gates, groups):
    """(L_ab, L_ak) [C, C] (j < t in one segment) and (P_qb, P_qk) [C, C] (j <= t), float32."""
    size = q.shape[0]
    earlier = strictly_causal(size) & (groups == as_row(groups))
    (from_next_ab, from_next_ak), (p_qb, p_qk) = pair_products(
        [matmul(_row_mover(size, -1), a), q], [b, k], gates, groups)
    lower = lambda from_next: jnp.where(earlier, matmul(_row_mover(size, 1), from_next), 0.0)
    return lower(from_next_ab), lower(from_next_ak), p_qb, p_qk


def _forward(q, k, v, a, b, log_g, state, groups):
    size = q.shape[0]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    gates = cumulative_gates(log_g)
    last_group = jnp.max(groups, axis=0, keepdims=True)  # groups never decrease along a row
    reads_state, writes_state = groups == 0, groups == last_group
    l_ab, l_ak, p_qb, p_qk = _decayed_products(q, k, a, b, gates, groups)
    inverse = unit_lower_inverse(-l_ab)
    # A token's a reads the state before its own decay: exp(G_{t-1}), summed directly.
    a_read = jnp.where(reads_state, jnp.exp(masked_sums(log_g, strictly_causal(size))) * a, 0.0)
    q_read = jnp.where(reads_state, jnp.exp(gates) * q, 0.0)
    removed = matmul(inverse, matmul(l_ak, v)) + matmul_nt(matmul(inverse, a_read), state)
    out = matmul_nt(q_read, state) + matmul(p_qb, removed) + matmul(p_qk, v)
    to_end = jnp.where(writes_state, jnp.exp(decay_to_chunk_end(log_g)), 0.0)
    chunk_decay = jnp.where(last_group == 0, jnp.exp(jnp.sum(log_g, axis=0, keepdims=True)), 0.0)
    state = chunk_decay * state + matmul_tn(removed, to_end * b) + matmul_tn(v, to_end * k)
    return out, state


def chunk_forward(q, k, v, a, b, log_g, groups, state, matmul_dtype):
    """One chunk, after the previous one: (o [C, V] float32, state leaving the chunk [V, K] float32).
    matmul_dtype is the sweeps' argument; this family computes in float32 whatever the inputs."""
    del matmul_dtype
    return _forward(q, k, v, a, b, log_g, state, groups)


def chunk_backward(q, k, v, a, b, log_g, groups, state, d_out, d_state_out, matmul_dtype):
    """Cotangents (dq, dk, dv, da, db, dlog_g, d_state entering the chunk) of `chunk_forward`, from
    d_out [C, V] and d_state_out [V, K] float32, recomputing the chunk's forward."""
    del matmul_dtype
    _, pullback = jax.vjp(lambda *inputs: _forward(*inputs, groups), q, k, v, a, b, log_g, state)
    return pullback((d_out, d_state_out))

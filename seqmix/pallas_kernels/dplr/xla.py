"""The DPLR generalized delta rule, chunked in plain jnp, with its backward pass written out.

Derivation (fla's `chunk_dplr`, WY form with the low-rank term). Inside a chunk, let G_t be the
inclusive prefix sum of log_g (a vector over the keys; exponentials and products with it below
act per key), E_j = G_C - G_j the decay from token j to the chunk end, and S the state entering
the chunk. Each token adds a rank-two term: S_t = Diag(exp(log_g_t)) S_{t-1} + b_t u_t^T + k_t v_t^T
with u_t = S_{t-1}^T a_t, the value the low-rank term removes. Unrolled,

    S_t = exp(G_t) S + sum_{j<=t} exp(G_t - G_j) (b_j u_j^T + k_j v_j^T)                     (1)

and reading (1) at t - 1 with a_t gives a unit lower-triangular system for U = [u_1; ...; u_C]:

    u_t - sum_{j<t} (a_t exp(G_{t-1} - G_j)).b_j u_j
        = S^T (exp(G_{t-1}) a_t) + sum_{j<t} (a_t exp(G_{t-1} - G_j)).k_j v_j
    (I - L_ab) U = A_read S + L_ak V,    X = (I - L_ab)^-1,    U = X L_ak V + X A_read S = U_v + W S

with A_read = exp(G_{t-1}) a_t (a token reads the state before its own decay). Then, from (1),

    O   = Q_read S + P_qb U + P_qk V,       Q_read = exp(G_t) q_t,  P_qx[t, j] = (q_t exp(G_t - G_j)).x_j, j <= t
    S'  = exp(G_C) S + B_write^T U + K_write^T V,   B_write = exp(E_j) b_j,  K_write = exp(E_j) k_j
        = M S + c,   M = Diag(exp(G_C)) + B_write^T W,   c = B_write^T U_v + K_write^T V.

The chunk-to-chunk carry is one [K,K]-by-[K,V] product per chunk (M S + c); everything else is
batched over a block's chunks (`chunked.sweep_forward`), and the backward carry is its transpose
(dS = M^T dS' + Q_read^T dO + W^T P_qb^T dO). The system is solved through X, built by block
doubling (`triangular.unit_lower_inverse`, never Neumann powers of L_ab); its backward multiplies
by X^T.

Numerics: the four decayed products L_ab, L_ak, P_qb, P_qk are products of one gate, G, as
`per_key_decay.products` defines them: P_qx directly (its diagonal q_t.x_t undecayed), and
L_ax[t, j] = P'[t-1, j] for the rows shifted by one, P' = products(a_{t+1}, x, G), whose diagonal
a_{t+1}.x_t is L's first subdiagonal, a_t.x_{t-1}, where exp(G_{t-1} - G_{t-1}) = 1 stays out of
the gates' graph. Every exponential is exp(G_i - G_j) with i >= j, factored around the gate at
the middle of the chunk, the factors shared by the four pairs, or exact under decays beyond
(`per_key_decay`; decays of -8 nats per token stay exact). A_read, Q_read, B_write and K_write
decay, never grow.

Segments cut L, the reads of S and the writes into S' (`chunked.segment_masks`). Arrays are
chunk-major (see `chunked`): q, k, a, b, log_g [N,B,H,C,K], v [N,B,H,C,V], groups [N,B,1,C,1],
states [B,H,K,V], all float32. The forward pass keeps only the state entering each chunk; the
backward pass recomputes the rest. On a CPU while the state is small, the forward runs the
recurrence token by token instead, keeping the same chunk states (`_token_scan`, `chunked.swept`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked, per_key_decay
from seqmix.pallas_kernels.dplr.step import recurrence
from seqmix.pallas_kernels.tile_math import eye
from seqmix.pallas_kernels.triangular import unit_lower_inverse

# The longest chunk this path walks, whatever the call's chunk_size: at T = 4k, fwd+bwd on this
# 2-core CPU took 114 / 105 / 118 ms at C = 16 / 32 / 64 for K = V = 64 on RWKV-7's gates. Beyond
# 32 the decayed products and the inverse (O(C) and O(C^2) per token) outgrow what longer chunks
# save on the carry (O(K^2 V / C) per token), and `per_key_decay`'s halves decay past its limit
# sooner.
LONGEST_CHUNK = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Terms:
    """A chunk's precomputed terms, chunk-major ([N,B,H,...]): l_ab, l_ak [C,C] (j < t in one
    segment, 0 elsewhere), p_qb, p_qk [C,C] (j <= t); inverse X = (I - L_ab)^-1 [C,C]; a_read,
    q_read [C,K] (zero for tokens that do not see the carried state); b_written, k_written [C,K]
    (zero for tokens whose segment ends inside the chunk); chunk_decay [1,K]; solved = [U_v | W]
    [C,V+K]; transition M [K,K]."""

    gates: chunked.Gates
    masks: chunked.SegmentMasks
    l_ab: jax.Array
    l_ak: jax.Array
    p_qb: jax.Array
    p_qk: jax.Array
    inverse: jax.Array
    a_read: jax.Array
    q_read: jax.Array
    b_written: jax.Array
    k_written: jax.Array
    chunk_decay: jax.Array
    solved: jax.Array
    transition: jax.Array


def _rows_and_columns(q, k, a, b):
    """The products' operands: rows (a_{t+1}, q), columns (b, k) (see the module docstring)."""
    return (chunked.shift(a, -1), q), (b, k)


def _products(q, k, a, b, gates, masks):
    """(l_ab, l_ak, p_qb, p_qk) [N,B,H,C,C]: L_ax is P'(a_{t+1}, x) with its rows moved down one."""
    (from_next_ab, from_next_ak), (p_qb, p_qk) = per_key_decay.products(*_rows_and_columns(q, k, a, b),
                                                                        gates.to_here, masks.earlier)
    lower = lambda from_next: jnp.where(masks.earlier, chunked.shift(from_next, 1), 0.0)
    return lower(from_next_ab), lower(from_next_ak), p_qb, p_qk


def _products_backward(q, k, a, b, gates, masks, d_l_ab, d_l_ak, d_p_qb, d_p_qk):
    """(dq, dk, da, db, d_to_here) through `_products`, given its cotangents."""
    to_earlier = lambda d_lower: chunked.shift(jnp.where(masks.earlier, d_lower, 0.0), -1)
    (da_next, dq), (db, dk), d_to_here = per_key_decay.products_backward(
        *_rows_and_columns(q, k, a, b), gates.to_here, masks.earlier,
        [[to_earlier(d_l_ab), to_earlier(d_l_ak)], [d_p_qb, d_p_qk]])
    return dq, dk, chunked.shift(da_next, 1), db, d_to_here


def _terms(q, k, v, a, b, log_g, groups) -> _Terms:
    gates, masks = chunked.gates(log_g), chunked.segment_masks(groups)
    value_dim = v.shape[-1]
    l_ab, l_ak, p_qb, p_qk = _products(q, k, a, b, gates, masks)
    inverse = unit_lower_inverse(-l_ab)
    a_read = jnp.where(masks.reads_state, jnp.exp(chunked.shift(gates.to_here, 1)) * a, 0.0)
    solved = chunked.mm(inverse, jnp.concatenate([chunked.mm(l_ak, v), a_read], axis=-1))
    b_written = jnp.where(masks.writes_state, jnp.exp(gates.to_end) * b, 0.0)
    chunk_decay = jnp.where(masks.keeps_state, jnp.exp(gates.total), 0.0)
    key_dim = q.shape[-1]
    transition = (jnp.swapaxes(chunk_decay, -1, -2) * eye(key_dim)
                  + chunked.mm_tn(b_written, solved[..., value_dim:]))
    return _Terms(
        gates=gates, masks=masks, l_ab=l_ab, l_ak=l_ak, p_qb=p_qb, p_qk=p_qk, inverse=inverse, a_read=a_read,
        q_read=jnp.where(masks.reads_state, jnp.exp(gates.to_here) * q, 0.0), b_written=b_written,
        k_written=jnp.where(masks.writes_state, jnp.exp(gates.to_end) * k, 0.0), chunk_decay=chunk_decay,
        solved=solved, transition=transition,
    )


def _removed(terms, incoming, value_dim):
    """U = U_v + W S [N,B,H,C,V]: the values each token's low-rank term removes."""
    return terms.solved[..., :value_dim] + chunked.mm(terms.solved[..., value_dim:], incoming)


def _carry(transition, offset, state0, reverse=False):
    """state_{n+1} = transition_n state_n + offset_n along the chunks (or backwards), emitting the
    state each step was given."""

    def step(state, chunk):
        transition, offset = chunk
        return chunked.mm(transition, state) + offset, state

    return lax.scan(step, state0, (transition, offset), reverse=reverse)


def _forward(q, k, v, a, b, log_g, groups, state0):
    """Chunk-major float32 inputs -> (out [N,B,H,C,V], final state, the state entering each chunk
    [N,B,H,K,V])."""
    terms = _terms(q, k, v, a, b, log_g, groups)
    value_dim = v.shape[-1]
    offset = chunked.mm_tn(terms.b_written, terms.solved[..., :value_dim]) + chunked.mm_tn(terms.k_written, v)
    final, incoming = _carry(terms.transition, offset, state0)
    removed = _removed(terms, incoming, value_dim)
    out = chunked.mm(terms.q_read, incoming) + chunked.mm(terms.p_qb, removed) + chunked.mm(terms.p_qk, v)
    return out, final, incoming


def _backward(q, k, v, a, b, log_g, groups, incoming, d_out, d_final):
    """Chunk-major cotangents of `_forward`'s inputs (and of the incoming state) from those of its
    outputs, given the state entering each chunk."""
    terms = _terms(q, k, v, a, b, log_g, groups)
    masks, gates, value_dim = terms.masks, terms.gates, v.shape[-1]
    removed_values, weights = terms.solved[..., :value_dim], terms.solved[..., value_dim:]
    removed = removed_values + chunked.mm(weights, incoming)

    # The carry, backwards: dS = M^T dS' + Q_read^T dO + W^T P_qb^T dO.
    d_removed_by_out = chunked.mm_tn(terms.p_qb, d_out)
    read_back = chunked.mm_tn(terms.q_read, d_out) + chunked.mm_tn(weights, d_removed_by_out)
    d_state0, d_outgoing = _carry(jnp.swapaxes(terms.transition, -1, -2), read_back, d_final, reverse=True)
    d_removed = d_removed_by_out + chunked.mm(terms.b_written, d_outgoing)

    # The solve: [U_v | W] = X [L_ak V | A_read], so d[L_ak V | A_read] = X^T d[U_v | W] and
    # dL_ab = X^T d[U_v | W] [U_v | W]^T.
    d_solved = jnp.concatenate([d_removed, chunked.mm_nt(d_removed, incoming)], axis=-1)
    d_rhs = chunked.mm_tn(terms.inverse, d_solved)
    d_l_ab = chunked.mm_nt(d_rhs, terms.solved)
    d_l_ak = chunked.mm_nt(d_rhs[..., :value_dim], v)
    d_a_read = d_rhs[..., value_dim:]

    dv = (chunked.mm_tn(terms.l_ak, d_rhs[..., :value_dim]) + chunked.mm_tn(terms.p_qk, d_out)
          + chunked.mm(terms.k_written, d_outgoing))
    d_p_qb = chunked.mm_nt(d_out, removed)
    d_p_qk = chunked.mm_nt(d_out, v)

    dq, dk, da, db, d_to_here = _products_backward(q, k, a, b, gates, masks, d_l_ab, d_l_ak, d_p_qb, d_p_qk)

    dq_read = chunked.mm_nt(d_out, incoming)
    d_b_written = chunked.mm_nt(removed, d_outgoing)
    d_k_written = chunked.mm_nt(v, d_outgoing)
    exp_before, exp_here, exp_to_end = (jnp.exp(g) for g in (chunked.shift(gates.to_here, 1), gates.to_here,
                                                             gates.to_end))
    da = da + jnp.where(masks.reads_state, exp_before * d_a_read, 0.0)
    dq = dq + jnp.where(masks.reads_state, exp_here * dq_read, 0.0)
    db = db + jnp.where(masks.writes_state, exp_to_end * d_b_written, 0.0)
    dk = dk + jnp.where(masks.writes_state, exp_to_end * d_k_written, 0.0)

    d_to_here = (d_to_here + dq_read * terms.q_read
                 + chunked.shift(d_a_read * terms.a_read, -1))  # A_read reads G_{t-1}
    d_to_end = d_b_written * terms.b_written + d_k_written * terms.k_written
    d_decay = jnp.swapaxes(jnp.sum(d_outgoing * incoming, axis=-1, keepdims=True), -1, -2)  # [N,B,H,1,K]
    d_log_g = chunked.gate_cotangent(d_to_here, d_to_end, d_decay * terms.chunk_decay)
    return (dq, dk, dv, da, db, d_log_g), d_state0


def _token_scan(q, k, v, a, b, log_g, starts, state0, chunk):
    """The forward on a CPU (see `chunked.swept`): `step.recurrence` token by token on float32
    [B,T,H,*] inputs (q scaled; padding zeroed, so it neither reads nor changes the state), a reset
    at `starts` [B,T] taken as a decay of 0 and no read of the old state. Returns (o [B,T,H,V],
    final state [B,H,K,V], the state entering each `chunk`-token chunk [T/chunk,B,H,K,V])."""

    def token_step(q, k, v, a, b, log_g, start, state):
        reset = start[:, None, None]
        return recurrence(q, k, v, jnp.where(reset, 0.0, a), b, jnp.where(reset, -jnp.inf, log_g), state)

    return chunked.scan_tokens(token_step, (q, k, v, a, b, log_g, starts), state0, chunk)


_swept = chunked.swept(_forward, _backward, LONGEST_CHUNK, token_scan=_token_scan)


def dplr_xla(q, k, v, *, a, b, log_g, scale, initial_state, segment_ids, chunk_size):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; a, b, log_g [B,T,Hv,K] float32; initial_state [B,Hv,K,V] or
    None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state [B,Hv,K,V]
    float32). Chunks are chunk_size tokens long, at most LONGEST_CHUNK."""
    return _swept(q, k, v, a, b, log_g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                  chunk_size=chunk_size)

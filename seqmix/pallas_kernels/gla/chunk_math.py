"""The per-chunk algebra of gated linear attention, shared by both Pallas kernels.

Everything here acts on one chunk of one (batch, head): plain jnp on 2-D blocks (`tile_math`), no
reshapes or transposes, so the same functions trace inside Pallas kernel bodies (Triton and Mosaic
TPU, through the shared `sweep_gpu` and `sweep_tpu`).
Backward kernels differentiate `chunk_forward` with `jax.vjp`, so the forward and backward passes
share one definition of the math; it passes `tile_math.differentiable(matmul_dtype)`, so that the
transposed matmuls take operands of one dtype, as Triton requires. (The `xla` path batches the same
algebra over many chunks with its own, hand-written backward pass.)

Shapes (C = chunk length, c = sub-block length, W = gate width, K or 1):
  q, k [C, K]; v [C, V]; log_g [C, W] float32 (log decay per step, <= 0);
  groups [C, 1] int32: reset group relative to the state entering the chunk (0 = same segment);
  state [V, K] float32. The state is kept value-major, the transpose of the public [K, V], so that
  a per-key decay is a broadcast along the last (lane) axis rather than a transpose in the kernel.
Recurrence: S_t = diag(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (q already scaled).

Numerics: cumulative decays G (inclusive prefix sums of log_g inside the chunk) only enter as
exp(G_i - G_j) with G_i <= G_j, masked before the exp, so no exponential exceeds 1 and nothing
overflows however negative the gates (an exp(-G) factored form would overflow at G < -88).
"""

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels.tile_math import (
    SUB_BLOCK, as_row, cumulative_gates, decay_to_chunk_end, decayed_products, differentiable, eye, matmul,
    matmul_nt, matmul_tn, pairwise_decays, self_products, strictly_causal,
)


def _diagonal_block(q32, k32, v, gates, same_group, matmul_dtype):
    """Per-key decays taken elementwise on a masked [c, c, K] block, for one sub-block of queries
    against its own keys: no factorisation, so any gate magnitude is exact."""
    decays = pairwise_decays(gates, strictly_causal(q32.shape[0]) & same_group)
    scores = decayed_products(q32, k32, decays)
    return matmul(scores + self_products(q32, k32), v, matmul_dtype)


def intra_chunk(q, k, v, gates, groups, matmul_dtype):
    """Contributions of the chunk's own tokens: o_i = sum_{j<=i, same group} exp(G_i-G_j) (q_i.k_j) v_j.

    gates: cumulative G [C, W]. Returns [C, V] float32. A chunk of one sub-block (C <= 16) takes no
    slices of its tiles, which the Triton lowering cannot do.
    """
    size = q.shape[0]
    same_group = groups == as_row(groups)
    if gates.shape[1] == 1:
        # Scalar decay: one [C, C] decay matrix multiplies q k^T elementwise.
        mask = strictly_causal(size) & same_group
        decay = jnp.exp(jnp.where(mask, gates - as_row(gates), -jnp.inf))
        scores = matmul_nt(q, k, matmul_dtype) * jnp.where(eye(size), 1.0, decay)
        return matmul(scores, v, matmul_dtype)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    if size <= SUB_BLOCK:
        return _diagonal_block(q32, k32, v, gates, same_group, matmul_dtype)
    # Per-key decay across sub-blocks: query sub-block I against the earlier keys j < I*c, factored
    # around G_ref = G at the last token before I, so both exp(G_i - G_ref) and exp(G_ref - G_j)
    # are <= 1.
    outputs = []
    for start in range(0, size, SUB_BLOCK):
        stop = start + SUB_BLOCK
        g_block = gates[start:stop]
        out = _diagonal_block(q32[start:stop], k32[start:stop], v[start:stop], g_block,
                              same_group[start:stop, start:stop], matmul_dtype)
        if start:
            reference = gates[start - 1 : start]
            q_decayed = q32[start:stop] * jnp.exp(g_block - reference)
            k_decayed = k32[:start] * jnp.exp(reference - gates[:start])
            earlier = jnp.where(same_group[start:stop, :start], matmul_nt(q_decayed, k_decayed, matmul_dtype), 0.0)
            out = out + matmul(earlier, v[:start], matmul_dtype)
        outputs.append(out)
    return jnp.concatenate(outputs, axis=0)


def state_transition(k, v, log_g, groups, matmul_dtype):
    """The chunk's effect on the carried state: S_out = decay * S_in + update.

    Returns decay [1, W] (zero when a segment starts inside the chunk) and update [V, K]:
    sum over the last segment's tokens j of exp(G_last - G_j) v_j k_j^T.
    """
    # G_last is the chunk's total log decay; groups never decrease, so the last is the largest.
    # (Reductions rather than a slice of the last row, which Triton cannot take.)
    last_gate = jnp.sum(log_g, axis=0, keepdims=True)
    last_group = jnp.max(groups, axis=0, keepdims=True)
    weights = jnp.where(groups == last_group, jnp.exp(decay_to_chunk_end(log_g)), 0.0)
    update = matmul_tn(v, k.astype(jnp.float32) * weights, matmul_dtype)
    decay = jnp.where(last_group == 0, jnp.exp(last_gate), 0.0)
    return decay, update


def inter_chunk(q, gates, groups, state, matmul_dtype):
    """Contribution of the carried-in state [V, K] to the chunk's outputs, [C, V]."""
    q_decayed = jnp.where(groups == 0, q.astype(jnp.float32) * jnp.exp(gates), 0.0)
    return matmul_nt(q_decayed, state, matmul_dtype)


def chunk_forward(q, k, v, log_g, groups, state, matmul_dtype):
    """One chunk, sequentially after the previous one: (o [C, V] float32, state_out [V, K] float32)."""
    gates = cumulative_gates(log_g)
    out = intra_chunk(q, k, v, gates, groups, matmul_dtype) + inter_chunk(q, gates, groups, state, matmul_dtype)
    decay, update = state_transition(k, v, log_g, groups, matmul_dtype)
    return out, decay * state + update


def chunk_backward(q, k, v, log_g, groups, state, d_out, d_state_out, matmul_dtype):
    """Cotangents (dq, dk, dv, dlog_g, dstate_in) of `chunk_forward`, recomputing its forward.
    (`differentiable`: its transposed matmuls take their cotangents in matmul_dtype.)"""
    def forward(q, k, v, log_g, state):
        return chunk_forward(q, k, v, log_g, groups, state, differentiable(matmul_dtype))

    _, pullback = jax.vjp(forward, q, k, v, log_g, state)
    return pullback((d_out, d_state_out))

"""Chunked gated linear attention in plain jnp, with its backward pass written out.

The sequence is swept in blocks of a few chunks, carrying the state from block to block. Inside a
block, every chunk's own part and its effect on the carried state are batched matmuls over the
block's chunks; only an elementwise recurrence over chunk states runs in sequence (T/C steps each
way). Work is O(T C (K + V) + T K V); memory beyond inputs, outputs and one state per chunk is
O(block).

Inside a block, arrays are chunk-major (see `chunked`; N = the block's chunks): q, k [N,B,H,C,K];
v, out [N,B,H,C,V]; log_g [N,B,H,C,W] float32 (W = K per key or 1 per head); groups [N,B,1,C,1]
int32 (see `segments`); states [B,H,K,V] float32, one per chunk [N,B,H,K,V].

The backward pass is written out because JAX's autodiff of this form, on CPU, spends more time
around the matmuls than in them: it differentiates prefix sums through quadratic `reduce_window`s,
keeps every intermediate of the elementwise decay algebra, and linearises the `lax.cond` between
the two intra-chunk forms by materialising both branches' residuals. The rules below recompute the
cheap elementwise terms, give each matmul's cotangent one batched dot, and reuse the chunk states
saved by the forward sweep.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked, layout
from seqmix.pallas_kernels.gla import chunk_math
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import initial_state_or_zeros
from seqmix.pallas_kernels.tile_math import eye


# --- The intra-chunk part: o_i = sum_{j <= i, same segment} exp(G_i - G_j) (q_i.k_j) v_j -----------
# Three forms, each a forward (q, k, v, G, masks, dtype) -> o and a backward (..., d_o) ->
# (dq, dk, dv, dG), all float32. A token reads itself undecayed, outside the gates' graph: its
# exp(G_i - G_i) would send +t and -t to G_i, whose rounding noise swamps the true gate gradient
# under strong decay.

def _self_products(q, k):
    """q_i.k_i as a [..., C, 1] column."""
    return jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True)


def _intra_per_head(q, k, v, to_here, masks, dtype):
    scores = chunked.mm_nt(q, k, dtype) * chunked.head_decay(to_here, masks.earlier)
    return chunked.mm(scores, v, dtype)


def _intra_per_head_backward(q, k, v, to_here, masks, d_out, dtype):
    decay = chunked.head_decay(to_here, masks.earlier)
    products = chunked.mm_nt(q, k, dtype)
    dv = chunked.mm_tn(products * decay, d_out, dtype)
    d_products = chunked.mm_nt(d_out, v, dtype) * decay
    dq = chunked.mm(d_products, k, dtype)
    dk = chunked.mm_tn(d_products, q, dtype)
    d_exponent = jnp.where(masks.earlier, d_products * products, 0.0)
    d_gate = jnp.sum(d_exponent, axis=-1) - jnp.sum(d_exponent, axis=-2)
    return dq, dk, dv, d_gate[..., None]


def _factored(q, k, to_here):
    """exp(G_i - G_j) = exp(G_i) exp(-G_j): the decays folded into q and k."""
    return q.astype(jnp.float32) * jnp.exp(to_here), k.astype(jnp.float32) * jnp.exp(-to_here)


def _factored_scores(q, k, q_decayed, k_grown, masks, dtype):
    scores = jnp.where(masks.earlier, chunked.mm_nt(q_decayed, k_grown, dtype), 0.0)
    return jnp.where(eye(scores.shape[-1]), _self_products(q, k), scores)


def _intra_factored(q, k, v, to_here, masks, dtype):
    """Per-key decays as one masked matmul per chunk. Exact while no chunk decays by more than
    chunked.FACTORED_SPAN_LIMIT nats (exp(-G) overflows float32 past ~88)."""
    scores = _factored_scores(q, k, *_factored(q, k, to_here), masks, dtype)
    return chunked.mm(scores, v, dtype)


def _intra_factored_backward(q, k, v, to_here, masks, d_out, dtype):
    q_decayed, k_grown = _factored(q, k, to_here)
    dv = chunked.mm_tn(_factored_scores(q, k, q_decayed, k_grown, masks, dtype), d_out, dtype)
    d_scores = chunked.mm_nt(d_out, v, dtype)
    d_self = jnp.diagonal(d_scores, axis1=-2, axis2=-1)[..., None]
    d_scores = jnp.where(masks.earlier, d_scores, 0.0)
    dq_decayed = chunked.mm(d_scores, k_grown, dtype)
    dk_grown = chunked.mm_tn(d_scores, q_decayed, dtype)
    dq = dq_decayed * jnp.exp(to_here) + d_self * k.astype(jnp.float32)
    dk = dk_grown * jnp.exp(-to_here) + d_self * q.astype(jnp.float32)
    return dq, dk, dv, dq_decayed * q_decayed - dk_grown * k_grown


def _exact_chunks(q, k, v, to_here, earlier, dtype):
    """Per-key decays for any gate magnitude, every exponential <= 1, in 16-token sub-blocks.

    Queries of sub-block I read the earlier sub-blocks' keys factored around R_I, the gate at the
    last token before I: exp(G_i - R_I) exp(R_I - G_j), both factors <= 1. A sub-block's own
    pairs take exp(G_i - G_j) elementwise on a masked [c, c, K] block.
    """
    chunk, key_dim = q.shape[-2:]
    size = chunk_math.SUB_BLOCK
    blocks = chunk // size

    def by_block(x):  # [..., C, D] -> [..., C/c, c, D]
        return x.reshape(x.shape[:-2] + (blocks, size, x.shape[-1]))

    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    gate = by_block(to_here)
    block_ends = gate[..., -1, :]
    reference = jnp.concatenate([jnp.zeros_like(block_ends[..., :1, :]), block_ends[..., :-1, :]], axis=-2)
    q_decayed = by_block(q32) * jnp.exp(gate - reference[..., None, :])
    key_block = lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 1) // size
    before = key_block < lax.broadcasted_iota(jnp.int32, (blocks, chunk, 1), 0)  # key j before sub-block I
    k_decayed = k32[..., None, :, :] * jnp.exp(
        jnp.where(before, reference[..., :, None, :] - to_here[..., None, :, :], -jnp.inf))
    earlier_blocks = chunked.mm_nt(q_decayed, k_decayed, dtype).reshape(q.shape[:-2] + (chunk, chunk))
    out = chunked.mm(jnp.where(earlier, earlier_blocks, 0.0), v, dtype)

    block_mask = earlier.reshape(earlier.shape[:-2] + (blocks, size, blocks, size))
    block_mask = jnp.diagonal(block_mask, axis1=-4, axis2=-2)  # [..., c, c, C/c]
    block_mask = jnp.moveaxis(block_mask, -1, -3)[..., None]  # [..., C/c, c, c, 1]
    exponent = jnp.where(block_mask, gate[..., :, None, :] - gate[..., None, :, :], -jnp.inf)
    own = jnp.sum(by_block(q32)[..., :, None, :] * by_block(k32)[..., None, :, :] * jnp.exp(exponent), axis=-1)
    own = jnp.where(eye(size), _self_products(by_block(q32), by_block(k32)), own)
    return out + chunked.mm(own, by_block(v), dtype).reshape(out.shape)


def _intra_exact(q, k, v, to_here, masks, dtype):
    """`_exact_chunks` one chunk at a time: batched, its [c, c, K] blocks would take 16x the
    block's inputs, memory XLA sets aside (and the OS faults in, see below) on every call, even
    while the factored form runs."""
    return lax.map(lambda chunk: _exact_chunks(*chunk, dtype), (q, k, v, to_here, masks.earlier))


def _intra_exact_backward(q, k, v, to_here, masks, d_out, dtype):
    def chunk_backward(chunk):
        *inputs, earlier, d_chunk = chunk
        _, pullback = jax.vjp(lambda *a: _exact_chunks(*a, earlier, dtype), *inputs)
        return tuple(g.astype(jnp.float32) for g in pullback(d_chunk))

    return lax.map(chunk_backward, (q, k, v, to_here, masks.earlier, d_out))


# --- The whole chunked pass, forward and backward ----------------------------------------------

def _state_terms(q, k, gates, masks):
    """(queries reading the carried state, q_i exp(G_i); keys written into it, k_j exp(E_j); the
    state's decay over the chunk [N,B,H,1,W]), each zero where a segment boundary cuts the path."""
    q_read = jnp.where(masks.reads_state, q.astype(jnp.float32) * jnp.exp(gates.to_here), 0.0)
    k_written = jnp.where(masks.writes_state, k.astype(jnp.float32) * jnp.exp(gates.to_end), 0.0)
    return q_read, k_written, jnp.where(masks.keeps_state, jnp.exp(gates.total), 0.0)


def _linear_step(carry, chunk):
    """carry' = decay * carry + term, emitting the carry it was given."""
    decay, term = chunk
    return decay * carry + term, carry


def _intra_form(gates, factored, exact, per_head, dtype):
    """The intra-chunk form (forward or backward, a function of the form's array operands) that a
    block's gates allow: per-head gates take `per_head`; per-key gates take one masked matmul per
    chunk (`factored`) while none of the block's chunks decays by more than
    chunked.FACTORED_SPAN_LIMIT nats (the common case), else the exact sub-blocked form. Only the
    intra-chunk part branches: XLA compiles both branches of a `lax.cond` in full, and with the
    gates, masks and state terms inside them too, a per-key fwd+bwd program held 401 kernels at
    T = 4k instead of 268 (its time unchanged)."""
    if gates.total.shape[-1] == 1:
        return functools.partial(per_head, dtype=dtype)
    safe = -jnp.min(gates.total) <= chunked.FACTORED_SPAN_LIMIT
    return lambda *operands: lax.cond(safe, functools.partial(factored, dtype=dtype),
                                      functools.partial(exact, dtype=dtype), *operands)


def _forward(q, k, v, log_g, groups, state0, chunk, dtype):
    """One block of time-major inputs (see `_swept`) and its incoming state -> (out [B,L,H,V]
    float32, outgoing state, the state entering each of its chunks [N,B,H,K,V])."""
    q, k, v, log_g, groups = (chunked.chunk_major(a, chunk) for a in (q, k, v, log_g, groups))
    gates, masks = chunked.gates(log_g), chunked.segment_masks(groups)
    q_read, k_written, decay = _state_terms(q, k, gates, masks)
    update = chunked.mm_tn(k_written, v, dtype)
    final, incoming = lax.scan(_linear_step, state0, (chunked.as_row_scale(decay), update))
    intra = _intra_form(gates, _intra_factored, _intra_exact, _intra_per_head, dtype)
    out = intra(q, k, v, gates.to_here, masks)
    out = out + chunked.mm(q_read, incoming, dtype)
    return chunked.time_major(out), final, incoming


def _backward(q, k, v, log_g, groups, incoming, d_out, d_final, chunk, dtype):
    """Cotangents of `_forward`'s inputs (time-major, and the incoming state) from those of its
    outputs."""
    q, k, v, log_g, groups, d_out = (chunked.chunk_major(a, chunk) for a in (q, k, v, log_g, groups, d_out))
    width = log_g.shape[-1]
    gates, masks = chunked.gates(log_g), chunked.segment_masks(groups)
    q_read, k_written, decay = _state_terms(q, k, gates, masks)

    # d(state leaving chunk n) = d(state entering chunk n + 1): a reverse sweep.
    read_back = chunked.mm_tn(q_read, d_out, dtype)
    d_state0, d_outgoing = lax.scan(_linear_step, d_final, (chunked.as_row_scale(decay), read_back), reverse=True)

    intra_backward = _intra_form(gates, _intra_factored_backward, _intra_exact_backward, _intra_per_head_backward,
                                 dtype)
    dq, dk, dv, d_to_here = intra_backward(q, k, v, gates.to_here, masks, d_out)
    dq_read = chunked.mm_nt(d_out, incoming, dtype)
    dk_written = chunked.mm_nt(v, d_outgoing, dtype)
    dv = dv + chunked.mm(k_written, d_outgoing, dtype)
    dq = dq + jnp.where(masks.reads_state, dq_read * jnp.exp(gates.to_here), 0.0)
    dk = dk + jnp.where(masks.writes_state, dk_written * jnp.exp(gates.to_end), 0.0)
    d_decay = jnp.sum(d_outgoing * incoming, axis=-1)[..., None, :]  # [N,B,H,1,K]
    d_log_g = chunked.gate_cotangent(
        d_to_here + chunked.to_width(dq_read * q_read, width),
        chunked.to_width(dk_written * k_written, width),
        chunked.to_width(d_decay, width) * decay,
    )
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_log_g)
    return (*(chunked.time_major(g) for g in grads), d_state0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _swept(q, k, v, log_g, groups, state0, chunk, block, dtype):
    """Time-major `layout.ChunkedInputs` fields (log_g its one per-token input, groups [B,Tp,1,1]),
    Tp a multiple of chunk * block, and state0 [B,H,K,V] float32 -> (out [B,Tp,H,V] float32, final
    state [B,H,K,V] float32)."""
    out, final, _ = _sweep_forward(q, k, v, log_g, groups, state0, chunk, block, dtype)
    return out, final


def _sweep_forward(q, k, v, log_g, groups, state0, chunk, block, dtype):
    def block_forward(inputs, state):
        return _forward(*inputs, state, chunk, dtype)

    return chunked.sweep_forward(block_forward, (q, k, v, log_g, groups), state0, chunk * block)


def _swept_forward(q, k, v, log_g, groups, state0, chunk, block, dtype):
    out, final, incoming = _sweep_forward(q, k, v, log_g, groups, state0, chunk, block, dtype)
    return (out, final), (q, k, v, log_g, groups, incoming)


def _swept_backward(chunk, block, dtype, residuals, cotangents):
    *inputs, incoming = residuals
    d_out, d_final = cotangents

    def block_backward(inputs, incoming, d_out, d_state):
        *grads, d_state = _backward(*inputs, incoming, d_out, d_state, chunk, dtype)
        return tuple(grads), d_state

    grads, d_state0 = chunked.sweep_backward(block_backward, inputs, incoming, d_out, d_final, chunk * block)
    return (*grads, None, d_state0)


_swept.defvjp(_swept_forward, _swept_backward)


def gla_xla(q, k, v, *, log_gate, scale, initial_state, segment_ids, chunk_size):
    batch, length, heads, value_dim = v.shape
    key_dim = q.shape[-1]
    q, k = (repeat_to_value_heads(x, heads) for x in (q, k))
    chunks = -(-length // chunk_size)
    block = chunked.block_chunks(batch, heads, chunks, chunk_size, max(key_dim, value_dim))
    padded = -(-chunks // block) * block * chunk_size
    x = layout.to_chunks(q, k, v, (log_gate,), scale, segment_ids, chunk_size, padded)
    state0 = initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim)
    (log_g,) = x.per_token
    out, final = _swept(x.q, x.k, x.v, log_g, x.groups[..., None], state0, chunk_size, block,
                          layout.matmul_dtype(q.dtype))
    return layout.from_chunks(out, length, q.dtype), final

"""The (gated) delta rule, chunked in plain jnp, with its backward pass written out.

The per-chunk algebra is `delta.algebra`'s (read it for the derivation), run here batched over
chunk-major arrays (see `chunked`): everything but the carry of the state is batched over a
block's chunks (the sequence is swept in blocks, `chunked.swept`), and the sequential part, a
`lax.scan` over the chunks, is `algebra.step` forward and `algebra.step_backward` in reverse: two
[C,K]-by-[K,V] products per chunk. The forward pass keeps only the state entering each chunk; the
backward pass recomputes the rest. On a CPU while the state is small, the forward runs the
recurrence token by token instead, keeping the same chunk states (`_token_scan`, `chunked.swept`).
What this path computes its own way: the gates' prefix sums (`chunked.gates`, `gate_cotangent`), the
segment masks (`chunked.segment_masks`) and the decayed products with their pullback (`_products`):
one materialised [C, C] decay matrix times k k^T and q k^T for a per-head gate, `per_key_decay` for
a per-key one. The system's inverse is built by block doubling (`triangular`): against LAPACK's
trsm (one call per matrix, column-major operands that force layout copies around it) this halved
the fwd+bwd time at T = 4k, and it keeps the pass in XLA's own ops: the threaded trsm ran 20x
slower whenever another process held one of the cores.
Arrays are chunk-major: q, k [N,B,H,C,K], v [N,B,H,C,V], beta [N,B,H,C,1], log_gate [N,B,H,C,W]
(W = 1 per head, K per key), groups [N,B,1,C,1], states value-major [B,H,V,K], all float32.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import chunked, per_key_decay
from seqmix.pallas_kernels.delta import algebra
from seqmix.pallas_kernels.tile_math import eye


def _products(q, k, gates, masks):
    """((key_products, query_products) [N,B,H,C,C], their pullback(d_key, d_query) -> (dq, dk,
    d_to_here)), as `algebra` takes them.

    Per head, the decays exp(G_i - G_j) [C,C] (`chunked.head_decay`: 1 on the diagonal, 0 above it
    and across segments) and strict, the same with 0 on the diagonal, are materialised once:
    multiplying by them also applies the masks (masks rebuilt from the segment groups inside every
    consumer cost 15% of the fwd+bwd time); G_i's cotangent is the row sums of the exponents', G_j's
    minus the column sums. Per key, `per_key_decay`, with the key products' diagonal dropped."""
    size = q.shape[chunked.CHUNK_AXIS]
    if gates.to_here.shape[-1] == 1:
        decay = chunked.head_decay(gates.to_here, masks.earlier)
        strict = lax.optimization_barrier(decay - eye(size))
        key_products, query_products = strict * chunked.mm_nt(k, k), decay * chunked.mm_nt(q, k)

        def head_pullback(d_key, d_query):
            d_key_products, d_query_products = d_key * strict, d_query * decay
            d_exponent = d_key * key_products + d_query * jnp.where(eye(size), 0.0, query_products)
            d_to_here = (jnp.sum(d_exponent, axis=-1) - jnp.sum(d_exponent, axis=-2))[..., None]
            dk = (chunked.mm(d_key_products + jnp.swapaxes(d_key_products, -1, -2), k)
                  + chunked.mm_tn(d_query_products, q))
            return chunked.mm(d_query_products, k), dk, d_to_here

        return (key_products, query_products), head_pullback

    (key_products,), (query_products,) = per_key_decay.products((k, q), (k,), gates.to_here, masks.earlier)

    def key_pullback(d_key, d_query):
        d_key = jnp.where(eye(size), 0.0, d_key)  # no diagonal
        (dk_by_rows, dq), (dk_by_columns,), d_to_here = per_key_decay.products_backward(
            (k, q), (k,), gates.to_here, masks.earlier, ((d_key,), (d_query,)))
        return dq, dk_by_rows + dk_by_columns, d_to_here

    return (jnp.where(eye(size), 0.0, key_products), query_products), key_pullback


def _terms(q, k, v, beta, log_gate, groups):
    """(`algebra.Terms`, the products' pullback) of chunk-major blocks."""
    gates, masks = chunked.gates(log_gate), chunked.segment_masks(groups)
    products, pullback = _products(q, k, gates, masks)
    return algebra.terms(q, k, v, beta, gates, masks, products), pullback


def _forward(q, k, v, beta, log_gate, groups, state0):
    """Chunk-major float32 inputs -> (out [N,B,H,C,V], final state, the state entering each chunk
    [N,B,H,V,K])."""
    terms, _ = _terms(q, k, v, beta, log_gate, groups)

    def step(state, carry):
        written, outgoing = algebra.step(carry, state)
        return outgoing, (state, written)

    final, (incoming, written) = lax.scan(step, state0, terms.carry)
    return algebra.output(terms, written, incoming), final, incoming


def _backward(q, k, v, beta, log_gate, groups, incoming, d_out, d_final):
    """Chunk-major cotangents of `_forward`'s inputs (and of the incoming state) from those of its
    outputs, given the state entering each chunk."""
    terms, pullback = _terms(q, k, v, beta, log_gate, groups)
    written = algebra.written(terms.carry, incoming)

    def step(d_state_out, chunk):
        d_written, d_state = algebra.step_backward(*chunk, d_state_out)
        return d_state, (d_state_out, d_written)

    d_state0, (d_outgoing, d_written) = lax.scan(
        step, d_final, (terms.carry, *algebra.output_backward(terms, d_out)), reverse=True)
    dq, dk, dv, d_beta, d_gates = algebra.local_backward(
        q, k, v, beta, terms, pullback, incoming, written, d_out, d_written, d_outgoing)
    return (dq, dk, dv, d_beta, chunked.gate_cotangent(d_gates.to_here, d_gates.to_end, d_gates.total)), d_state0


# The longest chunk this path walks, whatever the call's chunk_size: at T = 4k, fwd+bwd on this
# 2-core CPU (K = V = 64) took 50 / 42 ms at C = 64 / 32 with a per-head gate, and 83 / 66 / 184 ms
# at C = 16 / 32 / 64 with Kimi's per-key gate, whose 32-token halves of a 64-token chunk often
# decay past `per_key_decay`'s limit and take its elementwise path.
LONGEST_CHUNK = 32


def _token_scan(q, k, v, beta, log_gate, starts, state0, chunk):
    """The forward on a CPU (see `chunked.swept`): the recurrence token by token on float32
    [B,T,H,*] inputs (q scaled; padding zeroed, so beta = 0 leaves the state alone), a reset at
    `starts` [B,T] taken as a decay of 0. Returns (o [B,T,H,V], final state [B,H,V,K], the state
    entering each `chunk`-token chunk [T/chunk,B,H,V,K]), value-major as the chunked sweep's.

    `step.recurrence` rewritten so that a token passes over the state twice, not four times: with
    e = exp(log_gate) and u = beta (v - S'^T k), both reads, S'^T k = S^T (e k) and
    S_t^T q = S^T (e q) + (q.k) u, take the state before the token's update as one [2,K]-by-[K,V]
    product, and the update S_t = e S + k u^T is the second pass. Everything that does not read the
    state (e, the two readers, q.k) is computed for all tokens before the scan. At T = 4k, B x H = 4,
    K = V = 64, side by side with `step.recurrence` scanned: the op's forward in 0.56-0.89x the time
    (KDA and the gated delta rule), its fwd+bwd in 0.81-0.97x in most rounds. (DPLR's recurrence already passes
    three times, and the same rewrite left its time unchanged.)"""
    decay = jnp.exp(jnp.where(starts[..., None, None], -jnp.inf, log_gate))  # [B,T,H,W]
    readers = jnp.stack([k * decay, q * decay], axis=-2)  # [B,T,H,2,K]
    q_dot_k = jnp.sum(q * k, axis=-1, keepdims=True)

    def token_step(readers, k, v, beta, decay, q_dot_k, state):
        reads = jnp.einsum("bhrk,bhkv->bhrv", readers, state, precision=lax.Precision.HIGHEST)
        update = beta * (v - reads[..., 0, :])
        return reads[..., 1, :] + q_dot_k * update, decay[..., None] * state + k[..., None] * update[..., None, :]

    out, final, incoming = chunked.scan_tokens(token_step, (readers, k, v, beta, decay, q_dot_k),
                                               jnp.swapaxes(state0, -1, -2), chunk)
    return out, jnp.swapaxes(final, -1, -2), jnp.swapaxes(incoming, -1, -2)


_swept = chunked.swept(_forward, _backward, LONGEST_CHUNK, value_major=True, token_scan=_token_scan)


def delta_xla(q, k, v, beta, *, log_gate, scale, initial_state, segment_ids, chunk_size):
    """q, k [B,T,Hk,K]; v [B,T,Hv,V]; beta [B,T,Hv]; log_gate [B,T,Hv,W] float32; initial_state
    [B,Hv,K,V] or None; segment_ids [B,T] or None. Returns (o [B,T,Hv,V] in q.dtype, final_state
    [B,Hv,K,V] float32). Chunks are chunk_size tokens long, at most LONGEST_CHUNK."""
    return _swept(q, k, v, beta[..., None], log_gate, scale=scale, initial_state=initial_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)

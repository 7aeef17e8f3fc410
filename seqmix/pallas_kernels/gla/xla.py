"""Chunked gated linear attention in plain jnp: every chunk's own part at once, then a scan over
chunk states. O(T C (K + V)) work with T/C sequential steps; JAX differentiates it."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.gla import chunk_math, layout


def _over_chunks(fn, *args):
    for _ in range(3):  # N, H, B
        fn = jax.vmap(fn)
    return fn(*args)


def _intra_exact(q, k, v, gates, groups, dtype):
    return _over_chunks(lambda *a: chunk_math.intra_chunk(*a, dtype), q, k, v, gates, groups)


def _intra_factored(q, k, v, gates, groups, dtype):
    return _over_chunks(lambda *a: chunk_math.intra_chunk_factored(*a, dtype), q, k, v, gates, groups)


def _factored_is_safe(gates):
    return -jnp.min(gates[..., -1, :]) <= chunk_math.FACTORED_SPAN_LIMIT


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _intra_per_key(q, k, v, gates, groups, dtype):
    """Intra-chunk outputs [B,H,N,C,V] for per-key gates, from [B,H,N,C,*] tiles.

    One masked matmul per chunk when every chunk's decay allows it (the common case), else the
    sub-blocked form whose exponentials never exceed 1. The choice is a `lax.cond` on data; its
    VJP is written out so that reverse mode keeps only the inputs and recomputes the taken branch:
    JAX's own cond linearisation materialises both branches' residuals, which on CPU cost more
    than the whole forward pass.
    """
    def branch(intra):
        return lambda *tiles: intra(*tiles, groups, dtype)

    return lax.cond(_factored_is_safe(gates), branch(_intra_factored), branch(_intra_exact), q, k, v, gates)


def _intra_per_key_forward(q, k, v, gates, groups, dtype):
    return _intra_per_key(q, k, v, gates, groups, dtype), (q, k, v, gates, groups)


def _intra_per_key_backward(dtype, residuals, d_out):
    q, k, v, gates, groups = residuals

    def pullback(intra):
        def run(*tiles):
            _, vjp = jax.vjp(lambda *a: intra(*a, groups, dtype), *tiles)
            return vjp(d_out)
        return run

    grads = lax.cond(_factored_is_safe(gates), pullback(_intra_factored), pullback(_intra_exact), q, k, v, gates)
    return (*grads, None)


_intra_per_key.defvjp(_intra_per_key_forward, _intra_per_key_backward)


def gla_xla(q, k, v, *, log_gate, scale, initial_state, segment_ids, chunk_size):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    x = layout.to_chunks(q, k, v, log_gate, scale, segment_ids, chunk_size)
    dtype = layout.matmul_dtype(q.dtype)
    chunks = x.q.shape[2] // chunk_size

    def by_chunk(a):  # [B,H,Tp,D] -> [B,H,N,C,D]
        return a.reshape(a.shape[:2] + (chunks, chunk_size, a.shape[-1]))

    q_c, k_c, v_c, g_c = map(by_chunk, (x.q, x.k, x.v, x.log_gate))
    groups = jnp.broadcast_to(x.groups.reshape(batch, 1, chunks, chunk_size, 1), (batch, heads, chunks, chunk_size, 1))
    gates = jnp.cumsum(g_c, axis=3)
    if gates.shape[-1] == 1:  # a scalar decay's [C, C] decay matrix is exact as it is
        intra = _intra_exact(q_c, k_c, v_c, gates, groups, dtype)
    else:
        intra = _intra_per_key(q_c, k_c, v_c, gates, groups, dtype)
    decay, update = _over_chunks(lambda *a: chunk_math.state_transition(*a, dtype), k_c, v_c, g_c, groups)

    def carry(state, transition):
        chunk_decay, chunk_update = transition
        return chunk_decay * state + chunk_update, state

    state0 = layout.state_in(initial_state, batch, heads, key_dim, value_dim)
    final, incoming = lax.scan(carry, state0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(update, 2, 0)))
    incoming = jnp.moveaxis(incoming, 0, 2)
    inter = _over_chunks(lambda *a: chunk_math.inter_chunk(*a, dtype), q_c, gates, groups, incoming)
    out = (intra + inter).reshape(batch, heads, chunks * chunk_size, value_dim)
    return layout.from_chunks(out, length, q.dtype), layout.state_out(final)

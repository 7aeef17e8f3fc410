"""The glue shared by the two Pallas kernels: layout in and out, and the custom VJP.

A backend provides two pallas_call builders over head-major inputs (`layout.head_major`):
  forward(q, k, v, log_gate, groups, state0, chunk) -> (out [B,H,Tp,V] in q's dtype,
      final [B,H,V,K] f32, incoming [B,H,N,V,K] f32: the state entering every chunk, kept for the
      backward pass so it needs no second sequential sweep to rebuild them);
  backward(q, k, v, log_gate, groups, incoming, d_out, d_final, chunk) -> (dq, dk, dv, dlog_gate,
      dstate0), a reverse sweep over chunks carrying dS.
The scale, masking and padding outside the kernels are differentiated by JAX.
"""

import functools

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels.gla import layout


def kernel_implementation(forward, backward, tile):
    """An implementation with the op's signature from a backend's forward and backward builders.

    tile(chunk_size) gives the chunk length the kernels walk.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def chunked(q, k, v, log_gate, groups, state0, chunk):
        out, final, _ = forward(q, k, v, log_gate, groups, state0, chunk)
        return out, final

    def chunked_forward(q, k, v, log_gate, groups, state0, chunk):
        out, final, incoming = forward(q, k, v, log_gate, groups, state0, chunk)
        return (out, final), (q, k, v, log_gate, groups, incoming)

    def chunked_backward(chunk, residuals, cotangents):
        q, k, v, log_gate, groups, incoming = residuals
        d_out, d_final = cotangents
        dq, dk, dv, d_gate, d_state0 = backward(q, k, v, log_gate, groups, incoming, d_out, d_final, chunk)
        return dq, dk, dv, d_gate, None, d_state0

    chunked.defvjp(chunked_forward, chunked_backward)

    def run(q, k, v, *, log_gate, scale, initial_state, segment_ids, chunk_size):
        batch, length, heads, key_dim = q.shape
        chunk = tile(chunk_size)
        x = layout.head_major(layout.to_chunks(q, k, v, log_gate, scale, segment_ids, chunk))
        state0 = layout.state_in(initial_state, batch, heads, key_dim, v.shape[-1])
        out, final = chunked(x.q, x.k, x.v, x.log_gate, x.groups, state0, chunk)
        return layout.from_chunks(jnp.swapaxes(out, 1, 2), length, q.dtype), layout.state_out(final)

    return run

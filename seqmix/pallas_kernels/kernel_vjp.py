"""The glue around a family's Pallas kernels: layout in and out, and the custom VJP.

A backend provides two pallas_call builders (`sweep_gpu`, `sweep_tpu`) over head-major inputs
(`layout.head_major`), `tiles` = (q, k, v, *per_token):
  forward(tiles, groups, state0, chunk) -> (out [B,H,Tp,V] in q's dtype, final [B,H,V,K] f32,
      incoming [B,H,N,V,K] f32: the state entering every chunk, kept for the backward pass so it
      needs no second sequential sweep to rebuild them);
  backward(tiles, groups, incoming, d_out, d_final, chunk) -> (d_tiles, dstate0), a reverse sweep
      over chunks carrying dS; d_tiles shaped and typed like tiles.
H is v's head count. A tile with fewer heads, Hk = H / G (q and k under grouped value heads), is
read by value head h at its head h // G through the kernels' index maps (`layout.tile_head`), never
repeated in memory; its gradient is written per value head and summed over each group
(`layout.gradient_per_value_head`, `layout.shared_head_gradient`).
The scale, masking and padding outside the kernels are differentiated by JAX.

The sweeps run a family's chunk math, which provides, on one chunk's tiles (see `gla.chunk_math`,
`delta.chunk_math`):
  chunk_forward(q, k, v, *per_token, groups, state, matmul_dtype) -> (out [C,V] f32, state [V,K] f32)
  chunk_backward(q, k, v, *per_token, groups, state, d_out, d_state, matmul_dtype)
      -> (dq, dk, dv, *d_per_token, d_state entering the chunk)
Inputs are head-major (`layout.head_major`): `tiles` = (q, k, v, *per_token), [B,Hk,Tp,K] for q
and k, [B,H,Tp,D] for the rest; groups [B,Tp,1]; states value-major [B,H,V,K] float32. The chunk
math sees one value head's tiles, q and k those of the head it reads.
"""

import functools

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels import layout


def kernel_implementation(forward, backward, tile, per_token: tuple[str, ...]):
    """An implementation with the family op's signature from a backend's forward and backward builders.

    tile(chunk_size) gives the chunk length the kernels walk. per_token names the family's float32
    per-token inputs ([B,T,H,W] or [B,T,H]) as the op passes them, by keyword, in the order its chunk
    math takes them: ("log_gate",) for GLA, ("beta", "log_gate") for the delta rule.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def chunked(tiles, groups, state0, chunk):
        out, final, _ = forward(tiles, groups, state0, chunk)
        return out, final

    def chunked_forward(tiles, groups, state0, chunk):
        out, final, incoming = forward(tiles, groups, state0, chunk)
        return (out, final), (tiles, groups, incoming)

    def chunked_backward(chunk, residuals, cotangents):
        tiles, groups, incoming = residuals
        d_out, d_final = cotangents
        d_tiles, d_state0 = backward(tiles, groups, incoming, d_out, d_final, chunk)
        return d_tiles, None, d_state0

    chunked.defvjp(chunked_forward, chunked_backward)

    def run(q, k, v, *, scale, initial_state, segment_ids, chunk_size, **per_token_inputs):
        batch, length, heads, key_dim = v.shape[:3] + q.shape[-1:]
        chunk = tile(chunk_size)
        x = layout.head_major(layout.to_chunks(q, k, v, tuple(per_token_inputs[name] for name in per_token), scale,
                                               segment_ids, chunk))
        state0 = layout.state_in(initial_state, batch, heads, key_dim, v.shape[-1])
        out, final = chunked((x.q, x.k, x.v, *x.per_token), x.groups, state0, chunk)
        return layout.from_chunks(jnp.swapaxes(out, 1, 2), length, q.dtype), layout.state_out(final)

    return run

"""The selective scan in plain XLA (CPU, and the fallback everywhere): a sequential scan in
chunks, with a hand-written backward.

A per-(channel, state) decay has no [C, C] matrix form that stays small (GLA's intra-chunk
matmuls would cost O(T C D N) here), so the tokens are scanned. The forward runs token by token,
in chunks of C tokens, keeping only each chunk's starting state [B, D, N] (never a
[B, T, D, N] tensor). The backward (`jax.custom_vjp`) walks the chunks in reverse: it recomputes a
chunk's states from its saved start, then runs the reverse recurrence over its tokens,

    g_t = dL/dh_t = C_t dy_t^T + a_{t+1} g_{t+1}          (a: the decays, zero across a reset)
    dC_t = h_t^T dy_t,   da_t = g_t h_{t-1},   d(w_t x_t) = g_t B_t,   dB_t += g_t^T (w_t x_t)

and maps da, dw onto dt, A and B through the vjp of `coefficients` (so Mamba's and
Longhorn's updates share it).

Measured on a shared 2-core CPU (jitted, B=2, T=2048, D=256, N=16, Mamba's update, medians of 5
interleaved calls, two runs), forward + backward: this path 0.26-0.32 s at C = 32 or 64
(0.37 s at 128 and 256); autodiff through a token-by-token scan 0.75-1.1 s (a bare `lax.scan` or
the reference); a two-level scan (every chunk scanned at once from zero states, then the
chunk-start states, then the tokens again from them, all under `jax.checkpoint`) 1.0-1.4 s: its
shorter sequential depth does not pay for its extra pass on a CPU. Forward alone: 0.06-0.08 s
here and for a bare `lax.scan`, 0.18-0.23 s two-level. Computing a chunk's decays at once
outside the token loop was slower still (per-chunk [C, B, D, N] temporaries).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.segments import reset_groups, zero_padded
from seqmix.pallas_kernels.selective_scan.step import advance, coefficients, read


def chunked_implementation(forward):
    """An implementation with `selective_scan_xla`'s signature from a forward sweep over chunked
    inputs, `forward(update, A, state0, x, dt, B, C, keep) -> (y, final state, chunk starts)` in
    `_forward`'s layout; its backward is this module's reverse sweep from the chunk starts."""

    def run(x, dt, A, B, C, *, update, initial_state, segment_ids, chunk_size):
        """x, dt [Bt, T, D]; A [D, N] or None; B, C [Bt, T, N]; initial_state [Bt, D, N] or None;
        segment_ids [Bt, T] or None; any T. Returns (y [Bt, T, D] in x's dtype, final state
        [Bt, D, N] float32)."""
        batch, length, channels = x.shape
        chunk = min(chunk_size, length)
        n_chunks = -(-length // chunk)
        padded = n_chunks * chunk
        valid, groups = reset_groups(segment_ids, batch, length)
        # keep = 0 before the first token of each segment after the row's first (the state resets);
        # padding and the appended tail have dt = x = C = 0: they neither change the state nor output.
        keep = jnp.pad(groups[:, 1:] == groups[:, :-1], ((0, 0), (1, padded - length)), constant_values=True)
        by_chunk = lambda a: jnp.moveaxis(a.reshape(batch, n_chunks, chunk, *a.shape[2:]), (1, 2), (0, 1))
        tokens = [by_chunk(zero_padded(a, valid, padded, jnp.float32)) for a in (x, dt, B, C)]
        state0 = jnp.zeros((batch, channels, B.shape[-1]), jnp.float32) if initial_state is None \
            else initial_state.astype(jnp.float32)
        A = None if A is None else A.astype(jnp.float32)
        y, final_state = _scan(update, forward, A, state0, *tokens, by_chunk(keep.astype(jnp.float32)))
        y = jnp.moveaxis(y, (0, 1), (1, 2)).reshape(batch, padded, channels)[:, :length]
        return y.astype(x.dtype), final_state

    return run


def _forward(update, A, state0, x, dt, B, C, keep):
    """The forward sweep, token by token: float32 state0 [Bt, D, N]; x, dt [NC, C, Bt, D]; B, C
    [NC, C, Bt, N]; keep [NC, C, Bt] (chunk, then position in chunk). Returns (y [NC, C, Bt, D],
    final state [Bt, D, N], the state entering each chunk [NC, Bt, D, N])."""

    def chunk_step(state, chunk):
        def token(state, t):
            x_t, dt_t, B_t, C_t, keep_t = t
            state = advance(update, A, state * keep_t[:, None, None], x_t, dt_t, B_t)
            return state, read(state, C_t)

        end, y = lax.scan(token, state, chunk)
        return end, (y, state)

    final_state, (y, chunk_starts) = lax.scan(chunk_step, state0, (x, dt, B, C, keep))
    return y, final_state, chunk_starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(update, forward, A, state0, x, dt, B, C, keep):
    y, final_state, _ = forward(update, A, state0, x, dt, B, C, keep)
    return y, final_state


def _scan_forward(update, forward, A, state0, x, dt, B, C, keep):
    y, final_state, chunk_starts = forward(update, A, state0, x, dt, B, C, keep)
    return (y, final_state), (A, chunk_starts, x, dt, B, C, keep)


def _scan_backward(update, forward, residuals, cotangents):
    del forward
    A, chunk_starts, x, dt, B, C, keep = residuals
    dy, dfinal = cotangents

    def chunk_step(carry, chunk):
        start, x, dt, B, C, keep, dy = chunk

        def recompute(state, t):  # the state each token starts from (after its segment's reset)
            x_t, dt_t, B_t, keep_t = t
            previous = state * keep_t[:, None, None]
            return advance(update, A, previous, x_t, dt_t, B_t), previous

        _, previous = lax.scan(recompute, start, (x, dt, B, keep))

        def token(carry, t):
            g, dA = carry  # g: dL/dh_t from the tokens after t
            previous, x_t, dt_t, B_t, C_t, keep_t, dy_t = t
            (decay, weight), coefficients_vjp = jax.vjp(
                lambda A_, dt_, B_: coefficients(update, A_, dt_[..., None], B_[..., None, :]), A, dt_t, B_t)
            u = weight[..., 0] * x_t
            state = decay * previous + u[..., None] * B_t[..., None, :]
            g = g + dy_t[..., None] * C_t[..., None, :]
            dC = jnp.einsum("bdn,bd->bn", state, dy_t)
            du = jnp.einsum("bdn,bn->bd", g, B_t)
            dB = jnp.einsum("bdn,bd->bn", g, u)
            dA_t, ddt, dB_coefficients = coefficients_vjp((g * previous, (du * x_t)[..., None]))
            carry = (decay * g * keep_t[:, None, None], jax.tree.map(jnp.add, dA, dA_t))
            return carry, (du * weight[..., 0], ddt, dB + dB_coefficients, dC)

        return lax.scan(token, carry, (previous, x, dt, B, C, keep, dy), reverse=True)

    zero_A = jax.tree.map(jnp.zeros_like, A)
    (dstate0, dA), (dx, ddt, dB, dC) = lax.scan(chunk_step, (dfinal, zero_A),
                                               (chunk_starts, x, dt, B, C, keep, dy), reverse=True)
    return dA, dstate0, dx, ddt, dB, dC, jnp.zeros_like(keep)


_scan.defvjp(_scan_forward, _scan_backward)
selective_scan_xla = chunked_implementation(_forward)

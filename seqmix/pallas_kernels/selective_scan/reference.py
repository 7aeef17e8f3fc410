"""The oracle: the selective scan token by token (`lax.scan`, float32), the update and read of
`selective_scan.step` over a whole sequence (read that module for the two updates).

Packed rows follow `segments.scan_packed_rows`: padding leaves the state as it is and outputs
zeros, the state resets where a segment starts; `initial_state` is the state before the row's
first token.
"""

import jax.numpy as jnp

from seqmix.pallas_kernels.segments import scan_packed_rows
from seqmix.pallas_kernels.selective_scan.step import advance, read


def selective_scan_reference(x, dt, A, B, C, *, update, initial_state, segment_ids, chunk_size=None):
    """x, dt [Bt, T, D]; A [D, N] or None; B, C [Bt, T, N]; initial_state [Bt, D, N] float32 or
    None; segment_ids [Bt, T] or None. Returns (y [Bt, T, D] in x's dtype, final state [Bt, D, N]
    float32). `chunk_size` is accepted for a uniform signature and ignored."""
    del chunk_size
    A = None if A is None else A.astype(jnp.float32)
    time_major = lambda a: jnp.swapaxes(a.astype(jnp.float32), 0, 1)

    def recurrence(state, token):
        x_t, dt_t, B_t, C_t = token
        state = advance(update, A, state, x_t, dt_t, B_t)
        return read(state, C_t), state

    state0 = jnp.zeros(x.shape[:1] + (x.shape[2], B.shape[2]), jnp.float32) if initial_state is None \
        else initial_state.astype(jnp.float32)
    y, final_state = scan_packed_rows(recurrence, state0, tuple(map(time_major, (x, dt, B, C))), segment_ids)
    return jnp.swapaxes(y, 0, 1).astype(x.dtype), final_state

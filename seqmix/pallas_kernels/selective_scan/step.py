"""One token of the selective scan: the update and read that the decode step applies, that the
token-by-token oracle (`selective_scan.reference`) scans, and whose per-token coefficients every
implementation shares (the xla path and the GPU kernel call `coefficients`).

Per channel d and state element n, with a per-token step size dt_t [D] and B_t, C_t [N]:

    update="mamba"     (Mamba-1, zero-order hold of A, Euler step for B):
        h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    update="longhorn"  (Longhorn's implicit online-regression update; dt is its beta in (0, 1)):
        eps_t[d]  = dt_t[d] / (1 + dt_t[d] sum_n B_t[n]^2)
        h_t[d, n] = (1 - eps_t[d] B_t[n]^2) h_{t-1}[d, n] + eps_t[d] B_t[n] x_t[d]
    y_t[d] = sum_n C_t[n] h_t[d, n]
"""

import jax.numpy as jnp
from jax import lax

UPDATES = ("mamba", "longhorn")


def coefficients(update: str, A, dt, B):
    """(decay a [..., D, N], input weight w [..., D, 1]) of tokens with dt [..., D, 1] (a column
    per token) and B [..., 1, N] (a row), float32: h = a h + (w x) B.

    Mamba's decay exp(dt A) is in (0, 1] since dt > 0 > A. Longhorn's 1 - eps B_n^2 is computed as
    (1 + dt (s - B_n^2)) / (1 + dt s), s = |B|^2: the same number, in (0, 1] however large |B|
    grows, where 1 - eps B_n^2 in float32 could round to 0 or below (the only clamp:
    s - B_n^2 >= 0 against rounding). No log decay is needed: nothing is accumulated over tokens.
    """
    if update == "mamba":
        return jnp.exp(dt * A), dt
    norm = jnp.sum(B * B, axis=-1, keepdims=True)  # [..., 1, 1]
    others = jnp.maximum(norm - B * B, 0.0)  # [..., 1, N]: |B|^2 - B_n^2
    inverse = 1.0 / (1.0 + dt * norm)  # [..., D, 1]
    return (1.0 + dt * others) * inverse, dt * inverse


def advance(update: str, A, state, x, dt, B):
    """The state [..., D, N] after one token: x, dt [..., D] and B [..., N], float32."""
    dt, B = dt[..., :, None], B[..., None, :]
    decay, weight = coefficients(update, A, dt, B)
    return decay * state + weight * x[..., :, None] * B


def read(state, C):
    """y [..., D] = sum_n C[n] state[..., D, n]."""
    return jnp.einsum("...dn,...n->...d", state, C, precision=lax.Precision.HIGHEST)


def selective_scan_step(x, dt, A, B, C, state, *, update="mamba"):
    """One decode step for a batch of rows, with the semantics of `selective_scan`.

    x, dt [Bt, D]; A [D, N] (None for update="longhorn"); B, C [Bt, N]; state [Bt, D, N] float32.
    Returns (y [Bt, D] in x's dtype, new state [Bt, D, N] float32).
    """
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    state = advance(update, f32(A), state, f32(x), f32(dt), f32(B))
    return read(state, f32(C)).astype(x.dtype), state

"""The oracle: the direct O(T L) masked Toeplitz product, tap by tap (`lax.scan`, float32).

    y_t[d] = sum_{j=0}^{min(L-1, t - start(t))} filters[d, j] x_{t-j}[d]

where start(t) is the first token of t's segment: tap j reaches x_{t-j} only when t - j lies in
t's reset group (`segments.reset_groups`), padding reads nothing and outputs zeros.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.segments import reset_groups


def causal_conv_reference(x, filters, *, segment_ids):
    """x [B,T,D]; filters [D,L] float32 (L <= T); segment_ids [B,T] int or None.
    Returns y [B,T,D] in x's dtype."""
    batch, length, _ = x.shape
    valid, groups = reset_groups(segment_ids, batch, length)
    x32 = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
    taps = filters.shape[1]
    # Left-padded by L, so that x_{t-j} for j <= L is a static-size slice; the pad's group (-1)
    # matches no token.
    history = jnp.pad(x32, ((0, 0), (taps, 0), (0, 0)))
    history_groups = jnp.pad(groups, ((0, 0), (taps, 0)), constant_values=-1)

    def tap(y, j):
        shifted = lax.dynamic_slice_in_dim(history, taps - j, length, axis=1)
        same = lax.dynamic_slice_in_dim(history_groups, taps - j, length, axis=1) == groups
        return y + jnp.where(same[..., None], shifted, 0.0) * filters[:, j].astype(jnp.float32), None

    y, _ = lax.scan(tap, jnp.zeros(x32.shape, jnp.float32), jnp.arange(taps))
    return jnp.where(valid[..., None], y, 0.0).astype(x.dtype)

"""The one float32 gate array every implementation of a gated family takes.

An op accepts a per-key log decay `log_g [..., K]` or a per-head one `log_a [...]` (or neither);
its implementations see a single `log_gate [..., W]`, W = K or 1, which broadcasts over the keys
either way. Natural logs, <= 0.
"""

import jax.numpy as jnp


def log_gate_of(log_g, log_a, leading_shape):
    """float32 [..., W]: per-key log_g (W = K), per-head log_a (W = 1) or no decay (zeros, W = 1).
    leading_shape: the gates' shape without W (the value heads' [B, T, Hv] or [B, Hv])."""
    if log_g is not None and log_a is not None:
        raise ValueError("pass log_g (per-key decay) or log_a (per-head decay), not both")
    if log_g is not None:
        return log_g.astype(jnp.float32)
    if log_a is not None:
        return log_a.astype(jnp.float32)[..., None]
    return jnp.zeros(tuple(leading_shape) + (1,), jnp.float32)

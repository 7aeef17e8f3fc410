"""Gated DeltaProduct (Siems et al. 2025): n_h delta-rule (Householder) steps per token.

    q        = silu(conv(x W_q)),  k_{t,j}, v_{t,j} = silu(conv(x W_k)), silu(conv(x W_v))   j = 1..n_h
    q, k     = q / ||q||, k / ||k||,   beta_{t,j} = 2 sigmoid(x W_b)    (negative eigenvalues by default)
    log a_t  = -exp(A_log) * softplus(x W_a + dt_bias)                   (one decay per token and head)
    S_{t,0}  = a_t S_{t-1}
    S_{t,j}  = (I - beta_{t,j} k_{t,j} k_{t,j}^T) S_{t,j-1} + beta_{t,j} k_{t,j} v_{t,j}^T
    S_t      = S_{t,n_h},   o_t = S_t^T q_t / sqrt(K)
    y        = (RMSNorm(o) * silu(x W_g)) W_o

so the state transition of a token is a_t times a product of n_h generalized Householder matrices,
which lets the layer express more of the state tracking (permutations) than one delta step can.
n_h = 1 is Gated DeltaNet. As fla's implementation does, training runs `chunk_delta_rule` on a
sequence n_h times longer with the sub-steps interleaved (the decay on the first sub-step of a
token, queries zero on all but the last, segment ids repeated), and keeps the last sub-step's
outputs; decoding runs `delta_step` n_h times per token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from seqmix.configuration import require
from seqmix.mixers.delta_net import DeltaNet, GatedDeltaNetConfig
from seqmix.mixers.recurrent import RecurrentCache
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.delta import chunk_delta_rule, delta_step


@dataclasses.dataclass
class GatedDeltaProductConfig(GatedDeltaNetConfig):
    householder_steps: int = 2  # n_h: keys, values and betas per token
    negative_eigenvalues: bool = True  # beta in (0, 2): reflections, needed for state tracking

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.householder_steps >= 1, path, "householder_steps", f"must be >= 1, got {self.householder_steps}")


def _on_sub_step(x, steps: int, sub_step: int):
    """x [B, T, ...] -> [B, T * steps, ...]: x at each token's sub-step `sub_step` (0 or -1), zeros
    at its other sub-steps."""
    slots = [jnp.zeros_like(x)] * steps
    slots[sub_step] = x
    return _interleaved(jnp.stack(slots, axis=2))


def _interleaved(x):
    """[B, T, n, ...] -> [B, T * n, ...], each token's n sub-steps in a row."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def householder_product_rule(q, k, v, beta, *, log_a=None, segment_ids=None, initial_state=None,
                             output_final_state=False):
    """Gated DeltaProduct's recurrence, chunked, with `chunk_delta_rule`'s conventions.

    q [B, T, Hk, K]; k [B, T, n, Hk, K] (L2-normalised); v [B, T, n, H, V]; beta [B, T, n, H];
    log_a [B, T, H] float32 or None; segment_ids [B, T] or None; initial_state [B, H, K, V]
    float32 or None. Returns o [B, T, H, V] in q's dtype (read after each token's last sub-step),
    and the final state [B, H, K, V] float32 when output_final_state.
    """
    batch, length, steps = k.shape[:3]
    result = chunk_delta_rule(
        _on_sub_step(q, steps, -1), _interleaved(k), _interleaved(v), _interleaved(beta),
        log_a=None if log_a is None else _on_sub_step(log_a, steps, 0), initial_state=initial_state,
        segment_ids=None if segment_ids is None else jnp.repeat(segment_ids, steps, axis=1),
        output_final_state=output_final_state)
    out, final_state = result if output_final_state else (result, None)
    out = out.reshape(batch, length, steps, *out.shape[2:])[:, :, -1]
    return (out, final_state) if output_final_state else out


def householder_product_step(q, k, v, beta, state, *, log_a=None):
    """One decode step: q [B, Hk, K]; k [B, n, Hk, K]; v [B, n, H, V]; beta [B, n, H]; state
    [B, H, K, V] float32; log_a [B, H] or None. Returns (o [B, H, V], new state)."""
    for sub_step in range(k.shape[1]):
        out, state = delta_step(q, k[:, sub_step], v[:, sub_step], beta[:, sub_step], state,
                                log_a=log_a if sub_step == 0 else None)
    return out, state


@register_mixer("gated_deltaproduct", GatedDeltaProductConfig)
class GatedDeltaProduct(DeltaNet):
    """x [B, T, D] -> [B, T, D]; Gated DeltaNet's heads and dims, householder_steps keys, values
    and betas per token."""

    def token_axes(self, name: str, x) -> tuple[str | None, ...]:
        """k, v [B, T, n, H, -] and beta [B, T, n, H] carry the n sub-steps before the heads."""
        if name in ("k", "v", "beta"):
            return ("batch", "length", None, "heads") + (None,) * (x.ndim - 4)
        return super().token_axes(name, x)

    def recurrence(self, tokens: dict, cache: RecurrentCache | None, segment_ids, conv_tails):
        """DeltaNet's tokens (k, v, beta with the sub-steps folded into the heads, sub-step major)
        through `householder_product_rule`. Returns (o [B, T, H, V], the updated cache or None)."""
        q, k, v, beta = (tokens[name] for name in ("q", "k", "v", "beta"))
        steps = k.shape[2] // q.shape[2]
        sub_steps = lambda x: x.reshape(*x.shape[:2], steps, -1, *x.shape[3:])
        tokens = dict(tokens, k=sub_steps(k), v=sub_steps(v), beta=sub_steps(beta))
        return self.recur(householder_product_rule, householder_product_step, tokens, cache, segment_ids,
                          conv_tails=conv_tails)

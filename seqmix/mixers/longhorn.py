"""Longhorn ("Longhorn: State Space Models are Amortized Online Learners", Liu et al. 2024): a
state that solves online associative regression with a closed-form implicit update, in Mamba's
block.

Each channel d keeps a row S[d] [N] that regresses x_t[d] on the key k_t [N]; one step of the
implicit online update  argmin_s ||s - S_{t-1}||^2 + beta_t ||s^T k_t - x_t||^2  (per element
of the diagonal approximation the paper takes) is

    beta_t[d] = sigmoid(dt_t W_dt + b_dt)[d]                          (the learning rate, in (0, 1))
    eps_t[d]  = beta_t[d] / (1 + beta_t[d] sum_n k_t[n]^2)
    S_t[d, n] = (1 - eps_t[d] k_t[n]^2) S_{t-1}[d, n] + eps_t[d] x_t[d] k_t[n]
    y_t[d]    = sum_n q_t[n] S_t[d, n] + D[d] x_t[d]

with Mamba's block around it: x, z = x_in W_in; x = silu(conv1d(x)); dt, k, q = x W_x (k and q
where Mamba has B and C; no A: the forgetting comes from the key); out = (y * silu(z)) W_out.
The recurrence is `selective_scan(update="longhorn")`, the same op as Mamba's. As in the official
code (github.com/Cranial-XIX/longhorn) the dt projection's bias starts at 0 (beta ~ 1/2) and its
weight ~ U(+-dt_rank^-1/2) (PyTorch's Linear), D = 1.
Departures: the official code names the dt projection `dt_head` (here `dt_proj`, as Mamba's);
the decay 1 - eps k_n^2 is computed as (1 + beta (|k|^2 - k_n^2)) / (1 + beta |k|^2), the same
number, which stays in (0, 1] in float32 however large |k| grows, where the subtraction could
round to 0 or below (the only clamp: |k|^2 - k_n^2 >= 0 against rounding; no log of the decay is
ever taken, so nothing needs keeping away from log 0); projections are initialised as in `mamba`
(seqmix's N(0, init_std^2)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.mixers.mamba import MambaConfig, SelectiveScanBlock
from seqmix.mixers.registry import register_mixer


@register_mixer("longhorn", MambaConfig)
class Longhorn(SelectiveScanBlock):
    """Longhorn's mixer: x [B, T, D] -> [B, T, D], E = expand * D channels with N states each;
    its options are Mamba's (`MambaConfig`)."""

    update = "longhorn"

    def dt_bias_init(self, key, shape, dtype):
        del key
        return jnp.zeros(shape, dtype)

    def step_sizes(self, logits):
        return jax.nn.sigmoid(logits)

    def decay(self):
        return None

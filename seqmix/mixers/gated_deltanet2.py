"""Gated DeltaNet-2: the gated delta rule with a per-key decay and channel-wise erase and write gates.

    q, k, v  = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))     (per head after the convs)
    q, k     = q / ||q||, k / ||k||
    log g_t  = -exp(A_log) * softplus(x W_a + dt_bias)              (per head and key, <= 0)
    b_t      = sigmoid(x W_b)   (per head and key: how much of each key channel to erase)
    w_t      = sigmoid(x W_w)   (per head and value channel: how much of each value to write)
    S_t      = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T      S [K, V]
    o_t      = S_t^T q_t / sqrt(K)
    y        = (RMSNorm(o) * silu(x W_g)) W_o

With b_t = beta_t 1 and w_t = beta_t 1 this is Gated DeltaNet with KDA's per-key decay; the
channel-wise gates let a token erase along some key directions more than others and write only
some value channels. The transition is diagonal plus rank one, so the layer runs on `chunk_dplr`:
S_t = Diag(exp(g_t)) S_{t-1} + b'_t (a'_t^T S_{t-1}) + k_t v'^T_t with a' = exp(g) * b * k,
b' = -k and v' = w * v. Training is one chunked call; a cache carries the state and the
convolutions' tails (one `dplr_step` per decoded token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import l2_normalize
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer, decay_parameters, softplus_log_decay
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.dplr import chunk_dplr, dplr_step


@dataclasses.dataclass
class GatedDeltaNet2Config:
    conv_width: int = 4  # taps of the causal depthwise convolutions on q, k and v
    expand_v: float = 2.0  # value head dim = expand_v * head_dim

    def validate(self, path: str) -> None:
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")
        require(self.expand_v > 0, path, "expand_v", f"must be positive, got {self.expand_v}")


@register_mixer("gated_deltanet2", GatedDeltaNet2Config)
class GatedDeltaNet2(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim head_dim and value dim expand_v * head_dim."""

    CONVOLUTIONS = ("q_conv", "k_conv", "v_conv")

    def __init__(self, model_config, config: GatedDeltaNet2Config, *, rngs: nnx.Rngs):
        d_model, heads, key_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, key_dim, int(round(config.expand_v * key_dim)))
        self.init_output(model_config, self.value_dim, gated=True, rngs=rngs)
        std = model_config.init_std
        key_width, value_width = heads * self.key_dim, heads * self.value_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)
        self.q_conv = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.k_conv = ShortConvolution(key_width, config.conv_width, rngs=rngs)
        self.v_conv = ShortConvolution(value_width, config.conv_width, rngs=rngs)
        self.a_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs, keys_per_head=key_dim)
        self.b_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.w_proj = projection(d_model, value_width, ("embed", "heads"), std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        (q, k, v), tails = self.short_convolutions(
            x, ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv)), segment_ids, cache)
        q, k = (l2_normalize(self.split_heads(a)) for a in (q, k))
        log_g = softplus_log_decay(self.split_heads(self.a_proj(x)), self.A_log, self.dt_bias)
        erase, write = (jax.nn.sigmoid(self.split_heads(proj(x)).astype(jnp.float32))
                        for proj in (self.b_proj, self.w_proj))
        tokens = dict(q=q.astype(x.dtype), k=k.astype(x.dtype), v=(write * self.split_heads(v)).astype(x.dtype),
                      a=jnp.exp(log_g) * erase * k, b=-k, log_g=log_g)
        out, cache = self.recur(chunk_dplr, dplr_step, tokens, cache, segment_ids, conv_tails=tails)
        return self.output(out, x), cache

"""Lightning attention: linear attention with a fixed decay per head that weakens with depth.

    q, k, v   = silu(x W_q), silu(x W_k), silu(x W_v)
    S_t       = lambda_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t                 (no K^-1/2)
    lambda_h  = exp(-s_h (1 - l / (L - 1) + 1e-5))       (layer l of L; factor 1 + 1e-5 when L = 1)
    y         = (RMSNorm(o) * sigmoid(x W_g)) W_o

s_h are ALiBi's head slopes (2^(-8h/H), h = 1..H, for H a power of two), so the first layer's
heads forget on scales 1 / s_h of 2^(8/H) to 2^8 tokens and the last layer's hardly forget at all. Source:
MiniMax-01 (MiniMax 2025, arXiv 2501.08313) as in its reference modelling code (Hugging Face
transformers' `MiniMaxLightningAttention`, vLLM's `MiniMaxText01LinearAttention`): silu on q, k
and v, a sigmoid output gate, no score scaling; the recurrence and its depth schedule come from
TransNormerLLM (Qin et al. 2023, arXiv 2307.14995) and Lightning Attention-2 (arXiv 2401.04658).
One departure: o is RMS-normalised per head (the output head of every recurrent mixer here),
where MiniMax normalises all heads together.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.linear import projection
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class LightningConfig:
    """Lightning has no options: its decays follow from the head count and the layer's depth."""


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's slopes (Press et al. 2022): 2^(-8h/n) for h = 1..n with n = heads a power of two;
    otherwise those of the largest power of two n < heads, then every other slope of 2n."""
    geometric = lambda n: [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    power = 1 << (heads.bit_length() - 1)
    return geometric(power) + geometric(2 * power)[0::2][: heads - power]


def lightning_log_decays(heads: int, layer_index: int, n_layers: int) -> jax.Array:
    """log lambda_h = -s_h (1 - l / (L - 1) + 1e-5) of layer l = layer_index of L = n_layers,
    [H] float32; the 1e-5 keeps a little decay in the last layer."""
    depth = layer_index / max(n_layers - 1, 1)
    return -jnp.asarray(alibi_slopes(heads), jnp.float32) * (1.0 - depth + 1e-5)


@register_mixer("lightning", LightningConfig, depth_aware=True)
class LightningAttention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key and value dim head_dim."""

    def __init__(self, model_config, config: LightningConfig, *, layer_index: int, rngs: nnx.Rngs):
        del config
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, head_dim)
        self.init_output(model_config, head_dim, gated=True, rngs=rngs)
        self.layer_index, self.n_layers = layer_index, model_config.n_layers
        std, width = model_config.init_std, heads * head_dim
        self.q_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the decay
        orders the tokens). Returns (y [B, T, D], cache)."""
        del positions
        batch, length, _ = x.shape
        q, k, v = (jax.nn.silu(self.split_heads(proj(x))) for proj in (self.q_proj, self.k_proj, self.v_proj))
        log_a = jnp.broadcast_to(lightning_log_decays(self.heads, self.layer_index, self.n_layers),
                                 (batch, length, self.heads))
        out, cache = self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                                dict(q=q, k=k, v=v, log_a=log_a), cache, segment_ids)
        return self.output(out, x), cache

    def output(self, out, x):
        """o [B, T, H, V] -> y [B, T, D]: MiniMax's sigmoid gate on the normalised heads."""
        out = self.o_norm(out) * jax.nn.sigmoid(self.split_heads(self.g_proj(x)))
        return self.o_proj(out.reshape(*out.shape[:2], -1))

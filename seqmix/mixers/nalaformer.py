"""NaLaFormer's norm-aware linear attention (Meng et al. 2025, "NaLaFormer: Norm-Aware Linear
Attention for Transformer Models" / "Norm x Direction: Restoring the Missing Query Norm in Vision
Linear Attention"), causal.

Softmax attention's query norm acts as an inverse temperature: a long query gives a spiky,
low-entropy distribution. Linear attention's normalisation cancels the norm, so NaLaFormer splits
q and k into norm and direction and feeds the query norm back as a power on the direction, while
a sign split keeps the scores non-negative without zeroing the negative halves:

    phi_q(q) = [relu(q/||q||) ** p, relu(-q/||q||) ** p],   p = lambda (1/2 + tanh ||q||),  lambda = 3
    phi_k(k) = [relu(k) ** 3, relu(-k) ** 3]
    o_t      = sum_{s<=t} (phi_q(q_t).phi_k(k_s)) v_s / (sum_{s<=t} phi_q(q_t).phi_k(k_s) + eps)
    y_t      = (LayerNorm(o_t + LePE(v)_t) * silu(x_t W_g)) W_o

with q, k, v, g = x W_q, x W_k, x W_v, x W_g and LePE a depthwise convolution of v (the paper's
locally-enhanced positional encoding). The maps are `seqmix.layers.feature_maps.norm_aware_query`
and `norm_aware_key` (also `linear_attention`'s `feature_map: nalaformer`); the recurrence, its
normaliser column and its decode cache are `linear_attention.attend`'s.

Where this departs from the paper, whose models are vision backbones, and why:
- causal: sums over s <= t within the token's segment, as a language model needs; the paper's
  denominator is a mean over all N tokens and its numerator carries N^-1/2 N^-1/2, factors that
  cancel in the ratio, so the causal form is the plain ratio above.
- LePE is a causal depthwise convolution over the last `conv_width` tokens (the paper's is a 5x5
  convolution over the image), segment-aware and continued across decode calls.
- no rotary embedding: the paper rotates phi_q, phi_k by a 2-D RoPE in the numerator (its
  bidirectional attention is otherwise blind to order); a causal recurrence is ordered already,
  and leaving it out keeps one recurrence shared by numerator and normaliser.
- the maps follow the official code (ZacharyMeng/NaLaFormer, NALA.py): the query power's lambda = 3
  and the keys' fixed cube; and the paper's "cosine inhibition" is that code's sign split, under
  which dimensions where q and k point opposite ways contribute 0 instead of a negative score.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from seqmix.configuration import require
from seqmix.layers import feature_maps
from seqmix.layers.linear import projection
from seqmix.layers.norms import GroupNorm
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.linear_attention import attend
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer


@dataclasses.dataclass
class NaLaFormerConfig:
    conv_width: int = 4  # LePE's causal depthwise convolution over this many tokens

    def validate(self, path: str) -> None:
        require(self.conv_width >= 1, path, "conv_width", f"must be at least 1, got {self.conv_width}")


@register_mixer("nalaformer", NaLaFormerConfig)
class NaLaFormer(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of head_dim (2 * head_dim mapped keys), a state
    [2 * head_dim, head_dim + 1] per head (the last column: the normaliser)."""

    CONVOLUTIONS = ("lepe",)  # LePE, the value convolution

    def __init__(self, model_config, config: NaLaFormerConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, 2 * head_dim, head_dim + 1)
        std, width = model_config.init_std, heads * head_dim
        out_std = std / (2 * model_config.n_layers) ** 0.5
        self.q_proj, self.k_proj, self.v_proj, self.g_proj = (
            projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs) for _ in range(4))
        self.lepe = ShortConvolution(width, config.conv_width, activation=False, bias=True, rngs=rngs)
        self.norm = GroupNorm(width, 1, eps=model_config.norm_eps)  # one LayerNorm over all heads
        self.o_proj = projection(width, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the recurrence
        and LePE are ordered). Returns (y [B, T, D] in x's dtype, cache)."""
        del positions
        q = feature_maps.norm_aware_query(self.split_heads(self.q_proj(x)))
        k = feature_maps.norm_aware_key(self.split_heads(self.k_proj(x)))
        v = self.v_proj(x)
        lepe, tail = self.lepe(v, segment_ids=segment_ids, tail=None if cache is None else cache.conv_tails[0])
        out, cache = attend(self, q, k, self.split_heads(v), cache, segment_ids, normalize=True, conv_tails=(tail,))
        mixed = self.norm(out.reshape(lepe.shape) + lepe) * jax.nn.silu(self.g_proj(x).astype(out.dtype))
        return self.o_proj(mixed.astype(x.dtype)), cache

"""Linear attention: softmax(q k^T) v replaced by phi(q) (sum_j phi(k_j) v_j^T), a recurrence.

    S_t = S_{t-1} + phi(k_t) v_t^T,    o_t = phi(q_t)^T S_t  [ / (phi(q_t)^T z_t + eps),  z_t = sum phi(k_j) ]
    y   = RMSNorm(o) W_o

Feature maps: identity, elu+1, relu, softmax over the head dim, NaLaFormer's norm-aware maps (one
for queries, one for keys), or Hedgehog's learnable map (`seqmix.layers.feature_maps`). The
optional normaliser (positive maps only) rides in the same recurrence as an extra value column of
ones, so chunked training, prefill and decode share it (`attend`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers import feature_maps
from seqmix.layers.linear import projection
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

_NORMALIZER_EPS = 1e-6


@dataclasses.dataclass
class LinearAttentionConfig:
    feature_map: str = "elu"  # identity | elu | relu | softmax | nalaformer | hedgehog
    normalize: bool = True  # divide by phi(q).sum_j phi(k_j)

    def validate(self, path: str) -> None:
        require(self.feature_map in feature_maps.NAMES, path, "feature_map",
                f"must be one of {', '.join(feature_maps.NAMES)}, got {self.feature_map!r}")
        require(not self.normalize or self.feature_map in feature_maps.POSITIVE, path, "normalize",
                f"needs a positive feature map ({', '.join(feature_maps.POSITIVE)}), not {self.feature_map!r}")


@register_mixer("linear_attention", LinearAttentionConfig)
class LinearAttention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of head_dim (2 * head_dim keys with Hedgehog or NaLaFormer)."""

    def __init__(self, model_config, config: LinearAttentionConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        hedgehog = config.feature_map == "hedgehog"
        self.feature_map, self.normalize = config.feature_map, config.normalize
        # The state holds one more value column with the normaliser: the running sum of phi(k).
        key_dim = 2 * head_dim if config.feature_map in feature_maps.DOUBLING else head_dim
        self.init_state(heads, key_dim, head_dim + int(config.normalize))
        self.init_output(model_config, head_dim, gated=False, rngs=rngs)
        std, width = model_config.init_std, heads * head_dim
        self.q_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.q_map = nnx.data(feature_maps.Hedgehog(heads, head_dim) if hedgehog else None)
        self.k_map = nnx.data(feature_maps.Hedgehog(heads, head_dim) if hedgehog else None)

    def _phi(self, x, learned, *, key: bool):
        return feature_maps.apply_fixed(self.feature_map, x, key=key) if learned is None else learned(x)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        q = self._phi(self.split_heads(self.q_proj(x)), self.q_map, key=False)
        k = self._phi(self.split_heads(self.k_proj(x)), self.k_map, key=True)
        v = self.split_heads(self.v_proj(x))
        out, cache = attend(self, q, k, v, cache, segment_ids, normalize=self.normalize)
        return self.output(out.astype(x.dtype), x), cache


def attend(mixer: RecurrentMixer, q, k, v, cache: RecurrentCache | None, segment_ids, *, normalize: bool,
           conv_tails=()):
    """The undecayed recurrence of `mixer` over mapped q, k [B, T, H, K] and v [B, T, H, V]:
    o_t = phi(q_t)^T S_t, divided by phi(q_t)^T z_t + eps when `normalize` (the normaliser rides
    as an extra value column of ones, so training, prefill and decode share it). The feature maps
    stand in for softmax's scaling: no K^-0.5. Returns (o [B, T, H, V] float32, the updated cache
    (with `conv_tails`) or None)."""
    v = v.astype(jnp.float32)
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    out, cache = mixer.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                             dict(q=q, k=k, v=v), cache, segment_ids, conv_tails=conv_tails)
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + _NORMALIZER_EPS)
    return out, cache

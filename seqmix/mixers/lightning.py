"""Lightning attention (MiniMax-01): linear attention with a fixed decay per head that weakens with
depth, exactly as MiniMax's checkpoints compute it.

    q, k, v   = silu(x W_q), silu(x W_k), silu(x W_v)
    S_t       = lambda_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t           (no K^-1/2, no normaliser)
    lambda_h  = exp(-s_h),  s_h = 2^(-8 (h + 1) / H) (1 - l / (L - 1 + 1e-5) + 1e-5)   (layer l of L, h < H)
    y         = (RMSNorm(o over all H heads together, eps 1e-6) * sigmoid(x W_g)) W_o

So the first layer's heads forget on scales of 2^(8/H) to 2^8 tokens and the last layer's hardly
forget at all. Source: MiniMax-01 (MiniMax 2025, arXiv 2501.08313) as in Hugging Face transformers'
`MiniMaxLightningAttention` (5.24), whose formula this is to the last term (the slopes are
2^(-8/H) to the powers 1..H for every H, not ALiBi's interleaving for H not a power of two; the
depth term divides by L - 1 + 1e-5); the recurrence and its depth schedule come from
TransNormerLLM (Qin et al. 2023, arXiv 2307.14995) and Lightning Attention-2 (arXiv 2401.04658).
MiniMax computes it in blocks of `block_size` tokens from tables of decays that its checkpoints
store; seqmix's chunked scan does not depend on the block size, which only sizes those tables
(`seqmix.models.hf.minimax` reads and writes them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

OUTPUT_NORM_EPS = 1e-6  # MiniMax's output norm, whatever the model's norm_eps


@dataclasses.dataclass
class LightningConfig:
    """The decays follow from the head count and the layer's depth; block_size is MiniMax's block
    length, which sizes the decay tables its checkpoints carry (the result does not depend on it)."""

    block_size: int = 256

    def validate(self, path: str) -> None:
        require(self.block_size >= 1, path, "block_size", f"must be >= 1, got {self.block_size}")


def lightning_slopes(heads: int, layer_index: int, n_layers: int) -> np.ndarray:
    """s_h of layer l = layer_index of L = n_layers, [H] float32 (lambda_h = exp(-s_h)): MiniMax's
    2^(-8 (h + 1) / H) (1 - l / (L - 1 + 1e-5) + 1e-5); the 1e-5 keeps a little decay in the last layer."""
    base = 1.0 / 2.0 ** (8.0 / heads)
    return (base ** np.arange(1, heads + 1) * (1.0 - layer_index / (n_layers - 1 + 1e-5) + 1e-5)).astype(np.float32)


@register_mixer("lightning", LightningConfig, depth_aware=True)
class LightningAttention(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key and value dim head_dim. Parameters q_proj,
    k_proj, v_proj, g_proj [D, H * head_dim], o_norm [H * head_dim], o_proj [H * head_dim, D]."""

    def __init__(self, model_config, config: LightningConfig, *, layer_index: int, rngs: nnx.Rngs):
        del config
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, head_dim)
        self.layer_index, self.n_layers = layer_index, model_config.n_layers
        std, width = model_config.init_std, heads * head_dim
        out_std = std / (2 * model_config.n_layers) ** 0.5
        self.q_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.g_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.o_norm = RMSNorm(width, eps=OUTPUT_NORM_EPS)
        self.o_proj = projection(width, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the decay
        orders the tokens). Returns (y [B, T, D], cache)."""
        del positions
        batch, length, _ = x.shape
        q, k, v = (jax.nn.silu(self.split_heads(proj(x))) for proj in (self.q_proj, self.k_proj, self.v_proj))
        log_a = jnp.broadcast_to(-lightning_slopes(self.heads, self.layer_index, self.n_layers),
                                 (batch, length, self.heads))
        out, cache = self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                                dict(q=q, k=k, v=v, log_a=log_a), cache, segment_ids)
        return self.output(out, x), cache

    def output(self, out, x):
        """o [B, T, H, V] -> y [B, T, D]: MiniMax's norm over all heads, its sigmoid gate, o_proj."""
        out = self.o_norm(out.reshape(*out.shape[:2], -1))
        return self.o_proj(out * jax.nn.sigmoid(self.g_proj(x)).astype(out.dtype))

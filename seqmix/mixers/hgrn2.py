"""HGRN2: a gated linear RNN whose forget gate also sets the input gate, with its hidden state
expanded to an outer product (Qin et al. 2024), i.e. GLA with keys tied to the forget gate.

    f_t = sigmoid(x W_f)  (per head and key),  k_t = 1 - f_t,  log g_t = log f_t = logsigmoid(x W_f)
    S_t = diag(f_t) S_{t-1} + k_t v_t^T,       o_t = S_t^T q_t,      v_t = x W_i
    y   = RMSNorm(o) W_o

This is the gate of HGRN2's first layer; the paper's lower bounds on f, which grow with depth
and are learned jointly across layers, are not modelled (a mixer sees only its own layer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class HGRN2Config:
    expand_k: float = 1.0  # key (state expansion) dim per head = expand_k * head_dim

    def validate(self, path: str) -> None:
        require(self.expand_k > 0, path, "expand_k", f"must be positive, got {self.expand_k}")


@register_mixer("hgrn2", HGRN2Config)
class HGRN2(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key dim expand_k * head_dim, value dim head_dim."""

    def __init__(self, model_config, config: HGRN2Config, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, max(1, int(round(config.expand_k * head_dim))), head_dim)
        self.init_output(model_config, head_dim, gated=False, rngs=rngs)
        std, key_width = model_config.init_std, heads * self.key_dim
        self.q_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.f_proj = projection(d_model, key_width, ("embed", "heads"), std=std, rngs=rngs)
        self.i_proj = projection(d_model, heads * head_dim, ("embed", "heads"), std=std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache)."""
        del positions
        forget_logits = self.split_heads(self.f_proj(x)).astype(jnp.float32)
        tokens = dict(q=self.split_heads(self.q_proj(x)), k=1.0 - jax.nn.sigmoid(forget_logits),
                      v=self.split_heads(self.i_proj(x)), log_g=jax.nn.log_sigmoid(forget_logits))
        # The gates already bound the state (k = 1 - f): no K^-0.5.
        out, cache = self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                                tokens, cache, segment_ids)
        return self.output(out.astype(x.dtype), x), cache

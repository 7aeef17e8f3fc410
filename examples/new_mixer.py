"""A new mixer in one file, outside the package: linear attention with a learned, data-dependent
decay per head (log a = logsigmoid(x W_a + 4)). `new_mixer.yaml` beside it names this file in
`model.imports`, so the stock command line trains, samples from and evaluates a model of it:

    seqmix train examples/new_mixer.yaml
    seqmix generate runs/new_mixer --prompt "ROMEO:"
    seqmix eval runs/new_mixer
"""

import dataclasses

import jax
import jax.numpy as jnp

import seqmix
from seqmix.layers.linear import projection
from seqmix.mixers.recurrent import RecurrentMixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class DecayingAttentionConfig:
    decay_bias: float = 4.0  # sigmoid(4) = 0.98: a memory of ~50 tokens at initialisation

    def validate(self, path: str) -> None:
        pass


@seqmix.register_mixer("decaying_attention", DecayingAttentionConfig)
class DecayingAttention(RecurrentMixer):
    def __init__(self, model_config, config, *, rngs):
        d_model, heads, dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, dim, dim)  # one [dim, dim] state per head
        self.init_output(model_config, dim, gated=True, rngs=rngs)  # RMSNorm, silu gate, o_proj
        self.qkv = projection(d_model, 3 * heads * dim, ("embed", "heads"), std=model_config.init_std, rngs=rngs)
        self.a_proj = projection(d_model, heads, ("embed", "heads"), std=model_config.init_std, rngs=rngs)
        self.decay_bias = config.decay_bias

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        q, k, v = jnp.split(self.split_heads(self.qkv(x)), 3, axis=-1)
        log_a = jax.nn.log_sigmoid(self.a_proj(x).astype(jnp.float32) + self.decay_bias)
        # Training: one chunked call; decoding: one step per token from the cached state.
        out, cache = self.recur(chunk_gla, gla_step, dict(q=q, k=k, v=v, log_a=log_a), cache, segment_ids)
        return self.output(out, x), cache


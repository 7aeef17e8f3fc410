"""RWKV-6 (Finch) time mixing: data-dependent token shift and a data-dependent per-key decay.

    x'_t    = x_{t-1} within t's segment (0 at a segment start),  dx_t = x'_t - x_t
    m_f     = tanh((x_t + mu_x dx_t) A) B_f                     (one shared low-rank LoRA, f in r, k, v, w, g)
    x_f     = x_t + (mu_f + m_f) dx_t                           (ddlerp: a per-channel mix of x_t and x'_t)
    r, k, v = x_r W_r, x_k W_k, x_v W_v
    log w_t = -exp(w0 + tanh(x_w A_w) B_w)                      (per head and key, float32, <= 0)
    o_t     = r_t^T (S_{t-1} + diag(u) k_t v_t^T),    S_t = diag(w_t) S_{t-1} + k_t v_t^T
    y       = (RMSNorm(o) * silu(x_g W_g)) W_o

The receptance reads the state before the current token; the current token enters only through
the bonus u. `chunk_gla` is inclusive (o_t = q_t^T S'_t), so it runs on keys, values and decays
moved one token later within each segment, which makes S'_t = S_{t-1}; the bonus term is added
apart, and the cache keeps the full state S_T (one more update with the last token), so a call
never has to know the previous call's last key.

The initialisation follows RWKV-6 and depends on depth: mixing coefficients and decays spread
across channels (decays from exp(-exp(-6)) to exp(-exp(-1))), so that memories span short and long.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.token_shift import previous_tokens, shift, take, token_shift
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step

BRANCHES = ("r", "k", "v", "w", "g")  # the inputs ddlerp mixes, in the order of mu and mix_up


@dataclasses.dataclass
class RWKV6Config:
    mix_rank: int = 32  # rank of the token-shift LoRA shared by the five branches
    decay_rank: int = 64  # rank of the decay LoRA

    def validate(self, path: str) -> None:
        for key in ("mix_rank", "decay_rank"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")


@register_mixer("rwkv6", RWKV6Config, depth_aware=True)
class RWKV6(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads with key and value dims head_dim."""

    def __init__(self, model_config, config: RWKV6Config, *, layer_index: int, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, head_dim)
        self.init_output(model_config, head_dim, gated=True, rngs=rngs)
        std, width = model_config.init_std, heads * head_dim
        self.r_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)

        # RWKV-6's depth ratios: 0 -> 1 and 1 -> almost 0 from the first layer to the last.
        depth = layer_index / max(model_config.n_layers - 1, 1)
        shallowness = 1.0 - layer_index / model_config.n_layers
        channel = jnp.arange(d_model, dtype=jnp.float32) / d_model
        mix, faster = 1.0 - channel ** shallowness, 1.0 - channel ** (0.5 * shallowness)
        mixes = {"r": faster, "k": mix, "v": mix - 0.3 * depth, "w": mix, "g": faster}
        self.mu_x = nnx.Param(mix, out_sharding=("embed",), eager_sharding=False)
        self.mu = nnx.Param(jnp.stack([mixes[name] for name in BRANCHES]), out_sharding=(None, "embed"),
                            eager_sharding=False)
        # Both halves of each LoRA start small and random (RWKV-6 zeroes the first), so that both
        # get a gradient from the first step.
        self.mix_down = projection(d_model, len(BRANCHES) * config.mix_rank, ("embed", None), std=std, rngs=rngs)
        self.mix_up = nnx.Param(std * jax.random.normal(rngs.params(), (len(BRANCHES), config.mix_rank, d_model)),
                                out_sharding=(None, None, "embed"), eager_sharding=False)
        self.decay_down = projection(d_model, config.decay_rank, ("embed", None), std=std, rngs=rngs)
        self.decay_up = projection(config.decay_rank, width, (None, "heads"), std=std, rngs=rngs)
        key = jnp.arange(width)
        spread = key.astype(jnp.float32) / max(width - 1, 1)  # 0 -> 1 over all heads' keys
        self.decay_base = nnx.Param(-6.0 + 5.0 * spread ** (0.7 + 1.3 * depth), out_sharding=("heads",),
                                    eager_sharding=False)
        bonus = depth * (1.0 - spread) + ((key + 1) % 3 - 1) * 0.1
        self.bonus = nnx.Param(bonus.reshape(heads, head_dim), out_sharding=("heads", None), eager_sharding=False)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache); the cache's conv_tails
        hold the last input [B, 1, D] for the next call's token shift."""
        del positions
        batch, length, _ = x.shape
        previous, same, last = previous_tokens(segment_ids, batch, length)
        x_prev, next_tail = token_shift(x, previous, same, last, None if cache is None else cache.conv_tails[0])
        mixed = self.ddlerp(x, x_prev - x)
        r, k, v = (self.split_heads(proj(mixed[name])) for name, proj in
                   (("r", self.r_proj), ("k", self.k_proj), ("v", self.v_proj)))
        log_w = self.log_decay(mixed["w"])
        tokens = dict(q=r, k=shift(k, previous, same), v=shift(v, previous, same), log_g=shift(log_w, previous, same))
        out, cache = self.recur(functools.partial(chunk_gla, scale=1.0), functools.partial(gla_step, scale=1.0),
                                tokens, cache, segment_ids, conv_tails=(next_tail,))
        bonus = jnp.einsum("bthk,hk,bthk->bth", r.astype(jnp.float32), self.bonus[...], k.astype(jnp.float32))
        out = out.astype(jnp.float32) + bonus[..., None] * v.astype(jnp.float32)
        if cache is not None:
            _, state = gla_step(*(take(a, last)[:, 0] for a in (r, k, v)), cache.state,
                                log_g=take(log_w, last)[:, 0], scale=1.0)
            cache = cache.replace(state=jnp.where((last >= 0)[:, :, None, None], state, cache.state))
        return self.output(out.astype(x.dtype), mixed["g"]), cache

    def ddlerp(self, x, dx):
        """x, dx [B, T, D] -> {branch: x + (mu_f + m_f) dx [B, T, D]} for the branches r, k, v, w, g."""
        lora = jnp.tanh(self.mix_down(x + self.mu_x[...].astype(x.dtype) * dx))
        lora = lora.reshape(*lora.shape[:2], len(BRANCHES), -1)
        lora = jnp.einsum("btfr,frd->btfd", lora, self.mix_up[...].astype(x.dtype))
        coefficients = self.mu[...].astype(x.dtype) + lora
        return {name: x + coefficients[:, :, i] * dx for i, name in enumerate(BRANCHES)}

    def log_decay(self, x_w):
        """x_w [B, T, D] -> log w [B, T, H, K] float32, <= 0."""
        logits = self.decay_up(jnp.tanh(self.decay_down(x_w))).astype(jnp.float32) + self.decay_base[...]
        return self.split_heads(-jnp.exp(logits))

    def empty_tails(self, batch: int, dtype) -> tuple[jax.Array, ...]:
        """The token shift's last input, [B, 1, D] zeros, where the short convolutions' tails would be."""
        return (jnp.zeros((batch, 1, self.mu_x.shape[0]), dtype),)

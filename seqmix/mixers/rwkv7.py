"""RWKV-7 "Goose" time mixing (Peng et al. 2025), as fla's `RWKV7Attention`: the generalized delta
rule with a vector-valued decay and in-context learning rate, on the DPLR op.

    x'_t      = x_{t-1} within t's segment (0 at a segment start)
    x_f       = x_t + mu_f (x'_t - x_t)                   f in r, w, k, v, a, g  (learned per-channel lerp)
    r, k, v   = x_r W_r, x_k W_k, x_v W_v
    log w_t   = -exp(-1/2) sigmoid(w_0 + tanh(x_w A_w) B_w)        (per head and key, in [-0.61, 0))
    a_t       = sigmoid(a_0 + x_a A_a B_a)                         (in-context learning rate, per key)
    kappa_hat = normalize(k_t * k_k)                                (per head: the removal key)
    k~_t      = k_t * (1 + (a_t - 1) * k_a)                         (the replacement key)
    S_t       = (Diag(w_t) - (a_t * kappa_hat) kappa_hat^T) S_{t-1} + k~_t v_t^T     S [K, V]
    o_t       = GroupNorm(S_t^T r_t) + (sum_k r_t * k~_t * r_k) v_t             (per head: the bonus)
    y         = (o * (sigmoid(x_g A_g) B_g)) W_o

The recurrence is `chunk_dplr` with log_g = log w, a = -kappa_hat, b = kappa_hat * a_t, scale 1;
it reads the state after the current token (inclusive), so no shifting as in RWKV-6. RWKV-7
dropped RWKV-6's data-dependent token shift (ddlerp) for the plain learned lerp above, which is
what fla's layer does too.

Value residual: RWKV-7 mixes each later layer's value with the first layer's,
v = lerp(v, v_first, sigmoid(v_0 + x_v A_v B_v)). seqmix's blocks pass a mixer only its own
input and cache (`models.lm.Block`), so no value can travel from the first layer to later ones;
with the layer's own value in place of v_first the lerp is the identity, so every layer here is
RWKV-7's first layer (no v LoRA). Threading v_first through the blocks would change the mixer
protocol for every model (decode caches, attention transfer), which is the model assembly's call.

Initialisation follows RWKV-7's (mixing coefficients, decay and learning-rate biases spread over
channels with depth, k_k, k_a, r_k, the norm's weight); both halves of each LoRA start small and
random, and o_proj is not zeroed, so that every parameter gets a gradient from the first step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import GroupNorm, l2_normalize
from seqmix.layers.partitioning import logical
from seqmix.layers.token_shift import previous_tokens, token_shift
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.dplr import chunk_dplr, dplr_step

BRANCHES = ("r", "w", "k", "v", "a", "g")  # the inputs the token shift mixes
MAX_DECAY_RATE = 0.6065306597126334  # exp(-1/2): log w = -exp(-1/2) sigmoid(.) >= -0.61 per token


@dataclasses.dataclass
class RWKV7Config:
    decay_rank: int = 32  # rank of the decay LoRA (w)
    learning_rate_rank: int = 32  # rank of the in-context learning rate LoRA (a)
    gate_rank: int = 64  # rank of the output gate LoRA (g)

    def validate(self, path: str) -> None:
        for key in ("decay_rank", "learning_rate_rank", "gate_rank"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")


class LoRA(nnx.Module):
    """x [B, T, D_in] -> up(activation(down(x))) [B, T, D_out]: fla's `LoRA` (down without bias,
    activation None for none, up with a bias initialised to `bias_init` [D_out] when given)."""

    def __init__(self, in_dim: int, rank: int, out_dim: int, *, activation, bias_init=None, std: float,
                 rngs: nnx.Rngs):
        self.activation = activation
        self.down = projection(in_dim, rank, ("embed", None), std=std, rngs=rngs)
        self.up = nnx.Linear(rank, out_dim, use_bias=bias_init is not None, dtype=None, param_dtype=jnp.float32,
                             kernel_init=logical(nnx.initializers.normal(std), None, "heads"),
                             bias_init=logical(lambda *_: bias_init, "heads"), rngs=rngs)

    def __call__(self, x):
        hidden = self.down(x)
        return self.up(hidden if self.activation is None else self.activation(hidden))


@register_mixer("rwkv7", RWKV7Config, depth_aware=True)
class RWKV7(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads with key and value dims head_dim."""

    def __init__(self, model_config, config: RWKV7Config, *, layer_index: int, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, head_dim)
        self.d_model, width = d_model, heads * head_dim
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5

        # RWKV-7's depth ratios and channel ramps (0 -> 1 and 1 -> almost 0 from the first layer to the last).
        depth = layer_index / max(model_config.n_layers - 1, 1)
        shallowness = 1.0 - layer_index / model_config.n_layers
        channel = jnp.arange(d_model, dtype=jnp.float32) / d_model
        exponents = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        param = lambda value, *axes: nnx.Param(value, out_sharding=axes, eager_sharding=False)
        for name in BRANCHES:
            setattr(self, f"x_{name}", param(1.0 - channel ** (exponents[name] * shallowness), "embed"))
        key = jnp.arange(width, dtype=jnp.float32)
        linear = key / max(width - 1, 1) - 0.5
        zigzag = ((key % head_dim) - (head_dim - 1) / 2) / max((head_dim - 1) / 2, 1)
        zigzag = zigzag * jnp.abs(zigzag)
        decay_bias = -6.0 + 6.0 * (key / max(width - 1, 1)) ** (1.0 + depth ** 0.3) + 0.5 + 2.5 * zigzag

        self.r_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.w_lora = LoRA(d_model, config.decay_rank, width, activation=jnp.tanh, bias_init=decay_bias, std=std,
                           rngs=rngs)
        self.a_lora = LoRA(d_model, config.learning_rate_rank, width, activation=None,
                           bias_init=-0.19 + 0.3 * zigzag + 0.4 * linear, std=std, rngs=rngs)
        self.g_lora = LoRA(d_model, config.gate_rank, width, activation=jax.nn.sigmoid, std=std, rngs=rngs)
        self.k_k = param(0.71 - 0.1 * linear, "heads")
        self.k_a = param(jnp.full((width,), 1.02, jnp.float32), "heads")
        self.r_k = param(jnp.full((heads, head_dim), -0.04, jnp.float32), "heads", None)
        self.g_norm = GroupNorm(width, heads, eps=head_dim * model_config.norm_eps,
                                scale=((layer_index + 1) / model_config.n_layers) ** 0.7)
        self.o_proj = projection(width, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache); the cache's conv_tails
        hold the last input [B, 1, D] for the next call's token shift."""
        del positions
        batch, length, _ = x.shape
        previous, same, last = previous_tokens(segment_ids, batch, length)
        x_prev, next_tail = token_shift(x, previous, same, last, None if cache is None else cache.conv_tails[0])
        mixed = {name: x + getattr(self, f"x_{name}")[...].astype(x.dtype) * (x_prev - x) for name in BRANCHES}
        r, k, v = self.r_proj(mixed["r"]), self.k_proj(mixed["k"]), self.v_proj(mixed["v"])
        log_w = -MAX_DECAY_RATE * jax.nn.sigmoid(self.w_lora(mixed["w"]).astype(jnp.float32))
        learning_rate = jax.nn.sigmoid(self.a_lora(mixed["a"]).astype(jnp.float32))
        k = k.astype(jnp.float32)
        removal_key = l2_normalize(self.split_heads(k * self.k_k[...]))
        k = self.split_heads(k * (1.0 + (learning_rate - 1.0) * self.k_a[...]))
        r, v = self.split_heads(r), self.split_heads(v)
        tokens = dict(q=r, k=k.astype(x.dtype), v=v, a=-removal_key,
                      b=removal_key * self.split_heads(learning_rate), log_g=self.split_heads(log_w))
        out, cache = self.recur(functools.partial(chunk_dplr, scale=1.0), functools.partial(dplr_step, scale=1.0),
                                tokens, cache, segment_ids, conv_tails=(next_tail,))
        bonus = jnp.einsum("bthk,hk,bthk->bth", r.astype(jnp.float32), self.r_k[...], k)
        out = self.g_norm(out.reshape(batch, length, -1).astype(jnp.float32))
        out = out + (bonus[..., None] * v.astype(jnp.float32)).reshape(batch, length, -1)
        return self.o_proj((out * self.g_lora(mixed["g"]).astype(jnp.float32)).astype(x.dtype)), cache

    def empty_tails(self, batch: int, dtype) -> tuple[jax.Array, ...]:
        """The token shift's last input, [B, 1, D] zeros, where the short convolutions' tails would be."""
        return (jnp.zeros((batch, 1, self.d_model), dtype),)

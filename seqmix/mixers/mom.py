"""Mixture-of-Memories (MoM, Du et al. 2025): a router sends each token to top_k of several
gated delta rule memories, plus one shared memory every token uses.

    p_t      = softmax(x_t W_router)                         (over the M routed memories)
    R_t      = top_k(p_t),     g_{t,m} = p_{t,m} / sum_{j in R_t} p_{t,j}  for m in R_t, else 0
    q        = silu(conv(x W_q))                             (shared by all memories)
    k^m, v^m = silu(conv(x W_k^m)), silu(conv(x W_v^m)),   q, k^m L2-normalised per head
    beta^m   = sigmoid(x W_b^m),  log a^m = -exp(A_log^m) softplus(x W_a^m + dt_bias^m)
    S^m_t    = a^m_t S^m_{t-1} (I - beta^m_t k^m_t k^m_t^T) + beta^m_t k^m_t v^m_t^T   if m in R_t
             = S^m_{t-1}                                                               otherwise
    o_t      = S^shared_t^T q_t + sum_{m in R_t} g_{t,m} S^m_t^T q_t          (each scaled by 1/sqrt(K))
    y        = (RMSNorm(o) * silu(x W_g)) W_o

The memories are laid out as extra heads of one `chunk_delta_rule` call: a memory a token does not
reach gets beta = 0 and log a = 0 there, which leaves it as it was. The convolutions run along
the whole sequence before routing (the paper's implementation convolves each memory's own tokens).

Load balancing (`routing.load_balance`, Switch Transformer's, over the batch's real tokens):
aux = aux_loss_weight * M * sum_m f_m P_m, which is aux_loss_weight at perfect balance. The mixer
sows it as an `nnx.Intermediate` named "aux_loss" under `nnx.capture` (the trainer adds every such
value to the loss); outside a capture, sowing does nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers import routing
from seqmix.layers.linear import projection
from seqmix.layers.norms import l2_normalize
from seqmix.layers.short_conv import ShortConvolution
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer, decay_parameters, softplus_log_decay
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.delta import chunk_delta_rule, delta_step


@dataclasses.dataclass
class MoMConfig:
    num_memories: int = 4  # routed memories (M)
    top_k: int = 2  # memories each token updates and reads
    shared_memory: bool = True  # one more memory, updated and read by every token
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss
    conv_width: int = 4  # taps of the causal depthwise convolutions on q, k and v

    def validate(self, path: str) -> None:
        require(self.num_memories >= 1, path, "num_memories", f"must be >= 1, got {self.num_memories}")
        require(1 <= self.top_k <= self.num_memories, path, "top_k",
                f"must be in [1, num_memories={self.num_memories}], got {self.top_k}")
        require(self.aux_loss_weight >= 0, path, "aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")
        require(self.conv_width >= 1, path, "conv_width", f"must be >= 1, got {self.conv_width}")


@register_mixer("mom", MoMConfig)
class MixtureOfMemories(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of key and value dim head_dim, each with
    num_memories (+ 1 shared) memories; its cache's state is [B, memories * H, K, V] float32,
    memory-major."""

    CONVOLUTIONS = ("q_conv", "k_conv", "v_conv")

    def __init__(self, model_config, config: MoMConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.num_memories, self.top_k, self.aux_loss_weight = config.num_memories, config.top_k, config.aux_loss_weight
        self.shared_memory = config.shared_memory
        self.memories = config.num_memories + int(config.shared_memory)  # states per head, the shared one last
        self.init_state(heads, head_dim, head_dim, memories=self.memories)
        self.init_output(model_config, head_dim, gated=True, rngs=rngs)
        std, width, slots = model_config.init_std, heads * head_dim, self.memories * heads
        self.router = projection(d_model, config.num_memories, ("embed", None), std=std, rngs=rngs)
        self.q_proj = projection(d_model, width, ("embed", "heads"), std=std, rngs=rngs)
        self.k_proj = projection(d_model, self.memories * width, ("embed", "heads"), std=std, rngs=rngs)
        self.v_proj = projection(d_model, self.memories * width, ("embed", "heads"), std=std, rngs=rngs)
        self.b_proj = projection(d_model, slots, ("embed", "heads"), std=std, rngs=rngs)
        self.a_proj = projection(d_model, slots, ("embed", "heads"), std=std, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(slots, rngs)
        self.q_conv = ShortConvolution(width, config.conv_width, rngs=rngs)
        self.k_conv = ShortConvolution(self.memories * width, config.conv_width, rngs=rngs)
        self.v_conv = ShortConvolution(self.memories * width, config.conv_width, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: RecurrentCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (no position
        encoding: the recurrence is ordered). Returns (y [B, T, D], cache); sows the
        load-balancing loss (see the module docstring)."""
        del positions
        batch, length, _ = x.shape
        weights, chosen = self.route(x, segment_ids)
        if self.shared_memory:
            weights = jnp.concatenate([weights, jnp.ones((batch, length, 1), jnp.float32)], axis=-1)
            chosen = jnp.concatenate([chosen, jnp.ones((batch, length, 1), bool)], axis=-1)
        (q, k, v), tails = self.short_convolutions(
            x, ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv)), segment_ids, cache)
        slots = (batch, length, self.memories * self.heads, -1)  # memory-major: slot m * H + h
        # Every memory of a head reads with the same query.
        q = jnp.tile(l2_normalize(self.split_heads(q)), (1, 1, self.memories, 1)).astype(x.dtype)
        k = l2_normalize(k.reshape(slots)).astype(x.dtype)
        per_slot = jnp.repeat(chosen, self.heads, axis=-1)  # [B, T, memories * H]
        beta = jnp.where(per_slot, jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32)), 0.0)
        log_a = jnp.where(per_slot, softplus_log_decay(self.a_proj(x), self.A_log, self.dt_bias), 0.0)
        tokens = dict(q=q, k=k, v=v.reshape(slots), beta=beta, log_a=log_a)
        out, cache = self.recur(chunk_delta_rule, delta_step, tokens, cache, segment_ids, conv_tails=tails)
        out = out.reshape(batch, length, self.memories, self.heads, self.value_dim).astype(jnp.float32)
        out = jnp.einsum("btmhv,btm->bthv", out, weights)
        return self.output(out.astype(x.dtype), x), cache

    def route(self, x, segment_ids):
        """x [B, T, D] -> (weights [B, T, M] float32: the top_k router probabilities of each token
        renormalised to sum to 1, 0 for the other memories; chosen [B, T, M] bool: its top_k).
        Sows the load-balancing loss over the real tokens (segment_ids != 0)."""
        chosen = routing.route(self.router(x), self.top_k, scoring="softmax", renormalize=True)
        one_hot = jax.nn.one_hot(chosen.experts, self.num_memories, dtype=jnp.float32)  # [B, T, k, M]
        real = None if segment_ids is None else segment_ids != 0
        # capture_noop: outside nnx.capture (decoding, plain forwards) the module stays unchanged.
        self.sow(nnx.Intermediate, "aux_loss", self.aux_loss_weight * routing.load_balance(chosen, real),
                 capture_noop=True)
        return jnp.einsum("btkm,btk->btm", one_hot, chosen.weights), jnp.any(one_hot > 0, axis=-2)

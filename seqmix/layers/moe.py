"""Mixture-of-experts feed-forward layer (Mixtral, Qwen3-Next, DeepSeek-V3, Kimi Linear and
Nemotron-H): a router (`routing`) sends each token to top_k of num_experts experts; optional
shared experts run on every token.

    y = sum_{e in chosen(x)} w_e(x) MLP_e(x)  +  [sigmoid(x W_shared_gate)] MLP_shared(x)

The experts are gated MLPs, down(act(gate x) * up x) (SwiGLU with act silu), or with `gated`
false plain ones, down(act(up x)) (Nemotron-H's squared ReLU); the shared expert is of the same
form. With a `latent_size` L the routed experts work in a narrower space (Nemotron-H's latent
MoE): their part becomes (sum_e w_e(x) MLP_e(x W_fc1)) W_fc2, each token projected into L and
back once, while the router and the shared expert read x itself.

Dropless: every token reaches its k experts, whatever the balance, and no expert runs on tokens
that did not choose it. The (token, expert) pairs are sorted by expert, so that each expert's
rows are contiguous, and each expert multiplies its own run of rows (`jax.lax.ragged_dot_general`
over the experts' row counts); the rows go back to their tokens by the inverse permutation and are
summed with the routing weights. No capacity factor, no padding to equal loads. Under a mesh that
splits the batch over G devices, the rows are dispatched in G groups, each sorted on its own
device, and every device gathers the experts' weights for its group (the experts stay sharded
between layers, FSDP-style); a sort of the whole batch would copy every device's rows to every
device. (On TPU and GPU ragged_dot is a grouped matmul; XLA:CPU expands it into a masked product
over all experts, which is exact but does E/k times the work: fine for tests and small models.)

With `load_balance_weight` > 0 the layer sows `load_balance_weight * routing.load_balance` over the
real tokens as an `nnx.Intermediate` named "aux_loss" (the trainer adds it to the loss).

Parameters: router [D, E] (`gate` in transformers' checkpoints), selection_bias [E] (DeepSeek-V3's,
Kimi's and Nemotron-H's `e_score_correction_bias`: it only picks experts, so it takes no gradient;
imported, not learned here), gate_proj (gated experts only) and up_proj [E, D, F], down_proj
[E, F, D] (D the latent size L when there is one, with fc1_latent_proj [D, L] and fc2_latent_proj
[L, D]), and with shared experts a `shared_expert` (`GatedMLP`, or `MLP` when not gated) of width
shared_hidden and, gated, `shared_expert_gate` [D, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import require
from seqmix.layers import routing
from seqmix.layers.linear import projection
from seqmix.layers.mlp import ACTIVATIONS, MLP, Activation, GatedMLP
from seqmix.layers.partitioning import constrained, shard_count

# ragged_dot_general: lhs [G, M, in] ragged along M, rhs [G, E, in, out] grouped along E, batch G.
GROUPED_BY_EXPERT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([2], [2]), ([0], [0])), lhs_ragged_dimensions=[1], rhs_group_dimensions=[1])


@dataclasses.dataclass
class MoEConfig:
    """The experts of a model's sparse layers, and which layers are sparse: layer i (from 0) is
    when i is not in dense_layers, i >= first_dense and (i + 1) % every == 0 (Qwen's
    mlp_only_layers and decoder_sparse_step, DeepSeek's and Kimi's first_k_dense_replace)."""

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # each expert's hidden width; None: the model's mlp width
    activation: Activation = "silu"  # the experts' and the shared expert's
    gated: bool = True  # down(act(gate x) * up x), else down(act(up x))
    latent_size: int | None = None  # routed experts in a space of this width (Nemotron-H), None: d_model
    scoring: routing.Scoring = "softmax"
    renormalize: bool = True  # divide the chosen experts' weights by their sum
    selection_bias: bool = False  # a per-expert bias on the scores that only picks experts
    expert_groups: int = 1  # experts in this many equal groups (DeepSeek-V3's n_group)
    groups_per_token: int = 1  # groups a token chooses among (topk_group)
    routed_scale: float = 1.0  # routed experts' weights times this (routed_scaling_factor)
    shared_hidden: int = 0  # width of the shared expert, 0 for none
    shared_gate: bool = False  # the shared expert times sigmoid(x W) (Qwen3-Next)
    load_balance_weight: float = 0.0  # weight of the load-balancing loss, 0 for none
    dense_layers: list[int] = dataclasses.field(default_factory=list)
    first_dense: int = 0
    every: int = 1

    def validate(self, path: str) -> None:
        require(self.num_experts >= 1, path, "num_experts", f"must be >= 1, got {self.num_experts}")
        require(1 <= self.top_k <= self.num_experts, path, "top_k",
                f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        require(self.expert_hidden is None or self.expert_hidden >= 1, path, "expert_hidden",
                f"must be >= 1 or null, got {self.expert_hidden}")
        require(self.expert_groups >= 1 and self.num_experts % self.expert_groups == 0, path, "expert_groups",
                f"must divide num_experts={self.num_experts}, got {self.expert_groups}")
        require(1 <= self.groups_per_token <= self.expert_groups, path, "groups_per_token",
                f"must be in [1, expert_groups={self.expert_groups}], got {self.groups_per_token}")
        require(self.top_k <= self.groups_per_token * self.num_experts // self.expert_groups, path, "top_k",
                f"{self.top_k} exceeds the {self.groups_per_token * self.num_experts // self.expert_groups} experts "
                f"of groups_per_token={self.groups_per_token} groups")
        require(self.latent_size is None or self.latent_size >= 1, path, "latent_size",
                f"must be >= 1 or null, got {self.latent_size}")
        require(self.routed_scale > 0, path, "routed_scale", f"must be positive, got {self.routed_scale}")
        require(self.shared_hidden >= 0, path, "shared_hidden", f"must be >= 0, got {self.shared_hidden}")
        require(not self.shared_gate or self.shared_hidden > 0, path, "shared_gate",
                "needs a shared expert (shared_hidden > 0)")
        require(self.load_balance_weight >= 0, path, "load_balance_weight",
                f"must be >= 0, got {self.load_balance_weight}")
        require(self.first_dense >= 0, path, "first_dense", f"must be >= 0, got {self.first_dense}")
        require(self.every >= 1, path, "every", f"must be >= 1, got {self.every}")

    def sparse(self, layer_index: int) -> bool:
        return (layer_index not in self.dense_layers and layer_index >= self.first_dense
                and (layer_index + 1) % self.every == 0)


class MixtureOfExperts(nnx.Module):
    """x [B, T, D] -> [B, T, D] in x's dtype (see the module docstring)."""

    def __init__(self, d_model: int, hidden: int, config: MoEConfig, *, std: float, out_std: float,
                 rngs: nnx.Rngs):
        experts = config.num_experts
        self.top_k, self.scoring, self.renormalize = config.top_k, config.scoring, config.renormalize
        self.expert_groups, self.groups_per_token = config.expert_groups, config.groups_per_token
        self.routed_scale, self.load_balance_weight = config.routed_scale, config.load_balance_weight
        self.router = projection(d_model, experts, ("embed", None), std=std, rngs=rngs)
        self.selection_bias = nnx.Param(jnp.zeros((experts,), jnp.float32)) if config.selection_bias else None
        def expert_weights(shape, axes, scale):
            value = scale * jax.random.normal(rngs.params(), (experts,) + shape, jnp.float32)
            return nnx.Param(value, out_sharding=("expert",) + axes, eager_sharding=False)

        self.activation = config.activation
        width = config.latent_size or d_model  # what the routed experts read and write
        latent = config.latent_size is not None
        self.fc1_latent_proj = nnx.data(projection(d_model, width, ("embed", None), std=std, rngs=rngs)
                                        if latent else None)
        self.fc2_latent_proj = nnx.data(projection(width, d_model, (None, "embed"), std=out_std, rngs=rngs)
                                        if latent else None)
        self.gate_proj = expert_weights((width, hidden), ("embed", "mlp"), std) if config.gated else None
        self.up_proj = expert_weights((width, hidden), ("embed", "mlp"), std)
        self.down_proj = expert_weights((hidden, width), ("mlp", "embed"), out_std)
        shared = GatedMLP if config.gated else MLP
        self.shared_expert = (shared(d_model, config.shared_hidden, std=std, out_std=out_std, rngs=rngs,
                                     activation=config.activation) if config.shared_hidden else None)
        self.shared_expert_gate = (projection(d_model, 1, ("embed", None), std=std, rngs=rngs)
                                   if config.shared_gate else None)

    def route(self, tokens: jax.Array) -> routing.Routing:
        """The routing of tokens [..., D]."""
        bias = None if self.selection_bias is None else self.selection_bias[...]
        return routing.route(self.router(tokens), self.top_k, scoring=self.scoring, renormalize=self.renormalize,
                             bias=bias, groups=self.expert_groups, groups_per_token=self.groups_per_token,
                             scale=self.routed_scale)

    def experts(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Each expert's MLP on its run of rows, in G groups: rows [G, M, D] (D the latent size
        when there is one; each group's rows sorted by expert), group_sizes [G, E] int32 (each
        group's rows per expert) -> [G, M, D]."""
        def grouped(lhs, w):  # [G, M, in] x [E, in, out] per group -> [G, M, out]
            weights = constrained(jnp.broadcast_to(w[...].astype(lhs.dtype), (lhs.shape[0],) + w.shape),
                                  "batch", None, None, None)  # each device gathers the experts for its group
            return jax.lax.ragged_dot_general(lhs, weights, group_sizes, GROUPED_BY_EXPERT)

        act = ACTIVATIONS[self.activation]
        if self.gate_proj is None:
            return grouped(act(grouped(rows, self.up_proj)), self.down_proj)
        return grouped(act(grouped(rows, self.gate_proj)) * grouped(rows, self.up_proj), self.down_proj)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D]; segment_ids [B, T] (0 = padding) only limit the load-balancing loss to
        the real tokens."""
        groups = shard_count("batch", x.shape[0])  # one dispatch per device's rows (1 without a mesh)
        tokens = x.reshape(groups, -1, x.shape[-1])  # [G, N, D]
        chosen = self.route(tokens)
        if self.load_balance_weight:
            real = None if segment_ids is None else segment_ids.reshape(groups, -1) != 0
            # capture_noop: outside nnx.capture (decoding, plain forwards) the module stays unchanged.
            self.sow(nnx.Intermediate, "aux_loss", self.load_balance_weight * routing.load_balance(chosen, real),
                     capture_noop=True)
        pairs = chosen.experts.reshape(groups, -1)  # [G, N * k], token n's choices at n * k ...
        order = jnp.argsort(pairs, axis=-1, stable=True)
        experts = self.up_proj.shape[0]
        group_sizes = jax.vmap(lambda p: jnp.bincount(p, length=experts))(pairs).astype(jnp.int32)
        back = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(o.size, dtype=o.dtype)))(order)  # inverse
        inputs = tokens if self.fc1_latent_proj is None else self.fc1_latent_proj(tokens)  # projected once per token
        rows = jnp.take_along_axis(inputs, (order // self.top_k)[..., None], axis=1)
        out = jnp.take_along_axis(self.experts(rows, group_sizes), back[..., None], axis=1)
        out = jnp.einsum("gnkd,gnk->gnd", out.reshape(*tokens.shape[:2], self.top_k, -1),
                         chosen.weights.astype(x.dtype))
        if self.fc2_latent_proj is not None:
            out = self.fc2_latent_proj(out)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # every token, in the blocks' [B, T] layout (an MLP's own)
            if self.shared_expert_gate is not None:
                shared = shared * jax.nn.sigmoid(self.shared_expert_gate(x))
            out = out + shared.reshape(out.shape)
        return out.reshape(x.shape)

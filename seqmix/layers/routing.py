"""Top-k routing of tokens to experts (or memories), and the load-balancing loss.

    scores  = softmax(logits) or sigmoid(logits)          [..., E] float32
    choice  = scores + bias                               (the bias picks experts, never weighs them)
    groups  : with the E experts in G equal groups, a group scores the sum of its two best choices
              and a token chooses only among the experts of its best `groups_per_token` groups
    chosen  = top_k(choice)                               [..., k]
    weights = scores[chosen], divided by their sum when renormalised, times `scale`

Softmax with renormalisation is Mixtral's and Qwen's router; sigmoid scores with a selection bias,
expert groups and a scale are DeepSeek-V3's and Kimi's. Experts of the groups a token does not
keep are out of its choice entirely (-inf, as in transformers 5.24's DeepSeek-V3 and Kimi routers;
a 0.0 there, as some older ports have, lets a negative bias rank them above the kept groups').

Load balancing (Switch Transformer), over the real tokens: with f_e the share of the routing
choices that go to expert e and P_e its mean score, balance = E * sum_e f_e P_e, 1 at perfect
balance (transformers' `load_balancing_loss_func` is top_k times this).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Scoring = Literal["softmax", "sigmoid"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """experts [..., k] int32: each token's chosen experts, best first; weights [..., k] float32:
    what each chosen expert's output is multiplied by; scores [..., E] float32 (softmax or sigmoid
    of the logits, before any bias)."""

    experts: jax.Array
    weights: jax.Array
    scores: jax.Array


def route(logits, top_k: int, *, scoring: Scoring, renormalize: bool, bias=None, groups: int = 1,
          groups_per_token: int = 1, scale: float = 1.0) -> Routing:
    """The routing of tokens whose router logits are `logits` [..., E] (any float dtype; routed in
    float32); bias [E] or None; E a multiple of groups (see the module docstring)."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if groups > 1:
        by_group = choice.reshape(choice.shape[:-1] + (groups, -1))
        group_scores = jnp.sum(lax.top_k(by_group, min(2, by_group.shape[-1]))[0], axis=-1)  # [..., G]
        _, kept = lax.top_k(group_scores, groups_per_token)
        kept_groups = jnp.any(kept[..., None] == jnp.arange(groups), axis=-2)  # [..., G]
        choice = jnp.where(kept_groups[..., None], by_group, -jnp.inf).reshape(choice.shape)
    _, experts = lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(experts=experts, weights=weights * scale, scores=scores)


def load_balance(routing: Routing, real=None) -> jax.Array:
    """E * sum_e f_e P_e (float32 scalar) over the tokens where `real` [...] (bool, e.g.
    segment_ids != 0) holds, all tokens when None."""
    num_experts = routing.scores.shape[-1]
    real = jnp.ones(routing.scores.shape[:-1], jnp.float32) if real is None else real.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(real), 1.0)
    chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=-2)  # [..., E]
    fraction = jnp.sum(chosen * real[..., None], axis=tuple(range(real.ndim))) / (tokens * routing.experts.shape[-1])
    mean_score = jnp.sum(routing.scores * real[..., None], axis=tuple(range(real.ndim))) / tokens
    return num_experts * jnp.sum(fraction * mean_score)

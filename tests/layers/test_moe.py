"""Routing against a per-token numpy loop of its rules; the dropless mixture of experts against a
dense reference that runs every expert on every token and keeps the chosen ones (outputs and
gradients), gated and plain experts, in a latent space or not; shared experts; the load-balancing
loss; configuration errors; a model with sparse layers trains and its balancing loss reaches the
train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import ConfigError, build
from seqmix.layers import routing
from seqmix.layers.moe import MixtureOfExperts, MoEConfig


def routing_loop(logits, top_k, scoring, renormalize, bias, groups, groups_per_token, scale):
    """(experts [N, k], weights [N, k]) token by token in float64."""
    logits = np.asarray(logits, np.float64)
    experts, weights = [], []
    for row in logits:
        scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if scoring == "softmax" else 1 / (1 + np.exp(-row))
        choice = scores + (0 if bias is None else np.asarray(bias, np.float64))
        size = len(row) // groups
        group_scores = [np.sort(choice[g * size:(g + 1) * size])[-2:].sum() for g in range(groups)]
        kept = np.argsort(group_scores)[::-1][:groups_per_token]
        allowed = [e for e in range(len(row)) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weight = scores[chosen]
        if renormalize:
            weight = weight / weight.sum()
        experts.append(chosen)
        weights.append(weight * scale)
    return np.asarray(experts), np.asarray(weights)


ROUTERS = {
    "softmax_renormalised": dict(scoring="softmax", renormalize=True, groups=1, groups_per_token=1, scale=1.0),
    "softmax_raw": dict(scoring="softmax", renormalize=False, groups=1, groups_per_token=1, scale=1.0),
    "sigmoid_biased_groups_scaled": dict(scoring="sigmoid", renormalize=True, groups=4, groups_per_token=2,
                                         scale=2.5),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_routing_matches_its_rules(name):
    options = ROUTERS[name]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=16).astype(np.float32) if options["scoring"] == "sigmoid" else None
    chosen = routing.route(jnp.asarray(logits), 3, bias=None if bias is None else jnp.asarray(bias), **options)
    experts, weights = routing_loop(logits, 3, bias=bias, **options)
    np.testing.assert_array_equal(np.asarray(chosen.experts), experts)
    np.testing.assert_allclose(np.asarray(chosen.weights), weights, rtol=1e-5, atol=1e-7)


def test_load_balance_is_one_when_balanced_and_counts_only_real_tokens():
    logits = jnp.zeros((4, 4))  # equal scores everywhere ...
    chosen = routing.Routing(experts=jnp.array([[0], [1], [2], [3]]), weights=jnp.ones((4, 1)),
                             scores=jax.nn.softmax(logits, axis=-1))
    assert float(routing.load_balance(chosen)) == pytest.approx(1.0)  # ... and one token per expert
    skewed = routing.Routing(experts=jnp.array([[0], [0], [2], [3]]), weights=jnp.ones((4, 1)),
                             scores=jnp.asarray([[0.7, 0.1, 0.1, 0.1]] * 4))
    # Real tokens 0 and 1 both pick expert 0 (f = [1, 0, 0, 0]), whose mean score is 0.7.
    real = jnp.array([True, True, False, False])
    assert float(routing.load_balance(skewed, real)) == pytest.approx(4 * 0.7)


def dense_reference(moe, x):
    """Every expert on every token, the chosen ones kept with their weights: [B, T, D]."""
    tokens = x.reshape(-1, x.shape[-1])
    chosen = moe.route(tokens)
    act = {"silu": jax.nn.silu, "relu2": lambda h: jnp.maximum(h, 0.0) ** 2}[moe.activation]
    inputs = tokens if moe.fc1_latent_proj is None else tokens @ moe.fc1_latent_proj.kernel[...]
    up = jnp.einsum("nd,edf->enf", inputs, moe.up_proj[...])
    hidden = act(up) if moe.gate_proj is None else act(jnp.einsum("nd,edf->enf", inputs, moe.gate_proj[...])) * up
    every = jnp.einsum("enf,efd->end", hidden, moe.down_proj[...])  # [E, N, D or latent]
    dense_weights = jnp.sum(jax.nn.one_hot(chosen.experts, every.shape[0]) * chosen.weights[..., None], axis=1)
    out = jnp.einsum("end,ne->nd", every, dense_weights)
    if moe.fc2_latent_proj is not None:
        out = out @ moe.fc2_latent_proj.kernel[...]
    if moe.shared_expert is not None:
        shared = moe.shared_expert(tokens)
        if moe.shared_expert_gate is not None:
            shared = shared * jax.nn.sigmoid(moe.shared_expert_gate(tokens))
        out = out + shared
    return out.reshape(x.shape)


LAYERS = {
    "softmax_top2": {"num_experts": 6, "top_k": 2},
    "sigmoid_groups_bias_shared_relu2_latent": {  # Nemotron-H's (Kimi's experts are SwiGLUs: the fixture's)
        "num_experts": 8, "top_k": 3, "scoring": "sigmoid", "selection_bias": True, "expert_groups": 4,
        "groups_per_token": 2, "routed_scale": 2.0, "shared_hidden": 24, "activation": "relu2", "gated": False,
        "latent_size": 8},
    "gated_shared_unnormalised": {"num_experts": 4, "top_k": 1, "renormalize": False, "shared_hidden": 16,
                                  "shared_gate": True},
}


@pytest.mark.parametrize("name", LAYERS)
def test_dropless_experts_match_the_dense_reference(name):
    config = build(MoEConfig, LAYERS[name], "moe")
    moe = MixtureOfExperts(16, 32, config, std=0.3, out_std=0.3, rngs=nnx.Rngs(0))
    if moe.selection_bias is not None:
        moe.selection_bias[...] = 0.2 * jax.random.normal(jax.random.key(3), moe.selection_bias.shape)
    x = jax.random.normal(jax.random.key(1), (2, 13, 16))
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module, x, forward):
        return jnp.sum(forward(module, x) * weights)

    graph, params, rest = nnx.split(moe, nnx.Param, ...)

    def grads(forward):
        def of(params, x):
            return loss(nnx.merge(graph, params, rest), x, forward)
        return jax.jit(jax.grad(of, argnums=(0, 1)))(params, x)

    # atol: the outputs reach about 8 and the two paths sum in different orders (ragged_dot against
    # dense einsums), so an entry near 0 can differ by a few float32 roundings of the largest (a
    # fresh clone's run once saw 1.6e-6 at an entry of 0.03)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(moe, x)),
                               np.asarray(nnx.jit(dense_reference)(moe, x)), rtol=1e-5, atol=1e-5)
    actual, expected = grads(lambda m, x: m(x)), grads(dense_reference)
    for path_and_a, b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        path, a = path_and_a
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(path))
    if moe.selection_bias is not None:  # it only picks experts
        assert not np.any(np.asarray(actual[0]["selection_bias"][...]))


def test_every_token_reaches_its_experts_however_unbalanced():
    """A router that sends every token to the same two experts: nothing is dropped."""
    moe = MixtureOfExperts(8, 16, build(MoEConfig, {"num_experts": 4, "top_k": 2}, "moe"), std=0.3, out_std=0.3,
                           rngs=nnx.Rngs(0))
    moe.router.kernel[...] = jnp.zeros_like(moe.router.kernel[...])
    moe.router.kernel[...] = moe.router.kernel[...].at[:, 1].set(5.0).at[:, 2].set(4.0)
    x = jnp.abs(jax.random.normal(jax.random.key(1), (1, 40, 8)))  # positive: experts 1 and 2 win everywhere
    assert set(np.asarray(moe.route(x.reshape(-1, 8)).experts).ravel()) == {1, 2}
    np.testing.assert_allclose(np.asarray(moe(x)), np.asarray(dense_reference(moe, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"top_k": 9}, "moe.top_k: must be in [1, num_experts=8]"),
    ({"expert_groups": 3}, "moe.expert_groups: must divide num_experts=8"),
    ({"expert_groups": 4, "groups_per_token": 1, "top_k": 3}, "moe.top_k: 3 exceeds the 2 experts"),
    ({"shared_gate": True}, "moe.shared_gate: needs a shared expert"),
    ({"latent_size": 0}, "moe.latent_size: must be >= 1 or null"),
    ({"scoring": "relu"}, "moe.scoring: 'relu' is not one of"),
])
def test_bad_configs_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(MoEConfig, options, "moe")


def test_sparse_layers_follow_the_selection_rules():
    config = build(MoEConfig, {"dense_layers": [5], "first_dense": 1, "every": 2}, "moe")
    assert [i for i in range(8) if config.sparse(i)] == [1, 3, 7]

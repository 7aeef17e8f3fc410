"""Auxiliary losses sown by a layer (MoM's and a mixture of experts' load balancing) reach the
training loss and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel
from seqmix.train.step import _batch_loss

VOCAB = 64


def mom_model(aux_loss_weight):
    config = build(ModelConfig, {"vocab_size": VOCAB, "d_model": 32, "n_layers": 1, "n_heads": 2, "init_std": 0.2,
                                 "layer_pattern": ["memories"],
                                 "mixers": {"memories": {"type": "mom", "aux_loss_weight": aux_loss_weight}}}, "model")
    return LanguageModel(config, rngs=nnx.Rngs(0))


def moe_model(aux_loss_weight):
    config = build(ModelConfig, {"vocab_size": VOCAB, "d_model": 32, "n_layers": 1, "n_heads": 2, "init_std": 0.2,
                                 "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16,
                                         "load_balance_weight": aux_loss_weight}}, "model")
    return LanguageModel(config, rngs=nnx.Rngs(0))


def mom_router(model, inputs, segment_ids, positions):
    """(the router module, its input [B, T, D])."""
    layer = model.layers[0]
    return layer.self_attn.router, layer.input_layernorm(model.embed_tokens(inputs))


def moe_router(model, inputs, segment_ids, positions):
    layer = model.layers[0]
    x = model.embed_tokens(inputs)
    mixed, _ = layer.self_attn(layer.input_layernorm(x), segment_ids=segment_ids, positions=positions)
    return layer.mlp.router, layer.post_attention_layernorm(x + mixed)


LAYERS = {"mom": (mom_model, mom_router, ("self_attn", "router")), "moe": (moe_model, moe_router, ("mlp", "router"))}


def top_k_choices(router_kernel, h, real, top_k):
    """[N, M] one-hot sums of each real token's top_k memories; h [B, T, D] the mixer's input, real [B, T] bool."""
    ranks = np.argsort(-np.asarray(h[real] @ router_kernel), axis=-1)[:, :top_k]
    chosen = np.zeros((len(ranks), router_kernel.shape[-1]))
    np.put_along_axis(chosen, ranks, 1.0, axis=-1)
    return chosen


def load_balance(router_kernel, h, real, chosen):
    """num_memories * sum_m (share of the routing choices going to m) * (mean router probability
    of m), over the real tokens."""
    probs = jax.nn.softmax(h[real] @ router_kernel, axis=-1)  # [N, M]
    fraction = chosen.sum(0) / chosen.sum()
    return probs.shape[-1] * jnp.sum(fraction * probs.mean(0))


@pytest.mark.parametrize("layer", LAYERS)
def test_the_load_balancing_loss_reaches_the_loss_and_its_gradient(layer):
    make_model, router_of, router_path = LAYERS[layer]
    inputs = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
    segment_ids = jnp.array([[1] * 7 + [2] * 3 + [0] * 2, [1] * 12])
    batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1), "segment_ids": segment_ids,
             "positions": jnp.zeros_like(inputs)}

    def loss_and_router_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grad_fn = jax.jit(jax.value_and_grad(_batch_loss, argnums=1, has_aux=True), static_argnums=(0, 4))
        (total, (cross_entropy, count)), grads = grad_fn(graphdef, params, rest, batch, None)
        return total, cross_entropy, count, grads["layers"][0][router_path[0]][router_path[1]]["kernel"][...]

    weighted, plain = make_model(0.5), make_model(0.0)  # the same parameters
    total, cross_entropy, count, grad = loss_and_router_grad(weighted)
    plain_total, plain_cross_entropy, _, plain_grad = loss_and_router_grad(plain)
    assert float(plain_total) == float(plain_cross_entropy) == float(cross_entropy)
    assert float(count) == 22

    router_module, h = router_of(weighted, inputs, segment_ids, batch["positions"])
    real = np.asarray(segment_ids) != 0
    router = router_module.kernel[...]
    chosen = top_k_choices(router, h, real, top_k=2)
    balance = load_balance(router, h, real, chosen)
    assert 1.0 <= float(balance) < 2.0  # 1 at perfect balance, num_memories / top_k at worst
    np.testing.assert_allclose(float(total - cross_entropy), 0.5 * 22 * float(balance), rtol=1e-5)
    expected = 0.5 * 22 * jax.grad(load_balance)(router, h, real, chosen)
    np.testing.assert_allclose(np.asarray(grad - plain_grad), np.asarray(expected), rtol=1e-4, atol=1e-6)

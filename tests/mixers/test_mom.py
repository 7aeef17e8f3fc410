"""Mixture-of-Memories against a per-token loop over its memories with explicit top-k routing, on
random weights over a packed row with padding; and its load-balancing loss against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mixer_checks import rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.mom import MixtureOfMemories, MoMConfig
from seqmix.models.config import ModelConfig

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")
MEMORIES, TOP_K = 3, 2


def random_mom(seed=0, **options):
    """A mixer whose parameters are all redrawn at unit scale, so that routing varies per token."""
    config = build(MoMConfig, {"num_memories": MEMORIES, "top_k": TOP_K, **options}, "mixer")
    return with_random_weights(MixtureOfMemories(MODEL, config, rngs=nnx.Rngs(seed)), seed + 1)


def mom_loop(mixer, x, segment_ids):
    """y [B, T, D] token by token: each real token picks its top_k memories by router probability,
    updates them (and the shared memory) by the gated delta rule, S = a S (I - beta k k^T) + beta k v^T,
    and reads o = shared + sum_m g_m (q^T S_m) / sqrt(K) with g the renormalised probabilities.
    Padding outputs are left at zero."""
    q, k, v = (conv(proj(x), segment_ids=segment_ids)[0] for conv, proj in
               ((mixer.q_conv, mixer.q_proj), (mixer.k_conv, mixer.k_proj), (mixer.v_conv, mixer.v_proj)))
    batch, length, _ = x.shape
    heads, dim, memories = mixer.heads, mixer.key_dim, MEMORIES + 1
    as_np = lambda a, shape: np.asarray(a, np.float64).reshape(shape)
    q = as_np(q, (batch, length, heads, dim))
    k, v = as_np(k, (batch, length, memories, heads, dim)), as_np(v, (batch, length, memories, heads, dim))
    unit = lambda a: a / np.sqrt(np.sum(a * a, axis=-1, keepdims=True) + 1e-6)  # eps as in l2_normalize
    q, k = unit(q), unit(k)
    beta = as_np(jax.nn.sigmoid(mixer.b_proj(x)), (batch, length, memories, heads))
    a = np.exp(as_np(-jnp.exp(mixer.A_log[...]) * jax.nn.softplus(mixer.a_proj(x) + mixer.dt_bias[...]),
                     (batch, length, memories, heads)))
    probs = as_np(jax.nn.softmax(mixer.router(x), axis=-1), (batch, length, MEMORIES))
    ids = np.asarray(segment_ids)
    out = np.zeros((batch, length, heads, dim))
    for b in range(batch):
        states = np.zeros((memories, heads, dim, dim))
        for t in range(length):
            if ids[b, t] == 0:
                continue
            if t > 0 and ids[b, t] != ids[b, t - 1]:
                states[:] = 0.0
            top = np.argsort(-probs[b, t])[:TOP_K]
            gates = dict(zip(top, probs[b, t, top] / probs[b, t, top].sum()))
            gates[MEMORIES] = 1.0  # the shared memory, last
            for m, gate in gates.items():
                for h in range(heads):
                    kk, state = k[b, t, m, h], states[m, h]
                    state = a[b, t, m, h] * (state - beta[b, t, m, h] * np.outer(kk, kk @ state))
                    states[m, h] = state + beta[b, t, m, h] * np.outer(kk, v[b, t, m, h])
                    out[b, t, h] += gate * dim ** -0.5 * q[b, t, h] @ states[m, h]
    return mixer.output(jnp.asarray(out, jnp.float32), x)


def test_mom_matches_a_loop_over_routed_memories_on_a_packed_row():
    mixer = random_mom()
    x = jax.random.normal(jax.random.key(2), (2, 19, 16))
    segment_ids = jnp.array([[1] * 8 + [2] * 8 + [0] * 3, [5] * 19])
    real = np.asarray(segment_ids) != 0
    y, _ = mixer(x, segment_ids=segment_ids)
    expected = mom_loop(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], np.asarray(expected)[real]) < 1e-4


def test_load_balancing_loss_is_sown_only_under_capture():
    mixer = random_mom(3, aux_loss_weight=0.5)
    x = jax.random.normal(jax.random.key(4), (2, 7, 16))
    segment_ids = jnp.array([[1] * 5 + [0] * 2, [1] * 7])
    _, sown = nnx.capture(mixer, nnx.Intermediate)(x, segment_ids=segment_ids)
    probs = np.asarray(jax.nn.softmax(mixer.router(x), axis=-1))[np.asarray(segment_ids) != 0]  # [12, M]
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, np.argsort(-probs, axis=-1)[:, :TOP_K], 1.0, axis=-1)
    # Switch: M * sum_m (share of the 12 x top_k choices given to m) * (mean probability of m).
    expected = 0.5 * MEMORIES * np.sum(chosen.sum(0) / (12 * TOP_K) * probs.mean(0))
    (value,) = sown["aux_loss"].get_value()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    mixer(x, segment_ids=segment_ids)  # outside a capture the module is left unchanged
    assert not nnx.state(mixer, nnx.Intermediate)

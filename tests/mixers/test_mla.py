"""Multi-head latent attention against a float64 numpy loop of its definition (latent, its norm,
the per-head expansion, the shared rotary key, optional query LoRA, with and without positions),
on random weights over a packed row with padding; its decode cache holds latents, not keys and
values (decode == forward: the mixer harness)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import (causal_attention_by_query, packed_row, rel_err, rotated, segment_positions,
                          with_random_weights)

from seqmix.configuration import ConfigError, build
from seqmix.mixers import attention
from seqmix.mixers.mla import LATENT_NORM_EPS, MLAConfig, MultiHeadLatentAttention
from seqmix.models.config import ModelConfig
from seqmix.models.lm import positions_from_segments

MODEL = build(ModelConfig, {"d_model": 16, "n_heads": 3, "head_dim": 8, "n_layers": 2}, "model")


def mla_loop(mixer, options, x, segment_ids):
    """y [B, T, D] in float64 from the definition; padding rows left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    norm = lambda a, module: a / np.sqrt((a * a).mean(-1, keepdims=True) + LATENT_NORM_EPS) * p(module.weight)
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    heads, rank = MODEL.n_heads, options["kv_lora_rank"]
    nope, rope = options.get("qk_nope_head_dim", 8), options.get("qk_rope_head_dim", 16)
    value = options.get("v_head_dim", 8)
    if options.get("q_lora_rank"):
        q = norm(x @ p(mixer.q_a_proj.kernel), mixer.q_a_layernorm) @ p(mixer.q_b_proj.kernel)
    else:
        q = x @ p(mixer.q_proj.kernel)
    q = q.reshape(batch, length, heads, nope + rope)
    compressed = x @ p(mixer.kv_a_proj_with_mqa.kernel)
    latent = norm(compressed[..., :rank], mixer.kv_a_layernorm)
    k_rope = np.repeat(compressed[..., None, rank:], heads, axis=2)
    if options.get("rope", True):
        positions = segment_positions(segment_ids)
        q = np.concatenate([q[..., :nope], rotated(q[..., nope:], positions, rope, MODEL.rope_theta)], axis=-1)
        k_rope = rotated(k_rope, positions, rope, MODEL.rope_theta)
    kv = (latent @ p(mixer.kv_b_proj.kernel)).reshape(batch, length, heads, nope + value)
    k = np.concatenate([kv[..., :nope], k_rope], axis=-1)
    out = causal_attention_by_query(q, k, kv[..., nope:], segment_ids, (nope + rope) ** -0.5)
    return out.reshape(batch, length, -1) @ p(mixer.o_proj.kernel)


CASES = {
    "deepseek_rope": {"kv_lora_rank": 12, "qk_rope_head_dim": 4, "v_head_dim": 6},
    "q_lora_rope": {"kv_lora_rank": 12, "q_lora_rank": 10, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4},
    "kimi_without_positions": {"kv_lora_rank": 12, "qk_rope_head_dim": 4, "rope": False},
}


@pytest.mark.parametrize("case", CASES)
def test_mla_matches_its_definition_on_a_packed_row(case):
    options = CASES[case]
    mixer = with_random_weights(MultiHeadLatentAttention(MODEL, build(MLAConfig, options, "mixer"),
                                                         rngs=nnx.Rngs(0)), 1)
    x, segment_ids = packed_row(16)
    y, _ = mixer(x, segment_ids=segment_ids, positions=positions_from_segments(segment_ids))
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(y)[real], mla_loop(mixer, options, x, segment_ids)[real]) < 1e-4


def test_a_long_sequence_attends_in_blocks_with_the_dense_forms_output_and_gradients(monkeypatch):
    """From `attention.BLOCKWISE_FROM` tokens MLA's training forward attends in blocks (keys of
    Dn + Dr, values of Dv): the output and the gradients of its input and weights equal the dense
    form's on a packed row, and the compiled gradient keeps under half the dense form's
    temporaries."""
    mixer = with_random_weights(MultiHeadLatentAttention(MODEL, build(MLAConfig, CASES["deepseek_rope"], "mixer"),
                                                         rngs=nnx.Rngs(0)), 1)
    graphdef, params = nnx.split(mixer)
    length = attention.BLOCKWISE_FROM
    x = jax.random.normal(jax.random.key(3), (1, length, MODEL.d_model))
    segment_ids = jnp.asarray([[1] * 300 + [2] * (length - 310) + [0] * 10], jnp.int32)
    probe = jax.random.normal(jax.random.key(4), x.shape) * (segment_ids != 0)[..., None]

    def compiled():
        return jax.jit(jax.value_and_grad(lambda params, x: jnp.sum(
            nnx.merge(graphdef, params)(x, segment_ids=segment_ids)[0] * probe), argnums=(0, 1))).lower(params, x).compile()

    blocks = compiled()
    monkeypatch.setattr(attention, "BLOCKWISE_FROM", 10**9)
    dense = compiled()
    for got, want in zip(jax.tree.leaves(blocks(params, x)), jax.tree.leaves(dense(params, x)), strict=True):
        assert rel_err(got, want) < 1e-4
    blocks_bytes, dense_bytes = (c.memory_analysis().temp_size_in_bytes for c in (blocks, dense))
    assert blocks_bytes < 0.5 * dense_bytes, (blocks_bytes, dense_bytes)


def test_the_decode_cache_holds_one_latent_and_rotary_key_per_token():
    mixer = MultiHeadLatentAttention(MODEL, build(MLAConfig, CASES["deepseek_rope"], "mixer"), rngs=nnx.Rngs(0))
    cache = mixer.init_cache(2, 100, jnp.float32)
    assert cache.k.shape == (2, 100, 1, 12 + 4) and cache.v.size == 0  # attention's would be 2 x 3 heads x 8


def test_an_odd_rotary_width_names_the_key():
    with pytest.raises(ConfigError, match="mixer.qk_rope_head_dim: must be even"):
        build(MLAConfig, {"qk_rope_head_dim": 5}, "mixer")

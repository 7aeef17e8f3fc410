"""Attention's Qwen3-Next options against a float64 numpy loop of their definitions, on random
weights over a packed row with padding: the per-head [query | gate] halves of q_proj and the
sigmoid output gate, per-head (1 + w) q/k RMSNorms, partial RoPE on the first dims of each head,
and no positions at all (NoPE); grouped-query heads throughout."""

import numpy as np
import pytest
from flax import nnx
from mixer_checks import (causal_attention_by_query, packed_row, rel_err, rotated, segment_positions,
                          with_random_weights)

from seqmix.configuration import ConfigError, build
from seqmix.mixers.attention import Attention, AttentionConfig
from seqmix.models.config import ModelConfig
from seqmix.models.lm import positions_from_segments


def attention_loop(mixer, model, options, x, segment_ids):
    """y [B, T, D] in float64 from the definitions; padding rows left at zero."""
    p = lambda a: np.asarray(a[...], np.float64)
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    heads, kv_heads, dim = model.n_heads, model.kv_heads, model.dim_per_head
    rotary_dim = int(dim * options.get("rotary_fraction", 1.0)) // 2 * 2
    queries = (x @ p(mixer.q_proj.kernel)).reshape(batch, length, heads, -1)
    q, gate = queries[..., :dim], queries[..., dim:]
    k = (x @ p(mixer.k_proj.kernel)).reshape(batch, length, kv_heads, dim)
    v = (x @ p(mixer.v_proj.kernel)).reshape(batch, length, kv_heads, dim)

    def norm(a, module):  # over each head, or over all heads of the projection at once
        over = a.reshape(batch, length, -1) if options.get("qk_norm") == "projection" else a
        return (over / np.sqrt((over * over).mean(-1, keepdims=True) + model.norm_eps) * (1 + p(module.weight))
                ).reshape(a.shape)

    if options.get("qk_norm"):
        q, k = norm(q, mixer.q_norm), norm(k, mixer.k_norm)
    positions = segment_positions(segment_ids)
    q, k = (rotated(a, positions, rotary_dim, model.rope_theta) for a in (q, k))
    k, v = (np.repeat(a, heads // kv_heads, axis=2) for a in (k, v))  # query head h reads kv head h // G
    out = causal_attention_by_query(q, k, v, segment_ids, dim ** -0.5)
    if options.get("output_gate"):
        out = out / (1 + np.exp(-gate))
    return out.reshape(batch, length, -1) @ p(mixer.o_proj.kernel)


CASES = {
    "qwen3_next_gated_partial_rope": {"output_gate": True, "qk_norm": "head", "rotary_fraction": 0.25},
    "nope_gated": {"output_gate": True, "rotary_fraction": 0.0},
    "qk_norm_full_rope": {"qk_norm": "head"},
    "olmo_projection_norm_nope": {"qk_norm": "projection", "rotary_fraction": 0.0},
    "projection_norm_gated_rope": {"qk_norm": "projection", "output_gate": True},
}


@pytest.mark.parametrize("case", CASES)
def test_attention_options_match_their_definitions_on_a_packed_row(case):
    model = build(ModelConfig, {"d_model": 16, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "n_layers": 2,
                                "norm_unit_offset": True}, "model")
    options = CASES[case]
    mixer = with_random_weights(Attention(model, build(AttentionConfig, options, "mixer"), rngs=nnx.Rngs(0)), 1)
    x, segment_ids = packed_row(16)
    y, _ = mixer(x, segment_ids=segment_ids, positions=positions_from_segments(segment_ids))
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(y)[real], attention_loop(mixer, model, options, x, segment_ids)[real]) < 1e-4


def test_rotary_fraction_outside_zero_one_names_the_key():
    with pytest.raises(ConfigError, match="mixer.rotary_fraction: must be in"):
        build(AttentionConfig, {"rotary_fraction": 1.5}, "mixer")

"""The language model: packing, positions, cached generation and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.configuration import build
from seqmix.models import generate as generation
from seqmix.models.config import ModelConfig
from seqmix.models.generate import compiled_length, generate, sample_token
from seqmix.models.lm import LanguageModel, positions_from_segments


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@nnx.jit
def forward(model, tokens, segment_ids=None):
    return model(tokens, segment_ids=segment_ids)


def tiny_model(**overrides):
    options = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "layer_pattern": ["local", "global"],
               "mixers": {"local": {"type": "attention", "sliding_window": 5}, "global": {"type": "attention"}}}
    return LanguageModel(build(ModelConfig, {**options, **overrides}, "model"), rngs=nnx.Rngs(0))


def test_positions_restart_at_each_segment():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert positions_from_segments(segment_ids).tolist() == expected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=5), min_size=1, max_size=3), st.integers(0, 4))
def test_positions_from_segments_match_a_loop(rows_of_lengths, padding):
    rows = [[seg for seg, n in enumerate(lengths, 1) for _ in range(n)] for lengths in rows_of_lengths]
    width = max(map(len, rows)) + padding
    segment_ids = np.array([row + [0] * (width - len(row)) for row in rows])
    expected = np.zeros_like(segment_ids)
    for b, row in enumerate(segment_ids):
        for t in range(1, width):
            expected[b, t] = expected[b, t - 1] + 1 if row[t] == row[t - 1] else 0
    np.testing.assert_array_equal(positions_from_segments(jnp.asarray(segment_ids)), expected)


def test_packed_row_equals_documents_run_separately():
    model = tiny_model()
    doc_a = jax.random.randint(jax.random.key(1), (1, 9), 0, 256)
    doc_b = jax.random.randint(jax.random.key(2), (1, 6), 0, 256)
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 9 + [2] * 6 + [0] * 3])
    logits = forward(model, packed, segment_ids)
    assert logits.shape == (1, 18, 256) and logits.dtype == jnp.float32
    assert rel_err(logits[:, :9], forward(model, doc_a)) < 1e-5
    assert rel_err(logits[:, 9:15], forward(model, doc_b)) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_prefill_then_decode_equals_full_forward(tie):
    model = tiny_model(tie_embeddings=tie)
    assert (model.lm_head is None) == tie
    tokens = jax.random.randint(jax.random.key(3), (3, 14), 0, 256)
    full = forward(model, tokens)
    extend = nnx.jit(lambda model, tokens, cache: model.extend(tokens, cache))
    cache = model.init_cache(3, 20)
    pieces = []
    logits, cache = extend(model, tokens[:, :8], cache)
    pieces.append(logits)
    for t in range(8, 14):
        logits, cache = extend(model, tokens[:, t:t + 1], cache)
        pieces.append(logits)
    assert rel_err(jnp.concatenate(pieces, axis=1), full) < 1e-5


def test_greedy_generation_follows_the_full_forward_argmax():
    model = tiny_model()
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, 256)
    out = jnp.concatenate([prompt, generate(model, prompt, 8, rng=jax.random.key(0), temperature=0.0)], axis=1)
    assert out.shape == (2, 13)
    # Causal: the logits at t - 1 of the whole output are those of the prefix out[:, :t].
    expected = jnp.argmax(forward(model, out)[:, 4:12], axis=-1)
    assert np.array_equal(out[:, 5:], expected)


def test_prompts_of_nearby_lengths_share_the_compiled_prefill_and_decode_step(caplog):
    """`generate` pads a batch's prompts and its cache to `compiled_length`s: prompts of 3 and then
    13 tokens (both padded to 16, caches of 24 for 8 new tokens) compile nothing the second time,
    a prompt of 40 tokens compiles both programs again; and the padding changes no token."""
    model = tiny_model()
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (40,), 0, 256))

    def compiled_programs(length):
        caplog.clear()
        with jax.log_compiles(True):
            new_tokens = generate(model, [prompt[:length]], 8, rng=jax.random.key(0), temperature=0.0)
        return {name for name in ("_prefill", "_decode") if f"Compiling jit({name})" in caplog.text}, new_tokens

    generate(model, [prompt[:3]], 8, rng=jax.random.key(0), temperature=0.0)
    assert compiled_programs(13)[0] == set()
    assert [compiled_length(n) for n in (1, 16, 17, 33, 64, 65, 1000, 5000)] == [16, 16, 24, 48, 64, 96, 1024, 6144]
    compiled, new_tokens = compiled_programs(40)
    assert compiled == {"_prefill", "_decode"}
    # Causal: the greedy tokens of the padded prompt are the full forward's argmax, as unpadded.
    out = jnp.concatenate([prompt[None], new_tokens], axis=1)
    assert np.array_equal(new_tokens, jnp.argmax(forward(model, out)[:, 39:47], axis=-1))


def test_a_prompt_longer_than_the_prefill_chunk_is_prefilled_in_pieces(monkeypatch):
    """With `PREFILL_CHUNK` at 32, a prompt of 200 tokens (padded to 256) is prefilled in 8 pieces
    of 32 tokens: the prefill program's temporary bytes (attention and vocabulary logits of one
    piece) fall below a third of one call's, and the greedy continuation is the full forward's."""
    model = tiny_model()
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (200,), 0, 256))
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 32)
    tokens, segment_ids = generation.left_pad([prompt])
    assert tokens.shape == (1, 256)
    graphdef, state = nnx.split(model)
    temporaries = {chunk: generation._prefill.lower(graphdef, state, tokens, segment_ids, 264, jnp.float32, chunk)
                   .compile().memory_analysis().temp_size_in_bytes for chunk in (32, 256)}
    assert temporaries[32] < temporaries[256] / 3, temporaries
    new_tokens = generate(model, [prompt], 4, rng=jax.random.key(0), temperature=0.0)
    out = jnp.concatenate([prompt[None], new_tokens], axis=1)
    assert np.array_equal(new_tokens, jnp.argmax(forward(model, out)[:, 199:203], axis=-1))


def test_sampling_respects_temperature_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = np.asarray(sample_token(logits, jax.random.key(0), 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = np.asarray(sample_token(logits, jax.random.key(1), 1.0, 0.7))
    assert set(np.unique(nucleus)) == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are cut
    tiny = np.asarray(sample_token(logits, jax.random.key(2), 1.0, 1e-6))
    assert np.all(tiny == 0)
    greedy = np.asarray(sample_token(logits, jax.random.key(3), 0.0, 1.0))
    assert np.all(greedy == 0)
    same = sample_token(logits[:8], jax.random.key(5), 0.8, 0.9), sample_token(logits[:8], jax.random.key(5), 0.8, 0.9)
    assert np.array_equal(*same)


def test_remat_keeps_the_loss_the_auxiliary_losses_and_the_gradients():
    """A rematerialised model (the run's `remat`) computes what the plain one does, a mixture of
    experts' sown load-balancing loss included, on a packed row with padding; its forward holds
    one checkpoint per block, which makes the backward pass recompute the block."""
    options = {"d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_hidden": 64, "layer_pattern": ["gated_deltanet", "attention"],
               "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "load_balance_weight": 0.01}}
    config = build(ModelConfig, options, "model")
    tokens = jax.random.randint(jax.random.key(4), (2, 24), 0, 256)
    segment_ids = jnp.array([[1] * 10 + [2] * 11 + [0] * 3, [1] * 24])

    def loss(model):
        logits, sown = nnx.capture(model, nnx.Intermediate)(tokens, segment_ids=segment_ids)
        aux = sum(jnp.sum(value) for value in jax.tree.leaves(sown))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux, aux

    results = {}
    for remat in (False, True):
        model = LanguageModel(config, rngs=nnx.Rngs(0), remat=remat)
        results[remat] = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        jaxpr = jax.make_jaxpr(lambda state: loss(nnx.merge(nnx.graphdef(model), state)))(nnx.state(model))
        checkpoints = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "remat2"]  # jax.checkpoint's primitive
        assert len(checkpoints) == (config.n_layers if remat else 0)
    ((plain_loss, plain_aux), plain_grads), ((loss_value, aux), grads) = results[False], results[True]
    assert float(plain_aux) > 0 and float(aux) == pytest.approx(float(plain_aux), rel=1e-6)
    assert float(loss_value) == pytest.approx(float(plain_loss), rel=1e-6)
    for plain_grad, grad in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(grads), strict=True):
        assert rel_err(grad, plain_grad) < 1e-5


def test_post_norm_layers_normalise_what_they_add_and_pre_norm_layers_what_they_read():
    """OLMo-hybrid's layout: a pre-norm linear layer, then a post-norm attention layer whose
    mixer reads the raw residual stream, x + norm(attention(x)), then + norm(MLP(.)), every norm
    scaling by (1 + w)."""
    model = tiny_model(layer_pattern=["gated_deltanet", "attention"], mixers={}, post_norm_layers=["attention"],
                       norm_unit_offset=True)
    pre, post = model.layers
    assert pre.post_feedforward_layernorm is None and post.input_layernorm is None
    for norm in (pre.input_layernorm, post.post_attention_layernorm, post.post_feedforward_layernorm):
        norm.weight[...] = 0.3 * jax.random.normal(jax.random.key(7), norm.weight.shape)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
    rms_norm = lambda norm, a: a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * (1 + norm.weight[...])
    x = model.embed_tokens(tokens)
    x = x + pre.self_attn(rms_norm(pre.input_layernorm, x))[0]
    x = x + pre.mlp(rms_norm(pre.post_attention_layernorm, x))
    x = x + rms_norm(post.post_attention_layernorm, post.self_attn(x)[0])
    x = x + rms_norm(post.post_feedforward_layernorm, post.mlp(x))
    expected = rms_norm(model.norm, x) @ model.embed_tokens.embedding[...].T
    assert rel_err(model(tokens), expected) < 1e-5


def test_post_norm_layers_must_be_kinds_of_the_pattern():
    with pytest.raises(Exception, match="model.post_norm_layers: 'global_attention' is not a kind of layer_pattern"):
        build(ModelConfig, {"post_norm_layers": ["global_attention"]}, "model").validate("model")

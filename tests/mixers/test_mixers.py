"""Every registered mixer, in a small model: token-by-token decode and prefill from a cached state
== the chunked forward, packed rows == separate documents, finite gradients reaching every
parameter, a model that overfits a tiny batch, and parameters strongly typed float32 (checked
as each case's model is built). A new mixer joins by adding a case (VARIANTS:
options checked by the decode test only); a registered mixer without one fails the coverage test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from mixer_checks import rel_err

from seqmix.configuration import build
from seqmix.mixers import get_mixer, registered_mixers, registry
from seqmix.mixers.state_tuning import InitialState
from seqmix.models import generate as generation
from seqmix.models.config import ModelConfig
from seqmix.models.generate import generate, left_pad, prompt_positions
from seqmix.models.lm import LanguageModel

VOCAB = 64

CASES = {
    "deltanet": {"layer_pattern": ["deltanet"]},
    "gated_deltanet": {"layer_pattern": ["gated_deltanet"]},
    "gated_deltaproduct": {"layer_pattern": ["gated_deltaproduct"]},
    "gated_deltanet2": {"layer_pattern": ["gated_deltanet2"]},
    "kda": {"layer_pattern": ["kda"]},
    "gla": {"layer_pattern": ["gla"]},
    "retnet": {"layer_pattern": ["retnet"]},
    "hgrn2": {"layer_pattern": ["hgrn2"]},
    "mamba2": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "mamba2", "state_dim": 8}}},
    "mamba": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "mamba", "state_dim": 8}}},
    "longhorn": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "longhorn", "state_dim": 8}}},
    "lightning": {"layer_pattern": ["lightning"]},
    "liger_attention": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "liger_attention", "window": 8}}},
    "lolcats": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "lolcats", "window": 8}}},
    "rwkv6": {"layer_pattern": ["rwkv6"]},
    "rwkv7": {"layer_pattern": ["rwkv7"]},
    "mom": {"layer_pattern": ["mom"]},
    "mla": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "mla", "kv_lora_rank": 12,
                                                               "qk_rope_head_dim": 4, "v_head_dim": 8}}},
    "linear_attention_hedgehog": {"layer_pattern": ["mixer"],
                                  "mixers": {"mixer": {"type": "linear_attention", "feature_map": "hedgehog"}}},
    "gated_conv": {"layer_pattern": ["gated_conv"]},
    "gated_conv_lfm2": {"layer_pattern": ["mixer"], "mixers": {"mixer": {  # LFM2's: an input gate, biases
        "type": "gated_conv", "input_gate": True, "bias": True}}},
    "gated_deltanet_3to1_hybrid": {
        "n_layers": 4, "layer_pattern": ["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"]},
    "gated_conv_attention": {"layer_pattern": ["gated_conv", "attention"]},  # Zoology's MQAR layout
    "parallel_hybrid": {"layer_pattern": ["mixer"], "n_kv_heads": 1, "mixers": {"mixer": {  # Falcon-H1's
        "type": "parallel_hybrid", "attention": {"key_multiplier": 1.5},
        "mamba2": {"state_dim": 8, "num_heads": 3, "head_dim": 8, "output_norm": None},
        "attention_multipliers": [0.8, 1.2], "mamba2_multipliers": [1.3, 0.7]}}},
    "rg_lru": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "rg_lru", "lru_width": 48, "conv_width": 3}}},
    "hydra": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "hydra", "state_dim": 8}}},
    # a window of 8 and 4 eidetic slots: 80 decoded tokens elect and evict
    "bmojo": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "bmojo", "window": 8, "memory": 4}}},
    "nalaformer": {"layer_pattern": ["nalaformer"]},
    "local_linear_attention": {"layer_pattern": ["mixer"], "n_kv_heads": 1,  # grouped-query heads
                               "mixers": {"mixer": {"type": "local_linear_attention"}}},
    "s4d": {"layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "s4d", "state_dim": 8}}},
    # filters of 16 taps: the 66-token prefill reaches back into the cached window
    "spectral_ssm": {"layer_pattern": ["mixer"], "mixers": {"mixer": {
        "type": "spectral_ssm", "num_filters": 4, "filter_length": 16}}},
    # Nemotron-H's MLP layers (its `moe` layers: tests/layers/test_moe.py and the nemotron_h fixture's decode)
    "feed_forward_layer": {"layer_pattern": ["gated_conv", "mlp"],
                           "mixers": {"mlp": {"type": "mlp", "hidden": 48}}},
}
GLOBAL_ATTENTION_CASES = ("gated_deltanet_3to1_hybrid", "gated_conv_attention", "mla", "parallel_hybrid",
                          "local_linear_attention")
# Bidirectional mixers (each token reads the tokens after it): no decode, so the decode and cache
# tests skip them; packing, gradients and overfitting apply.
NON_CAUSAL_CASES = ("hydra",)


VARIANTS = {
    "deltanet_negative_eigenvalues": {
        "layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "deltanet", "negative_eigenvalues": True}}},
    "gated_deltanet_grouped_value_heads": {
        "layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "gated_deltanet", "num_v_heads": 4}}},
    "kda_lower_bound_grouped_value_heads": {"layer_pattern": ["mixer"], "mixers": {"mixer": {
        "type": "kda", "gate_lower_bound": -5.0, "num_v_heads": 4}}},
    "gated_deltanet_own_head_geometry": {"layer_pattern": ["mixer"], "mixers": {"mixer": {  # Qwen3-Next's
        "type": "gated_deltanet", "num_heads": 1, "head_dim": 24, "num_v_heads": 3, "expand_v": 1.0}}},
    **{f"linear_attention_{name}": {"layer_pattern": ["mixer"], "mixers": {"mixer": {
        "type": "linear_attention", "feature_map": name, "normalize": name != "identity"}}}
       for name in ("identity", "softmax")},  # un-normalised and normalised (the others: test_linear_attention)
    "mla_q_lora_without_positions": {"layer_pattern": ["mixer"], "mixers": {"mixer": {
        "type": "mla", "kv_lora_rank": 12, "q_lora_rank": 10, "qk_nope_head_dim": 6, "rope": False}}},
    "qwen3_next_gated_attention": {"layer_pattern": ["mixer"], "norm_unit_offset": True, "mixers": {"mixer": {
        "type": "attention", "output_gate": True, "qk_norm": "head", "rotary_fraction": 0.25}}},
    "olmo_hybrid_post_norm_attention": {"layer_pattern": ["gated_deltanet", "attention"],
                                        "post_norm_layers": ["attention"]},
    "sliding_window_hybrid": {"layer_pattern": ["gated_deltanet", "local"],
                              "mixers": {"local": {"type": "attention", "sliding_window": 8}}},
    **{f"liger_{name}": {"layer_pattern": ["mixer"], "mixers": {"mixer": {
        "type": "liger_attention", "window": None, "recurrence": name}}} for name in ("gla", "hgrn2")},
    "mamba2_every_option": {"layer_pattern": ["mixer"], "mixers": {"mixer": {  # Mamba-2's, Nemotron-H's, Falcon-H1's
        "type": "mamba2", "state_dim": 8, "num_heads": 4, "head_dim": 12, "n_groups": 2,
        "time_step_limit": [0.05, 0.5], "conv_bias": True, "in_proj_bias": True, "out_proj_bias": True,
        "chunk_size": 16, "output_norm": "norm_then_gate", "norm_eps": 1e-3,
        "in_proj_multipliers": [0.5, 1.5, 0.7, 1.3, 2.0]}}},
}
# Models whose layers hold every kind of decode cache between them, for the left-padding test (each
# layer's own decode is checked one mixer at a time above): short convolutions (mamba2), a ring
# buffer next to a recurrent state (liger_attention, and lolcats, whose state takes the tokens leaving
# the ring), a token-shift tail (rwkv6), a state that restarts at a row's first real token (rg_lru,
# whose input scaling differs there) and a global KV cache; and the delta rule's sub-steps per
# token (gated_deltaproduct) beside the DPLR state and its token shift (rwkv7).
MIXED_CACHES = {
    "every_cache_kind": {"n_layers": 6, "layer_pattern": ["mamba2", "liger", "lolcats", "rwkv6", "rg_lru",
                                                          "attention"],
                         "mixers": {"liger": {"type": "liger_attention", "window": 4},
                                    "lolcats": {"type": "lolcats", "window": 4}}},
    "delta_rule_sub_steps_and_dplr": {"layer_pattern": ["gated_deltaproduct", "rwkv7"]},
}


# Registered mixers with no case above, each with why and where it is tested instead. The coverage
# test below fails too when an entry here is stale (no longer registered, or given a case after all).
NOT_HARNESS_CASES = {
    # not a mixer of its own: a wrapper that builds another registered mixer (which has its case)
    # from a teacher's attention weights; tests/models/test_students.py checks each student
    "student",
    # not a sequence mixer: a mixture-of-experts feed-forward layer (Nemotron-H's `E` layers), which
    # mixes no tokens; tests/layers/test_moe.py and the nemotron_h fixture's decode check it
    "moe",
}


def case_options(case):
    """The ModelConfig options of a case (of CASES, VARIANTS or MIXED_CACHES): one layer of each kind
    in its layer pattern unless it says otherwise (a second layer of the same mixer would double
    the compile time of every check, the suite's largest cost, and test nothing the first does not;
    the hybrids and MIXED_CACHES stack several), and blocks without an MLP, which mixes no tokens
    (compiling it took a fifth of this module's time; the models' and trainer's tests have MLPs, and
    the `feed_forward_layer` case has one as a layer of its own)."""
    options = {**CASES, **VARIANTS, **MIXED_CACHES}[case]
    return {"vocab_size": VOCAB, "d_model": 32, "mlp_hidden": 0, "n_layers": len(options["layer_pattern"]),
            "n_heads": 2, "init_std": 0.2, **options}


def model_for(case, seed=0, learned_states=False):
    """The case's model. learned_states: its layers that can learn their start state (state
    tuning) have one, random and non-zero, so that decoding has to carry it (for the other cases
    the model is the same either way). The tests that run a model build it here, so the check
    below covers every case."""
    options = case_options(case)
    config = build(ModelConfig, options, "model")
    if learned_states and any(config.mixer(kind)[0].learns_initial_state for kind in config.layer_pattern):
        config = build(ModelConfig, {**options, "learned_initial_state": True}, "model")
    model = LanguageModel(config, rngs=nnx.Rngs(seed))
    # Every parameter strongly typed float32: a weakly typed one (built from a Python float without
    # a dtype) becomes strong after the first optimizer update, so a jitted train step traces and
    # compiles again on its second and third calls (RWKV-7's k_a and r_k did, 5 s each here).
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        assert leaf.dtype == jnp.float32 and not leaf.weak_type, (case, jax.tree_util.keystr(path))
    states = nnx.state(model, InitialState)
    # Non-negative, so that the normalisers (the last column of a normalised linear attention's state) stay positive.
    nnx.update(model, jax.tree.map(lambda x: jax.random.uniform(jax.random.key(seed), x.shape, maxval=0.5), states))
    return model


def mixers_without_a_case():
    """The names of seqmix's registered mixers that no case's layer pattern uses, nor
    NOT_HARNESS_CASES lists; and those NOT_HARNESS_CASES lists stale (not registered, or used by a
    case). Mixers registered from outside the package (an example, a plugin) are not seqmix's to test."""
    own = {name for name in registered_mixers() if get_mixer(name).module_cls.__module__.startswith("seqmix.")}
    cased = set()
    for case in CASES:
        config = build(ModelConfig, case_options(case), case)
        cased |= {config.mixer(kind)[0].name for kind in config.layer_pattern}
    return sorted(own - cased - NOT_HARNESS_CASES), sorted(NOT_HARNESS_CASES - (own - cased))


def test_every_registered_mixer_has_a_harness_case(monkeypatch):
    """A mixer registered in seqmix without a case in CASES fails this test (so the decode, packing,
    bfloat16, gradient and overfitting checks above reach every mixer), and so does a stale entry of
    NOT_HARNESS_CASES."""
    assert mixers_without_a_case() == ([], [])
    monkeypatch.setitem(registry._MIXERS, "new_gla", dataclasses.replace(get_mixer("gla"), name="new_gla"))
    monkeypatch.delitem(registry._MIXERS, "moe")
    assert mixers_without_a_case() == (["new_gla"], ["moe"])


ROWS = (2, 80)  # the batch of the decode and packing tests: 80 tokens, more than one 64-token chunk


@nnx.jit
def forward(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


extend = nnx.jit(lambda model, tokens, cache, segment_ids=None, positions=None:
                 model.extend(tokens, cache, segment_ids, positions))


def tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("case", [case for case in [*CASES, *VARIANTS] if case not in NON_CAUSAL_CASES])
def test_decode_and_prefill_equal_the_chunked_forward(case):
    """From an empty cache: 5 one-token decode steps, a 66-token prefill (more than one 64-token
    chunk, starting from the cached state), then decode steps again; logits == one full forward.
    The recurrent layers start from learned, non-zero states (state tuning's), which must make a
    difference."""
    model = model_for(case, learned_states=True)
    batch = tokens(1, ROWS)
    cache = model.init_cache(*ROWS)
    pieces = []
    for start, stop in [(t, t + 1) for t in range(5)] + [(5, 71)] + [(t, t + 1) for t in range(71, 80)]:
        logits, cache = extend(model, batch[:, start:stop], cache)
        pieces.append(logits)
    one_document = jnp.ones(ROWS, jnp.int32)
    full = forward(model, batch, one_document)
    assert rel_err(jnp.concatenate(pieces, axis=1), full) < 1e-4
    assert cache[0].lengths.tolist() == [80, 80]
    states = nnx.state(model, InitialState)
    if jax.tree.leaves(states):
        nnx.update(model, jax.tree.map(jnp.zeros_like, states))
        assert rel_err(forward(model, batch, one_document), full) > 1e-3


@pytest.mark.parametrize("case", MIXED_CACHES)
def test_prompts_of_different_lengths_batched_with_left_padding_equal_each_alone(case, monkeypatch):
    """A batch of prompts of lengths 9 and 3 (left-padded) gives each row the logits it gets
    alone, for the prompt and a decode step after it, and `generate` continues the batch that
    way, prefilling in two pieces of 8 tokens (the first all padding for the short prompt), in
    models that hold every kind of cache (`MIXED_CACHES`), their recurrent layers starting from
    learned states (which the padding must leave alone)."""
    model = model_for(case, learned_states=True)
    prompts = [tokens(10, (9,)), tokens(11, (3,))]
    padded, segment_ids = left_pad(prompts)
    batch_logits, cache = extend(model, padded, model.init_cache(2, padded.shape[1] + 1), segment_ids,
                                 prompt_positions(segment_ids))
    greedy = jnp.argmax(batch_logits[:, -1], axis=-1)
    step_logits, _ = extend(model, greedy[:, None], cache, None, jnp.array([[9], [3]]))
    for row, prompt in enumerate(prompts):
        # alone, one token at a time (decoding equals prefilling, the test above): one compilation
        # serves both prompts and the step
        alone, alone_cache = [], model.init_cache(1, 12)
        for token in [*prompt, greedy[row]]:
            logits, alone_cache = extend(model, jnp.reshape(token, (1, 1)), alone_cache)
            alone.append(logits[0])
        assert rel_err(batch_logits[row, -len(prompt):], jnp.concatenate(alone[:-1])) < 1e-4, row
        assert rel_err(step_logits[row], alone[-1]) < 1e-4, row
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 8)
    continued = generate(model, prompts, 2, rng=jax.random.key(0), temperature=0.0)
    assert np.array_equal(continued, jnp.stack([greedy, jnp.argmax(step_logits[:, -1], axis=-1)], axis=1))


@pytest.mark.parametrize("case", CASES)
def test_packed_row_equals_documents_run_separately_also_in_bfloat16(case):
    """Two documents packed in a row, in either order, give each document the same logits: each
    segment starts from a zero state and reads nothing of the other document, before or after it;
    and with the parameters cast to bfloat16, as the trainer's compute_dtype does, the logits stay
    finite and within bfloat16's precision of float32's (states, gates and softmax statistics stay
    float32 in the mixers). The model and rows have the decode test's structure and shape, so that
    the two tests share the forward's compilation; its learned start states are zero, since a
    packed row's later segments start from zero (the kernels' contract, see state_tuning.py)."""
    model = model_for(case, learned_states=True)
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, InitialState)))
    doc_a, doc_b = tokens(3, (11,)), tokens(4, (7,))
    padding = jnp.zeros((ROWS[1] - 18,), jnp.int32)
    rows = jnp.stack([jnp.concatenate([doc_a, doc_b, padding]), jnp.concatenate([doc_b, doc_a, padding])])
    segment_ids = jnp.array([[1] * 11 + [2] * 7 + [0] * (ROWS[1] - 18), [1] * 7 + [2] * 11 + [0] * (ROWS[1] - 18)])
    logits = forward(model, rows, segment_ids)
    assert rel_err(logits[0, :11], logits[1, 7:18]) < 1e-4
    assert rel_err(logits[0, 11:18], logits[1, :7]) < 1e-4

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    low = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), rest)
    scored = np.asarray(segment_ids) != 0
    low_logits = np.asarray(forward(low, rows, segment_ids))[scored]
    assert np.all(np.isfinite(low_logits)) and rel_err(low_logits, np.asarray(logits)[scored]) < 0.05


def next_token_loss(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter_and_a_tiny_batch_is_overfit(case):
    model = model_for(case)
    batch = tokens(6, (2, 24))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
        assert np.any(leaf != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
    for _ in range(30):
        last, _ = step(model, optimizer)
    assert float(first) > 3.5 and float(last) < 0.3, (float(first), float(last))


def abstract_model(case):
    """The case's model from shapes alone: no parameter is allocated or initialised."""
    return nnx.eval_shape(lambda: LanguageModel(build(ModelConfig, case_options(case), "model"), rngs=nnx.Rngs(0)))


def cache_bytes(model, max_len):
    """The bytes of a model's decode cache for 2 rows of max_len tokens, from shapes alone (building
    the 30 models and their caches took this test 24 s of the suite's time)."""
    cache = jax.eval_shape(lambda: model.init_cache(2, max_len))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def test_decode_cache_does_not_grow_with_context_except_for_global_attention():
    for constant in [case for case in CASES if case not in GLOBAL_ATTENTION_CASES + NON_CAUSAL_CASES] + [
            "sliding_window_hybrid"]:
        model = abstract_model(constant)
        assert cache_bytes(model, 64) == cache_bytes(model, 65536), constant
    hybrid = abstract_model("gated_deltanet_3to1_hybrid")  # one global attention layer in four
    # rows x ((k, v) x width x float32 + valid)
    per_token = 2 * (2 * hybrid.layers[3].self_attn.k_proj.out_features * 4 + 1)
    assert cache_bytes(hybrid, 1064) - cache_bytes(hybrid, 64) == 1000 * per_token

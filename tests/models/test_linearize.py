"""Linearization of the Hugging Face fixtures (tests/fixtures/hf): with zero training steps a
Liger-GLA layer computes its formulas from the teacher's own q/k/v/o weights (read straight from
the safetensors files), kept layers stay the teacher's, and a linearized model decodes from its
recurrent + sliding-window cache exactly as its full forward."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import logits_of
from safetensors.numpy import load_file

from seqmix.configuration import ConfigError
from seqmix.models.generate import generate
from seqmix.models.hf import config_from_hf, from_pretrained
from seqmix.models.linearize import linearize
from seqmix.models.lora import add_lora

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def teacher(name):
    directory = FIXTURES / name
    return from_pretrained(directory), config_from_hf(json.loads((directory / "config.json").read_text()))


def hf_tensors(name):
    return {k: v for file in sorted((FIXTURES / name).glob("model*.safetensors")) for k, v in load_file(file).items()}


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def liger_gla_layer(tensors, layer, h, heads, kv_heads):
    """Liger-GLA token by token in float64 from the checkpoint's tensors: q, k, v = h W^T (+ b);
    per query head h (kv head h // group): S_t = diag(sigmoid(k_t)^(1/16)) S_{t-1} + softmax(k_t) v_t^T,
    o_t = S_t^T softmax(q_t); y = o W_o^T."""
    prefix = f"model.layers.{layer}.self_attn."
    project = lambda name: (h @ tensors[prefix + name + ".weight"].T.astype(np.float64)
                            + tensors.get(prefix + name + ".bias", 0.0))
    q, k, v = (project(p) for p in ("q_proj", "k_proj", "v_proj"))
    length, dim = h.shape[0], q.shape[-1] // heads
    q, k, v = q.reshape(length, heads, dim), k.reshape(length, kv_heads, dim), v.reshape(length, kv_heads, dim)
    out = np.zeros((length, heads, dim))
    for head in range(heads):
        kv = head // (heads // kv_heads)
        state = np.zeros((dim, dim))
        for t in range(length):
            gate = (1 / (1 + np.exp(-k[t, kv]))) ** (1 / 16)
            state = gate[:, None] * state + np.outer(softmax(k[t, kv]), v[t, kv])
            out[t, head] = softmax(q[t, head]) @ state
    return out.reshape(length, -1) @ tensors[prefix + "o_proj.weight"].T


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_zero_step_liger_gla_computes_its_formulas_from_the_teacher_weights(name):
    model, config = teacher(name)
    student, student_config = linearize(model, config, "liger_gla")
    assert student_config.mixer(student_config.layer_kinds()[0])[0].name == "liger_attention"
    tokens = jnp.asarray(load_file(FIXTURES / name / "expected.safetensors")["input_ids"][:1], jnp.int32)
    h = student.layers[0].input_layernorm(student.embed_tokens(tokens))
    got, _ = student.layers[0].self_attn(h)
    expected = liger_gla_layer(hf_tensors(name), 0, np.asarray(h[0], np.float64), config.n_heads, config.kv_heads)
    assert rel_err(got[0], expected) < 1e-5


def test_kept_layers_stay_attention_and_the_teacher_is_untouched():
    model, config = teacher("mistral")
    tokens = jnp.asarray(load_file(FIXTURES / "mistral" / "expected.safetensors")["input_ids"], jnp.int32)
    before = model(tokens)
    all_kept, _ = linearize(model, config, "liger_attention", keep=[0, 1])
    np.testing.assert_array_equal(all_kept(tokens), before)
    hybrid, hybrid_config = linearize(model, config, "liger_hgrn2", keep=[1])
    assert [hybrid_config.mixer(k)[0].name for k in hybrid_config.layer_kinds()] == ["liger_attention", "attention"]
    assert rel_err(hybrid(tokens), before) > 1e-2  # layer 0 changed
    np.testing.assert_array_equal(model(tokens), before)
    with pytest.raises(ConfigError, match="unknown method 'lolcat'"):
        linearize(model, config, "lolcat")
    with pytest.raises(ConfigError, match="layer 2 is not in 0..1"):
        linearize(model, config, "liger_gla", keep=[2])


@pytest.mark.parametrize("method, keep", [("liger_gla", ()), ("liger_hgrn2", ()), ("liger_attention", ()),
                                          ("lolcats", ()), ("liger_attention", (1,))])
def test_a_linearized_model_decodes_from_its_cache_as_its_full_forward(method, keep):
    """Every method, and one with a kept attention layer, with LoRA adapters on q/k/v/o as a
    linearize run trains them (non-zero, as after training; a LoRA-wrapped projection once broke
    decoding): a 70-token prefill (past the 64-slot windows, whose tokens then leave for LoLCATs'
    state), then 10 one-token steps; the logits equal one full forward, and `generate` runs."""
    model, config = teacher("llama")
    student, _ = linearize(model, config, method, keep=keep)
    add_lora(student, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    for path, variable in nnx.to_flat_state(nnx.state(student, nnx.LoRAParam)):
        variable.set_value(0.05 * jax.random.normal(jax.random.key(hash(path) % 2**31), variable.shape))
    tokens = jax.random.randint(jax.random.key(3), (2, 80), 0, config.vocab_size)
    extend = nnx.jit(lambda student, tokens, cache: student.extend(tokens, cache))
    logits, cache = extend(student, tokens[:, :70], student.init_cache(2, 80))
    pieces = [logits]
    for t in range(70, 80):
        step_logits, cache = extend(student, tokens[:, t:t + 1], cache)
        pieces.append(step_logits)
    assert rel_err(jnp.concatenate(pieces, axis=1), logits_of(student, tokens)) < 1e-4
    generated = generate(student, [np.asarray(tokens[0, :5])], 4, rng=jax.random.key(0), temperature=0.0)
    assert np.asarray(generated).shape == (1, 4)

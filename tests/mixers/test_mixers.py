"""Every registered mixer, in a small model: chunked forward == token-by-token decode, prefill +
decode == full forward, packed rows == separate documents, finite gradients reaching every
parameter, and a model that overfits a tiny batch. A new mixer joins by adding a case."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.lm import LanguageModel

VOCAB = 64

CASES = {
    "deltanet": {"layer_pattern": ["deltanet"]},
    "gated_deltanet": {"layer_pattern": ["gated_deltanet"]},
    "gla": {"layer_pattern": ["gla"]},
    "gated_deltanet_3to1_hybrid": {
        "n_layers": 4, "layer_pattern": ["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"]},
}


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


VARIANTS = {"deltanet_negative_eigenvalues": {
    "layer_pattern": ["mixer"], "mixers": {"mixer": {"type": "deltanet", "negative_eigenvalues": True}}}}


def model_for(case, seed=0):
    options = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.2,
               **{**CASES, **VARIANTS}[case]}
    return LanguageModel(build(ModelConfig, options, "model"), rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, tokens, segment_ids=None):
    return model(tokens, segment_ids=segment_ids)


extend = nnx.jit(lambda model, tokens, cache: model.extend(tokens, cache))


def tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("case", [*CASES, "deltanet_negative_eigenvalues"])
def test_decoding_token_by_token_equals_chunked_forward(case):
    model = model_for(case)
    batch = tokens(1, (2, 21))
    cache = model.init_cache(2, 21)
    steps = []
    for t in range(21):
        logits, cache = extend(model, batch[:, t:t + 1], cache)
        steps.append(logits)
    assert rel_err(jnp.concatenate(steps, axis=1), forward(model, batch)) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_equals_full_forward(case):
    model = model_for(case)
    batch = tokens(2, (3, 83))  # a prefill longer than one 64-token chunk, then decode steps
    cache = model.init_cache(3, 83)
    pieces = []
    logits, cache = extend(model, batch[:, :70], cache)
    pieces.append(logits)
    for t in range(70, 83):
        logits, cache = extend(model, batch[:, t:t + 1], cache)
        pieces.append(logits)
    assert rel_err(jnp.concatenate(pieces, axis=1), forward(model, batch)) < 1e-4
    assert cache[0].lengths.tolist() == [83] * 3


@pytest.mark.parametrize("case", CASES)
def test_packed_row_equals_documents_run_separately(case):
    model = model_for(case)
    doc_a, doc_b = tokens(3, (1, 11)), tokens(4, (1, 7))
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 11 + [2] * 7 + [0] * 4])
    logits = forward(model, packed, segment_ids)
    assert rel_err(logits[:, :11], forward(model, doc_a)) < 1e-4
    assert rel_err(logits[:, 11:18], forward(model, doc_b)) < 1e-4


def next_token_loss(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@pytest.mark.parametrize("case", CASES)
def test_gradients_are_finite_and_reach_every_parameter(case):
    model = model_for(case)
    grads = nnx.jit(nnx.grad(next_token_loss))(model, tokens(5, (2, 19)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
        assert np.any(leaf != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("case", CASES)
def test_overfits_a_tiny_batch(case):
    model = model_for(case)
    batch = tokens(6, (2, 24))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(80):
        last = float(step(model, optimizer))
    assert first > 3.5 and last < 0.3, (first, last)

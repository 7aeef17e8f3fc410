"""LoRA on a model loaded from the Hugging Face fixtures: adapters start as the identity change,
an optimizer over LoRAParam trains them alone (state for them only, base weights bit-identical),
and merging gives the adapted model's logits with the original parameter names; PiSSA's adapters
start as each projection's principal part."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from seqmix.models.hf import config_from_hf, from_pretrained, save_pretrained
from seqmix.models.lora import add_lora, merge_lora, principal_adapters

FIXTURE = Path(__file__).parents[1] / "fixtures" / "hf" / "qwen2"


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_lora_trains_the_adapters_alone_and_merges_exactly(tmp_path):
    model = from_pretrained(FIXTURE)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 96)
    before = model(tokens)
    base = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1)) == 6  # q, k, v of 2 layers
    np.testing.assert_array_equal(model(tokens), before)  # B = 0

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    adapter_sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
    state_sizes = [x.size for x in jax.tree.leaves(optimizer.opt_state) if x.size > 1]
    assert sorted(state_sizes) == sorted(adapter_sizes * 2)  # Adam's two moments, adapters only

    def loss(model):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return value

    first = step(model, optimizer)
    for _ in range(20):
        last = step(model, optimizer)
    assert float(last) < float(first)
    adapted = model(tokens)
    assert rel_err(adapted, before) > 1e-3
    frozen = {tuple(p for p in path if p != "base"): v.get_value()
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not isinstance(v, nnx.LoRAParam)}
    originals = {path: v.get_value() for path, v in nnx.to_flat_state(base)}
    assert frozen.keys() == originals.keys()
    assert all(np.array_equal(np.asarray(frozen[path]), originals[path]) for path in originals)

    assert merge_lora(model) == 6
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert rel_err(model(tokens), adapted) < 1e-5
    config = config_from_hf(json.loads((FIXTURE / "config.json").read_text()))
    save_pretrained(model, config, tmp_path)  # original names again
    assert rel_err(from_pretrained(tmp_path)(tokens), adapted) < 1e-5


def test_a_target_that_names_nothing_is_refused():
    with pytest.raises(ValueError, match=r"LoRA target 'qproj' names no projection of the model \(its projections: "
                                         r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\)"):
        add_lora(from_pretrained(FIXTURE), targets=("qproj",), rngs=nnx.Rngs(0))


def test_pissa_adapters_hold_the_principal_part_and_merge_back_to_the_original():
    """At step 0 the PiSSA-initialised model computes the original function, its frozen residual
    lacks the top `rank` singular values, and merging gives back the original kernels."""
    model = from_pretrained(FIXTURE)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 96)
    before = model(tokens)
    original = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    assert principal_adapters(model) == 6
    assert rel_err(model(tokens), before) < 1e-5
    singular = np.linalg.svd(original, compute_uv=False)
    residual = np.linalg.svd(np.asarray(model.layers[0].self_attn.q_proj.base.kernel[...]), compute_uv=False)
    np.testing.assert_allclose(residual[0], singular[4], rtol=1e-4)  # the top 4 moved to the adapter
    merge_lora(model)
    merged = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    assert rel_err(merged, original) < 1e-6
    assert rel_err(model(tokens), before) < 1e-5

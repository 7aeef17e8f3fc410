"""Decode memory at length: a Hugging Face hybrid's decode caches keep one size however many
tokens a row holds, but for its global attention layers, which the test reads off each fixture's
config.json in the hub's own terms (windowed attention is a ring of its window; RecurrentGemma's
attention is always local, Falcon-H1's runs beside Mamba-2 in every layer). The sizes at real
scale are benchmarks/decode_memory.py's, in RESULTS.md."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hf_fixtures import hf_json

from seqmix.models.hf import config_from_hf
from seqmix.models.lm import LanguageModel


def _global_attention(hf):
    """The layers whose cache grows with the context, by the rules of each family's hub config."""
    windowed = hf.get("sliding_window") is not None
    growing = {
        "mamba2": lambda: [],
        "recurrent_gemma": lambda: [],
        "falcon_h1": lambda: list(range(hf["num_hidden_layers"])),
        "nemotron_h": lambda: [i for i, kind in enumerate(hf["layers_block_type"]) if kind == "full_attention"],
        "lfm2": lambda: list(hf["full_attn_idxs"]),
        "minimax": lambda: [] if windowed else [i for i, kind in enumerate(hf["layer_types"])
                                                 if kind == "full_attention"],
        "kimi_linear": lambda: [i for i, kind in enumerate(hf["layer_types"]) if kind == "full_attention"],
    }
    return growing[hf["model_type"]]()


def _cache_bytes(model, length):
    caches = jax.eval_shape(lambda: model.init_cache(1, length, jnp.bfloat16))
    return [sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) for cache in caches]


@pytest.mark.parametrize("name", ["mamba2", "nemotron_h", "falcon_h1", "lfm2", "minimax", "recurrent_gemma",
                                  "kimi_linear"])
def test_only_global_attention_caches_grow_with_the_context(name):
    hf = hf_json(name)
    config = config_from_hf(hf)
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    short, long = _cache_bytes(model, 1024), _cache_bytes(model, 65536)
    growing = [index for index, (a, b) in enumerate(zip(short, long)) if a != b]
    assert growing == _global_attention(hf)

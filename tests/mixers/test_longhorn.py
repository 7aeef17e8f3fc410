"""Longhorn's mixer against a float64 numpy loop of the paper's implicit online update, on a
packed row, with every parameter random."""

import numpy as np
from flax import nnx
from mixer_checks import packed_row, rel_err, selective_block_by_token, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.longhorn import Longhorn
from seqmix.mixers.mamba import MambaConfig
from seqmix.models.config import ModelConfig


def test_longhorn_matches_the_online_regression_update_by_token():
    model = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")
    mixer = with_random_weights(Longhorn(model, build(MambaConfig, {"state_dim": 4}, "mixer"), rngs=nnx.Rngs(0)),
                                seed=1)

    def advance(S, logits, k, x):  # beta = sigmoid(.); eps = beta / (1 + beta k.k); S = (1 - eps k^2) S + eps x k^T
        beta = 1 / (1 + np.exp(-logits))
        eps = beta / (1 + beta * (k @ k))
        return (1 - np.outer(eps, k * k)) * S + np.outer(eps * x, k)

    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    expected = selective_block_by_token(mixer, x, segment_ids, advance)
    y, _ = nnx.jit(lambda mixer, x, ids: mixer(x, segment_ids=ids))(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], expected[real]) < 1e-5

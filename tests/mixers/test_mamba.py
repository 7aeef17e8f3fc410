"""Mamba-1's mixer against a float64 numpy loop of its equations (transformers' MambaMixer), on a
packed row, with every parameter random."""

import numpy as np
from flax import nnx
from mixer_checks import packed_row, rel_err, selective_block_by_token, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.mamba import Mamba, MambaConfig
from seqmix.models.config import ModelConfig


def test_mamba_matches_the_selective_ssm_by_token():
    model = build(ModelConfig, {"d_model": 16, "n_heads": 2}, "model")
    mixer = with_random_weights(Mamba(model, build(MambaConfig, {"state_dim": 4, "dt_rank": 3}, "mixer"),
                                      rngs=nnx.Rngs(0)), seed=1)
    A = -np.exp(np.asarray(mixer.A_log[...], np.float64))

    def advance(h, logits, B, x):  # dt = softplus(.); h = exp(dt A) h + dt x B^T
        dt = np.logaddexp(0.0, logits)
        return np.exp(dt[:, None] * A) * h + np.outer(dt * x, B)

    x, segment_ids = packed_row(16)
    real = np.asarray(segment_ids) != 0
    expected = selective_block_by_token(mixer, x, segment_ids, advance)
    y, _ = nnx.jit(lambda mixer, x, ids: mixer(x, segment_ids=ids))(mixer, x, segment_ids)
    assert rel_err(np.asarray(y)[real], expected[real]) < 1e-5

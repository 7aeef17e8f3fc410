"""Hydra against a float64 NumPy oracle of its quasiseparable mixing matrix, built per segment and
head from the paper's equations (forward scan below the diagonal, backward scan above it, the
data-dependent D on it), on packed rows; and its refusal to decode."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import PACKED_SEGMENT_IDS, packed_row, rel_err, with_random_weights

from seqmix.configuration import build
from seqmix.mixers.hydra import Hydra, HydraConfig
from seqmix.models.config import ModelConfig

D_MODEL, HEADS, STATE, WIDTH = 8, 2, 4, 3


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def hydra_np(mixer, x, segment_ids):
    """y [B, T, D] float64 (padding rows zero): each segment's tokens mixed by the T_s x T_s matrix
    M_h of each head, as if the segment were alone."""
    p = {name: np.asarray(value, np.float64) for name, value in [
        ("w_in", mixer.in_proj.kernel[...]), ("conv", mixer.conv.weight[...]), ("conv_b", mixer.conv.bias[...]),
        ("A_log", mixer.A_log[...]), ("dt_bias", mixer.dt_bias[...]), ("D", mixer.D[...]),
        ("w_D", mixer.fc_D.kernel[...]), ("norm", mixer.norm.weight[...]), ("w_out", mixer.out_proj.kernel[...])]}
    inner = 2 * D_MODEL
    x, ids = np.asarray(x, np.float64), np.asarray(segment_ids)
    y = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for segment in set(ids[b]) - {0}:
            where = np.flatnonzero(ids[b] == segment)
            projected = x[b, where] @ p["w_in"]
            z, xbc, dt = projected[:, :inner], projected[:, inner:-2 * HEADS], projected[:, -2 * HEADS:]
            padded = np.pad(xbc, [(WIDTH // 2, WIDTH // 2), (0, 0)])  # the centred window, zeros past the ends
            xbc = silu(p["conv_b"] + sum(p["conv"][j] * padded[j:j + len(where)] for j in range(WIDTH)))
            values, b_f, c_f, b_b, c_b = np.split(xbc, [inner + i * STATE for i in range(4)], axis=-1)
            dt_f, dt_b = softplus(dt[:, :HEADS] + p["dt_bias"]), softplus(dt[:, HEADS:] + p["dt_bias"])
            log_a_f, log_a_b = -np.exp(p["A_log"]) * dt_f, -np.exp(p["A_log"]) * dt_b  # [T_s, H]
            heads = values.reshape(len(where), HEADS, -1)
            diagonal = p["D"] + values @ p["w_D"]
            mixed = np.zeros_like(heads)
            for h in range(HEADS):
                m = np.diag(diagonal[:, h])
                for i in range(len(where)):
                    for j in range(len(where)):
                        if j < i:  # shift(SS(x)): row i reads the forward scan's output at i - 1
                            decay = np.exp(log_a_f[j + 1:i, h].sum())
                            m[i, j] = c_f[i - 1] @ b_f[j] * dt_f[j, h] * decay
                        elif j > i:  # flip(shift(SS(flip(x)))): the backward scan's output at i + 1
                            decay = np.exp(log_a_b[i + 1:j, h].sum())
                            m[i, j] = c_b[i + 1] @ b_b[j] * dt_b[j, h] * decay
                mixed[:, h] = m @ heads[:, h]
            gated = mixed.reshape(len(where), inner) * silu(z)
            normed = gated / np.sqrt(np.mean(gated ** 2, axis=-1, keepdims=True) + 1e-6) * p["norm"]
            y[b, where] = normed @ p["w_out"]
    return y


def test_hydra_equals_its_quasiseparable_matrix_on_packed_rows_and_refuses_to_decode():
    """Two rows: two documents then padding, one document filling the row (21 tokens, chunks of
    16, a window of 3): each document's output is its own mixing matrix times its own tokens."""
    model_config = build(ModelConfig, {"d_model": D_MODEL, "n_heads": HEADS, "n_layers": 2, "norm_eps": 1e-6})
    config = HydraConfig(state_dim=STATE, conv_width=WIDTH, chunk_size=16)
    mixer = with_random_weights(Hydra(model_config, config, rngs=nnx.Rngs(0)), seed=1)
    x, segment_ids = packed_row(D_MODEL)
    y, cache = nnx.jit(lambda mixer, x, ids: mixer(x, segment_ids=ids))(mixer, x, segment_ids)
    assert cache is None and y.dtype == jnp.float32
    real = np.asarray(segment_ids) != 0
    assert rel_err(np.asarray(y)[real], hydra_np(mixer, x, PACKED_SEGMENT_IDS)[real]) < 1e-5
    with pytest.raises(ValueError, match="hydra is not causal"):
        mixer.init_cache(2, 21, jnp.float32)

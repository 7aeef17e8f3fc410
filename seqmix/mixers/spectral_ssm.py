"""Spectral state space model: the STU layer of "Spectral State Space Models" (Agarwal, Suo, Chen,
Hazan 2023), fixed spectral filters with learned projections, in the tensordot form of its
Flash STU follow-up (Liu et al. 2024).

The filters phi_k [L] are the top-K eigenvectors, eigenvalues sigma_k, of the Hankel matrix

    Z_L[i, j] = 2 / ((i + j)^3 - (i + j)),   1 <= i, j <= L

computed once in float64 numpy (a constant, not a parameter; L = `filter_length`, so a longer
call sees taps 0..L-1 only). The paper's features and output:

    U+_{t,k} = sum_{j<L} sigma_k^(1/4) phi_k[j] u_{t-j},   U-_{t,k} = the same with (-1)^j phi_k[j]
    y_t = sum_k (M+_k U+_{t,k} + M-_k U-_{t,k})          (M+-_k [D, D] in the paper)

This layer, with v = x W_in [D, D] and M+- [K, D] (one weight per filter and channel):

    y_t[d] = sum_{j<L} F[d, j] v_{t-j}[d],   F[d, j] = sum_k sigma_k^(1/4) phi_k[j] (M+[k, d] + (-1)^j M-[k, d])

that is M+-_k = diag(M+-[k]) W_in, the projection shared by the K filters, so the K + K
convolutions of the paper become one depthwise long convolution of D channels
(`seqmix.pallas_kernels.fftconv.causal_conv`), K times cheaper, with 2 K D + D^2 parameters
instead of 2 K D^2 (the paper's form at d_model 128 and K = 16 holds 0.5M per layer).
The eigenvectors' signs are fixed (each one's largest entry positive), so a layer's function does
not depend on the LAPACK build.

Decode keeps the last L - 1 values of v (a window of constant size) and takes the L-tap dot
product with F per token; a prefill from a cache convolves the window followed by the call.

Departures from the paper, and why:
- the tensordot form above instead of a full M+-_k per filter (Flash STU's; the cost and the
  parameter count);
- the paper's autoregressive terms (y_{t-2} and three M^u_i u_{t+1-i}) and its two-step output
  delay are dropped, as in the STU-T / Flash STU models: the surrounding model has its MLPs and
  residual stream, and the delay would only lag every output;
- packed rows are compacted first (`long_convolution`), so padding takes no time slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.mixers.long_convolution import compaction, last_tokens, take_rows
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.fftconv import causal_conv
from seqmix.pallas_kernels.segments import reset_groups


@dataclasses.dataclass
class SpectralSSMConfig:
    num_filters: int = 16  # K: the top eigenvectors kept
    filter_length: int = 256  # L: taps of every filter (the Hankel matrix's size)

    def validate(self, path: str) -> None:
        require(self.filter_length >= 1, path, "filter_length", f"must be >= 1, got {self.filter_length}")
        require(1 <= self.num_filters <= self.filter_length, path, "num_filters",
                f"must be in [1, filter_length = {self.filter_length}], got {self.num_filters}")


@functools.lru_cache(maxsize=None)
def spectral_filters(length: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma [K] float64, descending; phi [L, K] float64): the top-K eigenpairs of Z_L, each
    eigenvector's largest-magnitude entry positive."""
    i_plus_j = np.arange(1, length + 1)[:, None] + np.arange(1, length + 1)[None, :]
    sigma, phi = np.linalg.eigh(2.0 / (i_plus_j**3 - i_plus_j))
    sigma, phi = sigma[::-1][:count], phi[:, ::-1][:, :count]
    return sigma, phi * np.sign(phi[np.argmax(np.abs(phi), axis=0), np.arange(count)])


@struct.dataclass
class SpectralSSMCache:
    """window [B, L-1, D] float32: the last L-1 values of v in the current segment (zeros before);
    lengths [B] int32 (tokens seen per row). Its size does not depend on the number of tokens."""

    window: jax.Array
    lengths: jax.Array


@register_mixer("spectral_ssm", SpectralSSMConfig)
class SpectralSSM(nnx.Module):
    """x [B, T, D] -> [B, T, D]: in_proj [D, D], m_plus and m_minus [K, D]."""

    def __init__(self, model_config, config: SpectralSSMConfig, *, rngs: nnx.Rngs):
        width = model_config.d_model
        self.filter_length, self.num_filters = config.filter_length, config.num_filters
        self.in_proj = projection(width, width, ("embed", "heads"), std=model_config.init_std, rngs=rngs)
        # Unit-variance outputs for unit-variance v: the K scaled filters have norms sigma_k^(1/4) <= 1.
        m = lambda: nnx.Param(jax.random.normal(rngs.params(), (config.num_filters, width), jnp.float32)
                              * config.num_filters**-0.5, out_sharding=(None, "heads"), eager_sharding=False)
        self.m_plus, self.m_minus = m(), m()

    def filters(self):
        """F [D, L] float32: each channel's combination of the scaled filters, both signs."""
        sigma, phi = spectral_filters(self.filter_length, self.num_filters)
        scaled = jnp.asarray((phi * sigma**0.25).T, jnp.float32)  # [K, L]
        alternating = jnp.asarray((-1.0) ** np.arange(self.filter_length), jnp.float32)
        plus, minus = self.m_plus[...].astype(jnp.float32), self.m_minus[...].astype(jnp.float32)
        combine = lambda m: jnp.matmul(m.T, scaled, precision=lax.Precision.HIGHEST)
        return combine(plus) + combine(minus) * alternating

    def __call__(self, x, *, segment_ids=None, positions=None, cache: SpectralSSMCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused (the filters
        are positional). Returns (y [B, T, D] in x's dtype, the updated cache or None)."""
        del positions
        v = self.in_proj(x).astype(jnp.float32)
        filters = self.filters()
        if cache is not None and x.shape[1] == 1:
            valid = None if segment_ids is None else segment_ids[:, 0] != 0
            y, window = self.step(v[:, 0], filters, cache.window, valid)
            y = y[:, None]
        else:
            y, window = self.convolve(v, filters, segment_ids, None if cache is None else cache.window)
        if cache is None:
            return y.astype(x.dtype), None
        return y.astype(x.dtype), SpectralSSMCache(window=window, lengths=cache.lengths + x.shape[1])

    @staticmethod
    def step(v, filters, window, valid):
        """One decode step: v [B, D], filters [D, L], window [B, L-1, D], valid [B] bool or None.
        Returns (y [B, D], window); a padding token outputs zero and keeps the window."""
        seen = jnp.concatenate([window, v[:, None]], axis=1)  # [B, L, D], oldest first
        y = jnp.einsum("bjd,dj->bd", seen[:, ::-1], filters, precision=lax.Precision.HIGHEST)  # as exact as the FFT
        if valid is None:
            return y, seen[:, 1:]
        return jnp.where(valid[:, None], y, 0.0), jnp.where(valid[:, None, None], seen[:, 1:], window)

    def convolve(self, v, filters, segment_ids, window):
        """The convolution form: v [B, T, D] float32, segment_ids [B, T] or None, window
        [B, L-1, D] or None (no cache). Returns (y [B, T, D] float32, the window after the call
        or None)."""
        batch, length, _ = v.shape
        if segment_ids is not None:
            order, restore, count = compaction(segment_ids)
            v, segment_ids = take_rows(v, order), take_rows(segment_ids, order)
            v = jnp.where((segment_ids != 0)[..., None], v, 0.0)
        history = 0 if window is None else window.shape[1]
        if window is not None:
            # The window continues the call's first segment (id 1 for a row of padding only).
            v = jnp.concatenate([window, v], axis=1)
            if segment_ids is not None:
                first = jnp.where(segment_ids[:, :1] != 0, segment_ids[:, :1], 1)
                segment_ids = jnp.concatenate([jnp.broadcast_to(first, (batch, history)), segment_ids], axis=1)
        y = causal_conv(v, filters[:, : min(self.filter_length, history + length)], segment_ids=segment_ids)
        if window is not None:
            count = history + (jnp.full((batch,), length, jnp.int32) if segment_ids is None else count)
            valid, groups = reset_groups(segment_ids, batch, history + length)
            last_group = take_rows(groups, (count - 1)[:, None])[:, 0]
            own = jnp.where((valid & (groups == last_group[:, None]))[..., None], v, 0.0)
            window = last_tokens(own, count, history)
        y = y[:, history:]
        return (y if segment_ids is None else take_rows(y, restore)), window

    def init_cache(self, batch: int, max_len: int, dtype) -> SpectralSSMCache:
        del max_len, dtype  # the window is float32 whatever the compute dtype
        return SpectralSSMCache(window=jnp.zeros((batch, self.filter_length - 1, self.m_plus.shape[1]), jnp.float32),
                                lengths=jnp.zeros((batch,), jnp.int32))

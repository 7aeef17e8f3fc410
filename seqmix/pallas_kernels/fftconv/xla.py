"""`causal_conv` by FFT, in plain XLA (cuFFT on GPU, DUCC on CPU, the TPU's FFT unit).

One row, no segments: one real FFT of a size n >= T + L - 1 (the zero padding keeps the circular
convolution from wrapping around), n the smallest 2^a 3^b, in O(T log T).

Packed rows are a divide and conquer over blocks, exact with static shapes, O(T log^2 T):
- the row is padded to P = 2^k tokens; distance 0 is the elementwise product with tap 0;
- at each level, with blocks of 2m tokens (m = 1, 2, 4, ..., P/2), the contribution of every
  block's left half to its right half. Reset groups (`segments.reset_groups`) never decrease along
  a row, so if key s < midpoint <= query t share a group g, then
  g = group(s) <= group(midpoint - 1) <= group(t) = g: the only group that crosses the midpoint is
  g* = the group of the left half's last token. The keys it holds are a suffix of the left half,
  its queries a prefix of the right half, and the cross term is ONE convolution per block: the left
  half masked to g*, the filter's taps 1..2m-1, read on the right half masked to g*. Distances
  t - s lie in [1, 2m-1], so an FFT of size 2m does not wrap: one batched FFT per level,
  O(T log m). Below DIRECT_BELOW the cross term is a dense [m, m] Toeplitz product per channel
  (matmuls, which beat tiny FFTs and a loop over taps, forward and backward).
Every pair (query t, key s < t) of a row lies across the midpoint of exactly one block (the
smallest block holding both), so each term is counted once.

Gradients are jax's autodiff through `jnp.fft` and the Toeplitz products: the op is linear in x
and in the filters, and autodiff's transpose of each level is the matching correlation, of the
same sizes. Measured on packed rows (T = 4096, D = 64, 8 segments, CPU): forward 13.7 ms, the
cotangent of x 13.7 ms, of the filters 14.3 ms. A custom_vjp (the x cotangent as the same divide
and conquer over the reversed row, groups negated so they still never decrease) took 17.1 ms: no
custom_vjp.
"""

import math

import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels.segments import reset_groups

DIRECT_BELOW = 32  # half-blocks shorter than this take a dense Toeplitz product instead of an FFT


def fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b >= n (sizes the FFT libraries handle fastest)."""
    best = 1 << max(0, math.ceil(math.log2(n)))
    power_of_three = 1
    while power_of_three < best:
        size = power_of_three
        while size < n:
            size *= 2
        best = min(best, size)
        power_of_three *= 3
    return best


def _fft_conv(x32, filters, length: int):
    """Causal convolution of x32 [..., D, N] (float32, time last: XLA's FFT runs on the last axis)
    with filters [D, F] (F <= N), no wrap-around; the first `length` outputs."""
    size = fast_fft_size(x32.shape[-1] + filters.shape[1] - 1)
    spectrum = jnp.fft.rfft(x32, n=size) * jnp.fft.rfft(filters, n=size)
    return jnp.fft.irfft(spectrum, n=size)[..., :length]


def _cross_term(left, taps, half: int):
    """left [B, D, blocks, half] (each block's left half, masked) -> its contribution to the right
    halves [B, D, blocks, half]: out[t] = sum_s taps[half + t - s] left[s], distances 1..2 half - 1."""
    if half < DIRECT_BELOW:
        distance = half + jnp.arange(half)[:, None] - jnp.arange(half)[None, :]
        return jnp.einsum("dts,bdns->bdnt", taps[:, distance], left, precision=lax.Precision.HIGHEST)
    spectrum = jnp.fft.rfft(left, n=2 * half) * jnp.fft.rfft(taps[:, : 2 * half])[:, None, :]
    return jnp.fft.irfft(spectrum, n=2 * half)[..., half:]


def _packed_conv(x32, filters, groups):
    """The divide and conquer of the module docstring: x32 [B,D,T] float32 (time last, zero on
    padding), filters [D,L] float32, groups [B,T] int32 -> y [B,D,T] float32 (padding not yet zeroed)."""
    batch, channels, length = x32.shape
    padded = 2 ** math.ceil(math.log2(length))
    x32 = jnp.pad(x32, ((0, 0), (0, 0), (0, padded - length)))
    groups = jnp.pad(groups, ((0, 0), (0, padded - length)), mode="edge")[:, None, :]
    taps = jnp.pad(filters, ((0, 0), (0, max(0, padded - filters.shape[1]))))
    y = x32 * taps[:, :1]  # distance 0
    half = 1
    while half < padded:
        blocks = x32.reshape(batch, channels, padded // (2 * half), 2 * half)
        block_groups = groups.reshape(batch, 1, padded // (2 * half), 2 * half)
        crossing = block_groups[..., half - 1 : half]  # g*, [B, 1, blocks, 1]
        left = jnp.where(block_groups[..., :half] == crossing, blocks[..., :half], 0.0)
        reached = jnp.where(block_groups[..., half:] == crossing, _cross_term(left, taps, half), 0.0)
        y = y + jnp.pad(reached, ((0, 0), (0, 0), (0, 0), (half, 0))).reshape(y.shape)
        half *= 2
    return y[..., :length]


def causal_conv_xla(x, filters, *, segment_ids):
    """x [B,T,D]; filters [D,L] float32 (L <= T); segment_ids [B,T] int or None.
    Returns y [B,T,D] in x's dtype (computed in float32)."""
    batch, length, _ = x.shape
    filters = filters.astype(jnp.float32)
    time_last = jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # [B,D,T]
    if segment_ids is None:
        return jnp.swapaxes(_fft_conv(time_last, filters, length), 1, 2).astype(x.dtype)
    valid, groups = reset_groups(segment_ids, batch, length)
    y = _packed_conv(jnp.where(valid[:, None, :], time_last, 0.0), filters, groups)
    return jnp.swapaxes(jnp.where(valid[:, None, :], y, 0.0), 1, 2).astype(x.dtype)

"""Long causal convolution: a [B, T, D] signal with a per-channel filter as long as T, by FFT.

`causal_conv` is the op (the S4D mixer's kernel, the spectral SSM's filters).
Decoding an arbitrary filter has no constant-size state: the mixers built on it decode their own way.
"""

from seqmix.pallas_kernels.fftconv.op import IMPLEMENTATIONS, causal_conv

__all__ = ["IMPLEMENTATIONS", "causal_conv"]

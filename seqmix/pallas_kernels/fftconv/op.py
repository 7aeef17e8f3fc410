"""`causal_conv`: the one public op of the long-convolution family, and its dispatch."""

import jax.numpy as jnp

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.fftconv.reference import causal_conv_reference
from seqmix.pallas_kernels.fftconv.xla import causal_conv_xla

# No Pallas implementation: Pallas has no FFT primitive, and an FFT convolution written as Pallas
# matmuls (FlashFFTConv's Monarch decomposition) competes with cuFFT, which XLA already calls.
IMPLEMENTATIONS = [
    registry.Implementation("xla", causal_conv_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", causal_conv_reference, registry.always, ()),
]


def causal_conv(x, filters, *, segment_ids=None, impl="auto"):
    """Causal depthwise convolution of x with a long filter per channel, within packed segments.

        y_t[d] = sum_{j=0}^{min(L-1, t - start(t))} filters[d, j] x_{t-j}[d]

    x [B,T,D] bfloat16 or float32 (computed in float32); filters [D,L] with 1 <= L <= T (tap j
    multiplies x_{t-j}; L == T is the main case); segment_ids [B,T] int (0 = padding) or None:
    start(t) is the first token of t's segment (`segments.reset_groups`: padding between tokens of
    one id does not end it, and the filter is positional, so such padding takes its slot), padding
    inputs contribute nothing and padding outputs are zero.
    impl: "auto" (the FFT path, `xla`), "xla" or "reference" (the direct product, O(T L)).
    Departs from the kernel contract: no Pallas implementations (see IMPLEMENTATIONS), and no
    initial_state / final_state, which an arbitrary filter does not have.
    Returns y [B,T,D] in x's dtype.
    """
    op = "causal_conv"
    if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{op}: x must be floating point [B,T,D], got {x.dtype} {x.shape}")
    batch, length, channels = x.shape
    if filters.ndim != 2 or filters.shape[0] != channels or not 1 <= filters.shape[1] <= length:
        raise ValueError(f"{op}: filters must be [D,L] with D = {channels} and 1 <= L <= T = {length}, "
                         f"got {filters.shape}")
    if segment_ids is not None and (segment_ids.shape != (batch, length)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"{op}: segment_ids must be integers [B,T] = {(batch, length)}, "
                         f"got {segment_ids.dtype} {segment_ids.shape}")
    implementation = registry.choose(IMPLEMENTATIONS, impl, (x.shape, filters.shape), op)
    return implementation.run(x, filters, segment_ids=segment_ids)

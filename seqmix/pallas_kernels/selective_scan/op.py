"""`selective_scan`: the one public op of the selective scan family (Mamba-1, Longhorn), and its
dispatch."""

import jax.numpy as jnp

from seqmix.pallas_kernels import checks, registry
from seqmix.pallas_kernels.selective_scan import pallas_gpu
from seqmix.pallas_kernels.selective_scan.reference import selective_scan_reference
from seqmix.pallas_kernels.selective_scan.step import UPDATES
from seqmix.pallas_kernels.selective_scan.xla import selective_scan_xla

# No TPU kernel yet: the xla path serves TPUs, and GPUs where the kernel's tiles do not fit.
IMPLEMENTATIONS = [
    registry.Implementation("pallas_gpu", pallas_gpu.selective_scan_pallas_gpu, pallas_gpu.supports, ("gpu",)),
    registry.Implementation("xla", selective_scan_xla, registry.always, ("cpu", "gpu", "tpu")),
    registry.Implementation("reference", selective_scan_reference, registry.always, ()),
]


def selective_scan(x, dt, A, B, C, *, update="mamba", initial_state=None, segment_ids=None,
                   output_final_state=False, chunk_size=64, impl="auto"):
    """A selective state space scan over packed sequences: a decay per (channel, state element).

        update="mamba":     h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
        update="longhorn":  h_t[d, n] = (1 - eps_t[d] B_t[n]^2) h_{t-1}[d, n] + eps_t[d] B_t[n] x_t[d],
                            eps_t[d] = dt_t[d] / (1 + dt_t[d] |B_t|^2)
        y_t[d] = sum_n C_t[n] h_t[d, n]          (Mamba's D x_t skip is the mixer's business)

    x [Bt, T, D] bfloat16 or float32 (computed in float32); dt [Bt, T, D] > 0 (Mamba: already
    softplus-ed; Longhorn: its beta = sigmoid(.) in (0, 1)); A [D, N] < 0 for "mamba", None for
    "longhorn" (its decay comes from B); B, C [Bt, T, N], one group shared by all D channels
    (Mamba-1's and Longhorn's layout). segment_ids [Bt, T] int (0 = padding): the state resets to
    zero where a segment starts; padding neither reads nor changes it. initial_state [Bt, D, N] is
    the state before each row's first segment. Any T; chunk_size (the tokens between the states the
    backward keeps) only changes the speed and memory.
    impl: "auto" (the fastest native implementation), "xla", "pallas_gpu" (interpreted off a GPU)
    or "reference" (token by token).
    Returns y [Bt, T, D] in x's dtype, and final_state [Bt, D, N] float32 (the state at the end of
    each row) when output_final_state.
    """
    op = "selective_scan"
    if update not in UPDATES:
        raise ValueError(f"{op}: update must be one of {UPDATES}, got {update!r}")
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [B,T,D], got shape {x.shape}")
    batch, length, channels = x.shape
    checks.shape(op, "dt", dt, x.shape, "[B,T,D] like x")
    if B.ndim != 3 or B.shape[:2] != x.shape[:2]:
        raise ValueError(f"{op}: B must be [B,T,N] with B,T of x {x.shape[:2]}, got {B.shape}")
    checks.shape(op, "C", C, B.shape, "[B,T,N] like B")
    state_dim = B.shape[2]
    if (A is None) != (update == "longhorn"):
        raise ValueError(f"{op}: A [D,N] is required for update='mamba' and must be None for 'longhorn'")
    if A is not None:
        checks.shape(op, "A", A, (channels, state_dim), "[D,N]")
    for name, array in (("x", x), ("dt", dt), ("B", B), ("C", C)):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point, got {array.dtype}")
    if initial_state is not None:
        checks.shape(op, "initial_state", initial_state, (batch, channels, state_dim), "[B,D,N]")
    if segment_ids is not None:
        checks.shape(op, "segment_ids", segment_ids, (batch, length), "[B,T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{op}: segment_ids must be integers, got {segment_ids.dtype}")
    checks.chunk_size(op, chunk_size, 1)
    call = registry.KernelCall(state_dim, channels, chunk_size)
    implementation = registry.choose(IMPLEMENTATIONS, impl, call, op)
    y, final_state = implementation.run(x, dt, A, B, C, update=update, initial_state=initial_state,
                                        segment_ids=segment_ids, chunk_size=chunk_size)
    return (y, final_state) if output_final_state else y

"""The DPLR generalized delta rule as Pallas Mosaic TPU kernels, forward and backward.

The kernels are `sweep_tpu`'s (grid (B, H, N), one chunk of the call's chunk_size per grid step,
the [V, K] state in a VMEM scratch buffer, a reverse sweep carrying dS for the backward) over
`chunk_math`, whose backward differentiates the chunk's forward. The triangular inverse takes
log2(C) levels of [C, C] float32 matmuls on the MXU; per-key decays go by 16-token sub-blocks.
"""

from seqmix.pallas_kernels import sweep_tpu
from seqmix.pallas_kernels.dplr import chunk_math
from seqmix.pallas_kernels.kernel_vjp import kernel_implementation

supports = sweep_tpu.supports
forward, backward = sweep_tpu.builders(chunk_math, "dplr")
dplr_pallas_tpu = kernel_implementation(forward, backward, tile=lambda chunk_size: chunk_size,
                                        per_token=("a", "b", "log_g"))

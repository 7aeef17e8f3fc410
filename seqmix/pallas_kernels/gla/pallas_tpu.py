"""Gated linear attention as Pallas Mosaic TPU kernels, forward and backward.

The kernels are `sweep_tpu`'s (grid (B, H, N), one chunk of the call's chunk_size per grid step,
the state in a VMEM scratch buffer, a reverse sweep for the backward) over `chunk_math`, whose
backward differentiates the chunk's forward math.
"""

from seqmix.pallas_kernels import sweep_tpu
from seqmix.pallas_kernels.gla import chunk_math
from seqmix.pallas_kernels.kernel_vjp import kernel_implementation

supports = sweep_tpu.supports
forward, backward = sweep_tpu.builders(chunk_math, "gla")
gla_pallas_tpu = kernel_implementation(forward, backward, tile=lambda chunk_size: chunk_size,
                                       per_token=("log_gate",))

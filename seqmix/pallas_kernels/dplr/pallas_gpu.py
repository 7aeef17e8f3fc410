"""The DPLR generalized delta rule as Pallas GPU kernels (Triton lowering), forward and backward.

The kernels are `sweep_gpu`'s (grid (B, H, V / Vb), one program per (batch, value head, slice of
value columns) sweeping the chunks with its [Vb, K] slice of the state in registers and storing the
slice entering each chunk, a reverse sweep carrying dS for the backward) over `chunk_math`, whose
backward differentiates the chunk's forward.
The kernels walk 16-token chunks whatever the call's chunk_size, as the delta rule's do: a chunk
of one sub-block needs no slices of its tiles (Triton cannot slice a register tile, which the
per-key decays of a longer chunk's sub-blocks would need), the float32 triangular inverse costs
O(C^2 log C) per token, and 16 is the smallest tensor-core matmul edge.
"""

from seqmix.pallas_kernels import sweep_gpu
from seqmix.pallas_kernels.dplr import chunk_math
from seqmix.pallas_kernels.kernel_vjp import kernel_implementation

CHUNK = 16

supports = sweep_gpu.supports
forward, backward = sweep_gpu.builders(chunk_math, "dplr")
dplr_pallas_gpu = kernel_implementation(forward, backward, tile=lambda chunk_size: CHUNK, per_token=("a", "b", "log_g"))

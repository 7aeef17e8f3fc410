"""Gated linear attention as Pallas GPU kernels (Triton lowering), forward and backward.

The kernels are `sweep_gpu`'s (grid (B, H, V / Vb), one program per (batch, head, slice of value
columns) sweeping the chunks with its slice of the state in registers, a reverse sweep for the
backward) over `chunk_math`, whose backward differentiates the chunk's forward math. A chunk is one
16-token sub-block (`chunk_math.SUB_BLOCK`) whatever the call's chunk_size, because Triton cannot
slice a register tile, which a longer chunk's per-key-gate sub-blocks would need; 16 is also the
smallest tensor-core matmul edge.
"""

from seqmix.pallas_kernels import sweep_gpu
from seqmix.pallas_kernels.gla import chunk_math
from seqmix.pallas_kernels.kernel_vjp import kernel_implementation

supports = sweep_gpu.supports
forward, backward = sweep_gpu.builders(chunk_math, "gla")
gla_pallas_gpu = kernel_implementation(forward, backward, tile=lambda chunk_size: chunk_math.SUB_BLOCK,
                                       per_token=("log_gate",))

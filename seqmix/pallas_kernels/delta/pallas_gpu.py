"""The (gated) delta rule as Pallas GPU kernels (Triton lowering), forward and backward.

The kernels are `sweep_gpu`'s (grid (B, H, V / Vb), one program per (batch, head, slice of value
columns) sweeping the chunks with its [Vb, K] slice of the state in registers and storing the slice
entering each chunk, a reverse sweep carrying dS for the backward) over `chunk_math`, with its
written-out backward.

The kernels walk 16-token chunks whatever the call's chunk_size (which only sets the `xla` and
`pallas_tpu` chunks), for three reasons. The triangular inverse runs as float32 matmuls at full
precision, which Triton does on the CUDA cores, not the tensor cores, and its masked block doubling
costs 4 C^2 log2(C) flops per token: 4k at C = 16, 98k at C = 64, as much as the three [K, V]
state products together at K = V = 128. Every [C, C] float32 tile (the decays, L, its inverse, the
scores) lives in registers beside the [V, K] state: 1 KB each at C = 16, 16 KB at 64 (32 registers
per thread at 4 warps). And 16 is the smallest tensor-core matmul edge. The price is one stored
[V, K] state per 16 tokens for the backward pass (four times the stores of 64-token chunks).
"""

from seqmix.pallas_kernels import sweep_gpu
from seqmix.pallas_kernels.delta import chunk_math
from seqmix.pallas_kernels.kernel_vjp import kernel_implementation

CHUNK = 16

supports = sweep_gpu.supports
forward, backward = sweep_gpu.builders(chunk_math, "delta")
delta_pallas_gpu = kernel_implementation(forward, backward, tile=lambda chunk_size: CHUNK, per_token=("beta", "log_gate"))

"""Delta-rule family: DeltaNet and Gated DeltaNet.

`chunk_delta_rule` is the op (training and prefill); `delta_step` the matching decode step;
`sequence_parallel_delta_rule` splits the op's sequence over a mesh axis (LASP-2).
"""

from seqmix.pallas_kernels.delta.local import IMPLEMENTATIONS
from seqmix.pallas_kernels.delta.op import chunk_delta_rule
from seqmix.pallas_kernels.delta.sequence_parallel import sequence_parallel_delta_rule
from seqmix.pallas_kernels.delta.step import delta_step

__all__ = ["IMPLEMENTATIONS", "chunk_delta_rule", "delta_step", "sequence_parallel_delta_rule"]

"""Delta-rule family: DeltaNet and Gated DeltaNet.

`chunk_delta_rule` is the op (training and prefill); `delta_step` the matching decode step.
"""

from seqmix.pallas_kernels.delta.op import IMPLEMENTATIONS, chunk_delta_rule
from seqmix.pallas_kernels.delta.reference import delta_step

__all__ = ["IMPLEMENTATIONS", "chunk_delta_rule", "delta_step"]

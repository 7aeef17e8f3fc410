"""DPLR family: the diagonal-plus-low-rank generalized delta rule (RWKV-7, Gated DeltaNet-2).

`chunk_dplr` is the op (training and prefill); `dplr_step` the matching decode step;
`sequence_parallel_dplr` splits the op's sequence over a mesh axis (LASP-2).
"""

from seqmix.pallas_kernels.dplr.local import IMPLEMENTATIONS
from seqmix.pallas_kernels.dplr.op import chunk_dplr
from seqmix.pallas_kernels.dplr.sequence_parallel import sequence_parallel_dplr
from seqmix.pallas_kernels.dplr.step import dplr_step

__all__ = ["IMPLEMENTATIONS", "chunk_dplr", "dplr_step", "sequence_parallel_dplr"]

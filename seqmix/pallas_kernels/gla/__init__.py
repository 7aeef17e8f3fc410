"""Gated linear attention family: linear attention, RetNet, Lightning, GLA, HGRN2, Mamba2/SSD.

`chunk_gla` is the op (training and prefill); `gla_step` the matching decode step;
`sequence_parallel_gla` splits the op's sequence over a mesh axis (LASP-2).
"""

from seqmix.pallas_kernels.gla.local import IMPLEMENTATIONS
from seqmix.pallas_kernels.gla.op import chunk_gla
from seqmix.pallas_kernels.gla.sequence_parallel import sequence_parallel_gla
from seqmix.pallas_kernels.gla.step import gla_step

__all__ = ["IMPLEMENTATIONS", "chunk_gla", "gla_step", "sequence_parallel_gla"]

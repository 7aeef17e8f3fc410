"""Gated linear attention family: linear attention, RetNet, Lightning, GLA, HGRN2, Mamba2/SSD.

`chunk_gla` is the op (training and prefill); `gla_step` the matching decode step.
"""

from seqmix.pallas_kernels.gla.op import IMPLEMENTATIONS, chunk_gla
from seqmix.pallas_kernels.gla.reference import gla_step

__all__ = ["IMPLEMENTATIONS", "chunk_gla", "gla_step"]

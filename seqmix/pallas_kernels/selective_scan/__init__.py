"""Selective scan family: a state decay per (channel, state element), which GLA's per-key decay
cannot express: Mamba-1 (S6) and Longhorn.

`selective_scan` is the op (training and prefill; implementations "xla", "pallas_gpu" (a forward
kernel with the xla backward) and "reference"); `selective_scan_step` the matching decode step.
"""

from seqmix.pallas_kernels.selective_scan.op import IMPLEMENTATIONS, selective_scan
from seqmix.pallas_kernels.selective_scan.step import selective_scan_step

__all__ = ["IMPLEMENTATIONS", "selective_scan", "selective_scan_step"]

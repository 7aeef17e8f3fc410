"""Local linear attention: each query's local linear regression of values on keys, answered by its
intercept (the `local_linear_attention` mixer's op).

`local_linear_attention` is the op. Decoding keeps every key and value (the weights depend on the
query), so the mixer decodes through attention's KV cache and this op's mask, not a state step.
"""

from seqmix.pallas_kernels.local_linear_attention.op import IMPLEMENTATIONS, local_linear_attention

__all__ = ["IMPLEMENTATIONS", "local_linear_attention"]

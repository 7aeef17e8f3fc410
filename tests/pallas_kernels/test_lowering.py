"""The Pallas kernels lower for their devices, forward and backward, checked on CPU: lowering only
(no compile, no device), a few seconds.

The other tests run the kernels in interpreters, which accept what the device lowerings reject: a
matmul of a float32 by a bfloat16 operand, say, which jax's own transpose of a bfloat16 matmul with
float32 accumulation gives and the Triton lowering refuses ("a and b must have the same element
type"). The GPU kernels lower to Triton for an abstract H100, the TPU kernels to Mosaic (which does
not reject mixed dtypes itself; its lowering is checked all the same).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.pallas_kernels import registry
from seqmix.pallas_kernels.delta import chunk_delta_rule
from seqmix.pallas_kernels.dplr import chunk_dplr
from seqmix.pallas_kernels.gla import chunk_gla

from kernel_checks import packed_segments

PLATFORMS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
OPS = {
    "gla_key_gates": lambda q, k, v, gate, **kw: chunk_gla(q, k, v, log_g=gate, **kw),
    "gla_head_gates": lambda q, k, v, gate, **kw: chunk_gla(q, k, v, log_a=gate[..., 0], **kw),
    "delta": lambda q, k, v, gate, **kw: chunk_delta_rule(q, k, v, jnp.exp(gate[..., 0]), log_a=gate[..., 0], **kw),
    "kda": lambda q, k, v, gate, **kw: chunk_delta_rule(q, k, v, jnp.exp(gate[..., 0]), log_g=gate, **kw),
    "dplr": lambda q, k, v, gate, **kw: chunk_dplr(q, k, v, -0.1 * jnp.exp(gate), 0.1 * jnp.exp(gate), log_g=gate,
                                                   **kw),
}


# (op, G): G value heads read one q/k head (grouped value heads: the kernels' index maps share it).
CASES = [(op, 1) for op in OPS] + [("gla_key_gates", 2), ("kda", 2), ("dplr", 2)]


def kernel_count(op, groups, impl, dtype, value_dim=32):
    """How many kernels of the device's kind value_and_grad of the op lowers to (for an H100 or a TPU)."""
    rng = np.random.default_rng(0)
    batch, length, heads, key_dim = 1, 64, groups, 16
    q, k = (jnp.asarray(rng.normal(size=(batch, length, 1, key_dim)), dtype) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(batch, length, heads, value_dim)), dtype)
    gate = jnp.asarray(-rng.uniform(size=(batch, length, heads, key_dim)), jnp.float32)
    state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    segments = packed_segments(rng, batch, length)

    def loss(q, k, v, gate, state):
        out, final_state = OPS[op](q, k, v, gate, initial_state=state, segment_ids=segments,
                                   output_final_state=True, chunk_size=32, impl=impl)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final_state)

    lowered = registry.lower_for_device(jax.value_and_grad(loss, argnums=range(5)), (q, k, v, gate, state),
                                        PLATFORMS[impl])
    return lowered.as_text().count({"pallas_gpu": "__gpu$xla.gpu.triton", "pallas_tpu": "tpu_custom_call"}[impl])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("impl", list(PLATFORMS))
@pytest.mark.parametrize("op, groups", CASES, ids=[f"{op}-G{groups}" for op, groups in CASES])
def test_forward_and_backward_lower(op, groups, impl, dtype):
    assert kernel_count(op, groups, impl, dtype) == 2  # the forward kernel and the backward kernel


@pytest.mark.parametrize("op", ["gla_key_gates", "kda", "dplr"])
def test_pallas_gpu_kernels_over_slices_of_wide_value_heads_lower(op):
    """V = 128: each GPU kernel's programs take 64 value columns (`sweep_gpu.VALUE_BLOCK`)."""
    assert kernel_count(op, 2, "pallas_gpu", jnp.bfloat16, value_dim=128) == 2

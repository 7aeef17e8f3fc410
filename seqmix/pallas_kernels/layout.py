"""Inputs of the chunked paths, laid out once: masked, scaled, padded to whole chunks.

Shared by the kernel families: besides q, k, v, a family has float32 per-token inputs (`per_token`:
GLA's log gate; the delta rule's beta and log decay), laid out alike.
"""

import dataclasses

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels.segments import initial_state_or_zeros, padded_groups, reset_groups, zero_padded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkedInputs:
    """q, k [B,Tp,H,K] (q scaled); v [B,Tp,H,V]; per_token: the family's per-token inputs, a tuple
    of float32 [B,Tp,H,W] (W = 1 for one value per head and token); groups [B,Tp,1] int32 relative
    to each chunk's incoming state (see `segments`). Tp: T padded to whole chunks. Padding tokens
    have zero q, k, v and per-token inputs, so they neither read nor change the state.
    Time-major as given; `head_major` makes the kernels' [B,H,Tp,D] of it."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    per_token: tuple[jax.Array, ...]
    groups: jax.Array


def matmul_dtype(dtype) -> jnp.dtype:
    """bfloat16 inputs feed bfloat16 matmuls (float32 accumulation); anything else runs in float32."""
    return jnp.dtype(jnp.bfloat16) if dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)


def to_chunks(q, k, v, per_token, scale, segment_ids, chunk: int, padded_length: int | None = None) -> ChunkedInputs:
    """per_token: a tuple of [B,T,H,W] or [B,T,H] arrays (the latter get W = 1).
    padded_length: a multiple of `chunk`, at least T (default: T rounded up to the chunk)."""
    batch, length = q.shape[:2]
    padded_length = length + (-length % chunk) if padded_length is None else padded_length
    valid, groups = reset_groups(segment_ids, batch, length)
    as_columns = lambda x: x if x.ndim == 4 else x[..., None]
    return ChunkedInputs(
        q=zero_padded(q.astype(jnp.float32) * scale, valid, padded_length, q.dtype),
        k=zero_padded(k, valid, padded_length),
        v=zero_padded(v, valid, padded_length),
        per_token=tuple(zero_padded(as_columns(x), valid, padded_length, jnp.float32) for x in per_token),
        groups=padded_groups(groups, padded_length, chunk),
    )


def head_major(x: ChunkedInputs) -> ChunkedInputs:
    """[B,Tp,H,D] -> [B,H,Tp,D]: a (batch, head) pair's chunk becomes a contiguous [C, D] tile, the
    block a Pallas kernel walks; on TPU it also puts (time, feature) in the two tiled dimensions."""
    swap = lambda a: jnp.swapaxes(a, 1, 2)
    return ChunkedInputs(q=swap(x.q), k=swap(x.k), v=swap(x.v), per_token=tuple(map(swap, x.per_token)),
                         groups=x.groups)


def from_chunks(out, length: int, dtype):
    """[B,Tp,H,V] float32 -> [B,T,H,V] in the inputs' dtype."""
    return out[:, :length].astype(dtype)


def state_in(initial_state, batch: int, heads: int, key_dim: int, value_dim: int):
    """Public [B,H,K,V] (or None) -> the kernels' value-major float32 [B,H,V,K]."""
    return jnp.swapaxes(initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim), 2, 3)


def state_out(state):
    """Value-major [B,H,V,K] -> public [B,H,K,V]."""
    return jnp.swapaxes(state, 2, 3)

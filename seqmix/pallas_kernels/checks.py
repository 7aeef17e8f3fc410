"""Argument checks shared by the kernel families' ops: each raises a ValueError naming the op and
the tensor, before anything is traced or compiled."""

import jax.numpy as jnp


def shape(op: str, name: str, array, expected, what: str) -> None:
    if array.shape != tuple(expected):
        raise ValueError(f"{op}: {name} must be {what} {tuple(expected)}, got {array.shape}")


def queries_keys_values(op: str, q, k, v) -> None:
    """q, k [B,T,Hk,K] and v [B,T,Hv,V], floating point, Hv a multiple of Hk (`grouped_heads`)."""
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [B,T,H,K], got shape {q.shape}")
    shape(op, "k", k, q.shape, "[B,T,H,K] like q")
    if v.ndim != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % q.shape[2]:
        raise ValueError(f"{op}: v must be [B,T,Hv,V] with B,T of q {q.shape[:2]} and Hv a multiple of q's "
                         f"{q.shape[2]} heads, got {v.shape}")
    for name, array in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point, got {array.dtype}")


def decays(op: str, log_g, log_a, batch, length, heads, key_dim) -> None:
    """At most one of log_g [B,T,H,K] (per key) and log_a [B,T,H] (per head), on v's heads."""
    if log_g is not None and log_a is not None:
        raise ValueError(f"{op}: pass log_g (per-key decay) or log_a (per-head decay), not both")
    if log_g is not None:
        shape(op, "log_g", log_g, (batch, length, heads, key_dim), "[B,T,H,K] (v's heads, q's K)")
    if log_a is not None:
        shape(op, "log_a", log_a, (batch, length, heads), "[B,T,H] (v's heads)")


def state_and_segments(op: str, initial_state, segment_ids, batch, length, heads, key_dim, value_dim) -> None:
    if initial_state is not None:
        shape(op, "initial_state", initial_state, (batch, heads, key_dim, value_dim), "[B,H,K,V]")
    if segment_ids is not None:
        shape(op, "segment_ids", segment_ids, (batch, length), "[B,T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{op}: segment_ids must be integers, got {segment_ids.dtype}")


def chunk_size(op: str, size: int, multiple: int) -> None:
    if size <= 0 or size % multiple:
        raise ValueError(f"{op}: chunk_size must be a positive multiple of {multiple}, got {size}")

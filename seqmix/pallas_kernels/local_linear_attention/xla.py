"""The blockwise local linear estimate (after the paper's FlashLLA), in XLA.

A query needs the moments sum_j p_j [1, k_j, k_j k_j^T] (O(D^2) numbers). A first pass visits the keys in blocks with
flash attention's running max: each block adds exp(logits - max) @ [1, k, k k^T] (one matmul,
k k^T's upper triangle only) and rescales what was summed before. Each query then solves its
[D, D] system for x = (Cov(k, k) + ridge I)^-1 (q_i - k_bar), and a second pass over the key
blocks sums p_j (1 + (k_j - k_bar) . x) v_j, which is o_i (Cov(v, k) x = sum_j p_j v_j (k_j - k_bar) . x),
so no [D, Dv] moment is ever formed. Key blocks that no query of a query block sees (the causal
upper triangle) are skipped at run time. Query blocks are rematerialised in the backward pass,
so memory is O(T D^2) per head (the moments of a block of keys, the sums of a block of
queries), never O(T^2 D^2); time is O(T^2 D^2), the method's own cost.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _key_moments(k):
    """[1, k, the upper triangle of k k^T] [B, T, H, 1 + D + D (D + 1) / 2] float32 of k [B, T, H, D]:
    what a query's weighted sums need of each key (k k^T is symmetric: half of it is stored)."""
    rows, cols = np.triu_indices(k.shape[-1])
    return jnp.concatenate([jnp.ones(k.shape[:-1] + (1,), jnp.float32), k, k[..., rows] * k[..., cols]], axis=-1)


def _slope_at_query(sums, q, ridge: float):
    """(k_bar [B, H, Cq, D], x = (Cov(k, k) + ridge I)^-1 (q - k_bar) [B, H, Cq, D]) from the
    weighted sums [B, H, Cq, F] of `_key_moments` (with total weight sums[..., 0] > 0, else any
    finite value) and q [B, Cq, H, D]."""
    dim = q.shape[-1]
    moments = sums[..., 1:] / jnp.where(sums[..., :1] > 0, sums[..., :1], 1.0)  # p-weighted means
    mean_k, upper = moments[..., :dim], moments[..., dim:]
    rows, cols = np.triu_indices(dim)
    second = jnp.zeros(upper.shape[:-1] + (dim, dim), jnp.float32).at[..., rows, cols].set(upper)
    second = second + jnp.swapaxes(second, -1, -2) * (1.0 - jnp.eye(dim, dtype=jnp.float32))
    cov = second - mean_k[..., :, None] * mean_k[..., None, :] + ridge * jnp.eye(dim, dtype=jnp.float32)
    offset = q.transpose(0, 2, 1, 3) - mean_k  # q - k_bar
    return mean_k, jnp.linalg.solve(cov, offset[..., None])[..., 0]


def local_linear_attention_xla(q, k, v, mask, *, scale: float, ridge: float, block_size: int):
    """As `local_linear_attention`, blockwise (module docstring). Returns o [B,Tq,H,Dv] float32."""
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    q_block, k_block = min(block_size, q_len), min(block_size, k_len)
    q_pad, k_pad = -q_len % q_block, -k_len % k_block
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q.astype(jnp.float32), q_pad), pad(k.astype(jnp.float32), k_pad), pad(v.astype(jnp.float32), k_pad)
    mask = jnp.pad(mask, [(0, 0), (0, q_pad), (0, k_pad)])
    blocks = lambda x, size: jnp.moveaxis(x.reshape(batch, -1, size, *x.shape[2:]), 1, 0)
    key_blocks, value_blocks, moment_blocks = blocks(k, k_block), blocks(v, k_block), blocks(_key_moments(k), k_block)

    def skipping_unseen(step):
        """A scan step over key blocks that leaves its carry alone, at run time, for a block that
        no query of the query block sees (the causal upper triangle: half of the work)."""
        return lambda carry, block: (jax.lax.cond(jnp.any(block[-1]), step, lambda carry, _: carry, carry, block), None)

    @jax.checkpoint  # the backward pass recomputes a query block's sums instead of storing them per key block
    def query_block(args):
        queries, seen = args  # [B, Cq, H, D], [B, Cq, Tk]
        visible = jnp.moveaxis(seen.reshape(*seen.shape[:2], -1, k_block), 2, 0)  # [Tk / Ck, B, Cq, Ck]

        def logits_of(keys, visible):
            logits = jnp.einsum("bqhd,bkhd->bhqk", queries, keys) * scale
            return jnp.where(visible[:, None], logits, -jnp.inf)

        def moment_step(carry, block):  # flash attention's running max over the key moments
            top, sums = carry  # [B, H, Cq], [B, H, Cq, F]
            keys, moments, visible = block
            logits = logits_of(keys, visible)
            new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(logits, axis=-1)))
            shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # nothing seen yet: weights stay 0
            weights = jnp.exp(logits - shift[..., None])
            sums = sums * jnp.exp(top - shift)[..., None] + jnp.einsum("bhqk,bkhf->bhqf", weights, moments)
            return new_top, sums

        init = (jnp.full((batch, heads, queries.shape[1]), -jnp.inf, jnp.float32),
                jnp.zeros((batch, heads, queries.shape[1], moment_blocks.shape[-1]), jnp.float32))
        (top, sums), _ = jax.lax.scan(skipping_unseen(moment_step), init, (key_blocks, moment_blocks, visible))
        shift, total = jnp.where(jnp.isfinite(top), top, 0.0), sums[..., 0]
        mean_k, x = _slope_at_query(sums, queries, ridge)
        intercept = 1.0 - jnp.sum(mean_k * x, axis=-1)  # p_j (1 + (k_j - k_bar).x) = p_j (intercept + k_j.x)

        def value_step(out, block):  # the second pass: sum_j p_j (1 + (k_j - k_bar).x) v_j
            keys, values, visible = block
            weights = jnp.exp(logits_of(keys, visible) - shift[..., None])
            weights = weights * (intercept[..., None] + jnp.einsum("bhqd,bkhd->bhqk", x, keys))
            return out + jnp.einsum("bhqk,bkhe->bhqe", weights, values)

        zeros = jnp.zeros((batch, heads, queries.shape[1], v.shape[-1]), jnp.float32)
        out, _ = jax.lax.scan(skipping_unseen(value_step), zeros, (key_blocks, value_blocks, visible))
        out = jnp.where((total > 0)[..., None], out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
        return out.transpose(0, 2, 1, 3)

    out = jax.lax.map(query_block, (blocks(q, q_block), blocks(mask, q_block)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, q_len + q_pad, heads, -1)[:, :q_len]

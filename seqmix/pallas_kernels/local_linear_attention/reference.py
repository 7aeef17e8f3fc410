"""The oracle: the local linear estimate with every weight p [B,H,Tq,Tk] and every query's
covariance [B,H,Tq,D,D] materialised, then one solve per query (float32)."""

import jax
import jax.numpy as jnp


def local_linear_attention_reference(q, k, v, mask, *, scale: float, ridge: float, block_size: int):
    """As `local_linear_attention` (block_size unused). Returns o [B,Tq,H,Dv] float32."""
    del block_size
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
    seen = jnp.any(mask, axis=-1)[:, None, :, None]  # [B, 1, Tq, 1]
    p = jnp.where(seen, jax.nn.softmax(jnp.where(seen, logits, 0.0), axis=-1), 0.0)
    mean_k, mean_v = jnp.einsum("bhqk,bkhd->bhqd", p, k), jnp.einsum("bhqk,bkhe->bhqe", p, v)
    cov_kk = jnp.einsum("bhqk,bkhd,bkhe->bhqde", p, k, k) - mean_k[..., :, None] * mean_k[..., None, :]
    cov_vk = jnp.einsum("bhqk,bkhe,bkhd->bhqed", p, v, k) - mean_v[..., :, None] * mean_k[..., None, :]
    system = cov_kk + ridge * jnp.eye(q.shape[-1], dtype=jnp.float32)
    slope_at_q = jnp.linalg.solve(system, (q.transpose(0, 2, 1, 3) - mean_k)[..., None])
    out = mean_v + (cov_vk @ slope_at_q)[..., 0]
    return jnp.where(seen, out, 0.0).transpose(0, 2, 1, 3)

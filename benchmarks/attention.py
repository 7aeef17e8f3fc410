"""Softmax attention of a whole training sequence: `blockwise_attention` (queries in blocks, an
online softmax over the key blocks each can see) against `softmax_attention` (the dense [T, T]
logits) under the same mask, forward + backward of sum(out * w) for a fixed random w. One packed
row per batch entry (8 documents), grouped heads (H = 4 query heads over 2 kv heads), float32,
jitted; the two take turns (`kernels.measure`). Temporary bytes are XLA's own count for the
compiled fwd+bwd program.

    python benchmarks/attention.py [--lengths 1024 4096] [--windows 0 64 512] [--batch 2]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from kernels import measure

from seqmix.mixers.attention import ATTENTION_BLOCK, attention_mask, blockwise_attention, softmax_attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32


def dense(q, k, v, segment_ids, scale, *, window):
    batch, length = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids, window=window)
    return softmax_attention(q, k, v, mask, scale)


def fwd_bwd(attend, segment_ids, window, weights):
    """jit(grad) of sum(attend(q, k, v) * weights) with respect to q, k and v."""
    scale = HEAD_DIM ** -0.5
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, segment_ids, scale, window=window) * weights)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 64, 512], help="0: global attention")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"causal attention fwd+bwd, B = {args.batch}, H = {HEADS} over {KV_HEADS} kv heads, D = {HEAD_DIM}, "
          f"8 documents per row, blocks of {ATTENTION_BLOCK}, float32, best of 3 rounds of 5-call medians, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print("| T | window | dense ms | blocks ms | blocks / dense | dense temp MiB | blocks temp MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for length in args.lengths:
        keys = jax.random.split(jax.random.key(length), 4)
        q = jax.random.normal(keys[0], (args.batch, length, HEADS, HEAD_DIM))
        k, v = (jax.random.normal(key, (args.batch, length, KV_HEADS, HEAD_DIM)) for key in keys[1:3])
        weights = jax.random.normal(keys[3], q.shape)
        starts = np.sort(rng.choice(np.arange(1, length), size=(args.batch, 7), replace=False), axis=1)
        segment_ids = jnp.asarray([np.searchsorted(row, np.arange(length), side="right") + 1 for row in starts],
                                  jnp.int32)
        for window in args.windows:
            window = window or None
            programs = {name: fwd_bwd(attend, segment_ids, window, weights)
                        for name, attend in (("dense", dense), ("blocks", blockwise_attention))}
            temp = {name: fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
                    for name, fn in programs.items()}
            seconds = measure(programs, (q, k, v), rounds=3, repeats=5)
            print(f"| {length} | {window or 'none'} | {1e3 * seconds['dense']:.1f} | {1e3 * seconds['blocks']:.1f} | "
                  f"{seconds['blocks'] / seconds['dense']:.2f} | {temp['dense']:.1f} | {temp['blocks']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""The RG-LRU's linear recurrence h_t = a_t h_{t-1} + u_t on this machine: its two scans, parallel
(`jax.lax.associative_scan`, what `seqmix.mixers.rg_lru.linear_scan` runs on accelerators) and
sequential (`jax.lax.scan`, what it runs on CPU), forward + backward, side by side in one run.

    python benchmarks/linear_scan.py
"""

import jax
import jax.numpy as jnp
from kernels import median_seconds

from seqmix.mixers.rg_lru import _parallel_scan, _sequential_scan

SHAPES = [(4, 2048, 256), (2, 8192, 512), (1, 65536, 256)]  # B, T, C


def main() -> None:
    print(f"backend: {jax.default_backend()}; float32, forward + backward of sum(h^2), median of 7 after a warm-up")
    print("| B x T x C | parallel (associative_scan) | sequential (scan) | parallel / sequential |")
    print("|---|---:|---:|---:|")
    for batch, length, channels in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        args = (jax.random.uniform(keys[0], (batch, length, channels)),
                jax.random.normal(keys[1], (batch, length, channels)), jax.random.normal(keys[2], (batch, channels)))
        timed = {}
        for name, scan in (("parallel", _parallel_scan), ("sequential", _sequential_scan)):
            grad = jax.jit(jax.value_and_grad(lambda a, u, h0, scan=scan: jnp.sum(scan(a, u, h0) ** 2), argnums=(0, 1, 2)))
            jax.block_until_ready(grad(*args))  # compile
            timed[name] = 1e3 * median_seconds(grad, *args, repeats=7, budget=30.0)
        print(f"| {batch} x {length} x {channels} | {timed['parallel']:.1f} ms | {timed['sequential']:.1f} ms | "
              f"{timed['parallel'] / timed['sequential']:.2f}x |")


if __name__ == "__main__":
    main()

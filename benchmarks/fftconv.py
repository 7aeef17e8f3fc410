"""`causal_conv` (the long convolution of S4D and the spectral SSM): the FFT path (`xla`) against
the direct product (`reference`), forward and forward + backward, one row of T tokens (B = 1,
D = 64 channels, a filter as long as T), without and with packed segments (about 8 per row). The
last columns divide the FFT path's time by T log2 T: flat when it grows as O(T log T) (packed
rows, O(T log^2 T), grow by one more log).

    python benchmarks/fftconv.py [--lengths 1024 4096 ...] [--reference-up-to 4096]
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from kernels import measure

from seqmix.pallas_kernels.fftconv import causal_conv

CHANNELS = 64


def timed(impl: str, x, filters, segment_ids) -> tuple[float, float]:
    """(forward, forward + backward) seconds of `impl`, jitted: `kernels.measure`'s best of 3
    rounds of medians, the two taking turns."""
    forward = jax.jit(lambda x, f: causal_conv(x, f, segment_ids=segment_ids, impl=impl))
    both = jax.jit(jax.grad(lambda x, f: jnp.sum(causal_conv(x, f, segment_ids=segment_ids, impl=impl) ** 2),
                            argnums=(0, 1)))
    seconds = measure({"forward": forward, "both": both}, (x, filters), rounds=3, repeats=5)
    return seconds["forward"], seconds["both"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**k for k in range(10, 17)])
    parser.add_argument("--reference-up-to", type=int, default=4096)  # 8192: ~20 CPU minutes more
    args = parser.parse_args()
    print(f"causal_conv, B = 1, D = {CHANNELS}, L = T, float32, jitted, best of 3 rounds of 5-call medians, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print("| T | segments | xla fwd | xla fwd+bwd | reference fwd | reference fwd+bwd | "
          "xla fwd / T log2 T (ns) | xla fwd+bwd / T log2 T (ns) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        x = jax.random.normal(jax.random.key(0), (1, length, CHANNELS))
        filters = jax.random.normal(jax.random.key(1), (CHANNELS, length)) / length
        rng = np.random.default_rng(0)
        starts = np.sort(rng.choice(np.arange(1, length), size=7, replace=False))
        packed = jnp.asarray(np.searchsorted(starts, np.arange(length), side="right")[None] + 1, jnp.int32)
        for name, segment_ids in (("none", None), ("8 per row", packed)):
            fwd, both = timed("xla", x, filters, segment_ids)
            ref = timed("reference", x, filters, segment_ids) if length <= args.reference_up_to else None
            ref_cells = " | ".join(f"{1e3 * s:.2f} ms" for s in ref) if ref else "- | -"
            per = length * math.log2(length)
            print(f"| {length} | {name} | {1e3 * fwd:.2f} ms | {1e3 * both:.2f} ms | {ref_cells} | "
                  f"{1e9 * fwd / per:.2f} | {1e9 * both / per:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""How the fwd+bwd speed-up of a chunked implementation over the reference spreads over time.

    python benchmarks/ratio_spread.py --family delta --gate none --length 4096 --seconds 120
    taskset -c 0 python benchmarks/ratio_spread.py --family delta --gate none   # on one core

`kernels.py` gives one figure per row, the best of a few rounds taken within seconds of each
other. On a VM whose speed changes in spells of several seconds, such a figure depends on the
moment it was taken. This script samples the ratio for `--seconds`: each sample times the
implementation (median of 5 consecutive fwd+bwd calls) and then the reference (median of 3), and
the table gives the distribution of the samples and how many fall below `--target`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import FAMILIES, GATES, chosen_gate, forward_of, median_seconds, random_inputs, timed_pair


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="delta", choices=list(FAMILIES))
    parser.add_argument("--gate", default=None, choices=GATES, help="as in kernels.py")
    parser.add_argument("--impl", default="xla")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--target", type=float, default=10.0, help="the speed-up counted against")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    gate = chosen_gate(parser, args.family, args.gate)

    inputs = random_inputs(np.random.default_rng(0), family, gate, (1, args.length, args.heads, args.dim),
                           args.heads, jnp.float32)
    _, chunked = timed_pair(forward_of(family, args.impl, args.chunk_size))
    _, reference = timed_pair(forward_of(family, "reference", args.chunk_size))
    for fn in (chunked, reference):
        jax.block_until_ready(fn(*inputs))  # compile
    samples = []  # (chunked seconds, reference seconds)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        samples.append((median_seconds(chunked, *inputs, repeats=5, budget=10.0),
                        median_seconds(reference, *inputs, repeats=3, budget=10.0)))
    chunked_ms, reference_ms = (np.array(times) * 1e3 for times in zip(*samples))
    ratios = reference_ms / chunked_ms
    quantiles = np.percentile(ratios, [0, 10, 50, 90, 100])
    print(f"# {family.op_name}, gate={gate}, B=1 H={args.heads} K=V={args.dim} float32, chunk={args.chunk_size}, "
          f"T={args.length}: {args.impl} fwd+bwd vs reference fwd+bwd over {args.seconds:.0f} s")
    print(f"| samples | {args.impl} ms (median) | reference ms (median) | ratio min | p10 | median | p90 | max "
          f"| samples < {args.target:g}x |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(ratios)} | {np.median(chunked_ms):.1f} | {np.median(reference_ms):.1f} | "
          + " | ".join(f"{x:.1f}x" for x in quantiles) + f" | {int(np.sum(ratios < args.target))} |")


if __name__ == "__main__":
    main()

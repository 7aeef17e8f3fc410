"""Compile time of the chunked scans' `xla` fwd+bwd programs and of small models' train steps, and
how many kernels XLA compiles for each.

    python benchmarks/compile_time.py                              # T = 4096 and the default configs
    python benchmarks/compile_time.py --length 1024 --configs kda_small gla_small

XLA:CPU compiles every fusion of a program as an MLIR module of its own (5-15 ms each, however small),
so a program's compile time follows its number of kernels (the fusions of its optimised HLO, loop
bodies and both branches of each conditional included) more than its size. Each program is lowered,
then compiled once; the CPU seconds are those of the whole process while it compiles (XLA compiles
kernels on several threads), the wall seconds those of the call. Kernels: B=1, H=4, K=V=64, the
gates of `kernels.py`, chunk 64 (at most the family's longest). Train steps: the trainer's own step
(`throughput.lowered_step`) on one batch of `--batch` rows of `--seq-len` tokens of the config's model.
Run it in two checkouts side by side to compare them: the counts are exact, the seconds drift with
the machine's load.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from throughput import lowered_step

PROGRAMS = [("gla", "key"), ("gla", "head"), ("delta", "head"), ("kda", "key"), ("dplr", "key")]
TRAINED = ["gla_small", "gated_deltanet_small", "kda_small", "rwkv7_small", "mamba2_small"]


def compiled(lowered):
    """(kernels, CPU seconds, wall seconds) of compiling `lowered`."""
    cpu, wall = time.process_time(), time.perf_counter()
    executable = lowered.compile()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return executable.as_text().count(" fusion("), cpu, wall


def kernel_program(family_name: str, gate: str, length: int):
    family = kernels.FAMILIES[family_name]
    inputs = kernels.random_inputs(np.random.default_rng(0), family, gate, (1, length, 4, 64), 4, jnp.float32)
    _, forward_and_backward = kernels.timed_pair(kernels.forward_of(family, "xla", 64))
    return forward_and_backward.lower(*inputs)


def train_step_program(name: str, batch: int, seq_len: int):
    lowered, *_ = lowered_step(name, seq_len, batch * seq_len)
    return lowered


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="T of the kernels' programs")
    parser.add_argument("--configs", nargs="*", default=TRAINED, help="configs/models/<name>.yaml to train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    print(f"# XLA:{jax.default_backend()} on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| program | kernels | compile CPU s | compile wall s |")
    print("|---|---:|---:|---:|")
    for family_name, gate in PROGRAMS:
        count, cpu, wall = compiled(kernel_program(family_name, gate, args.length))
        print(f"| {family_name} ({gate} gate) xla fwd+bwd, T = {args.length} | {count} | {cpu:.2f} | {wall:.2f} |",
              flush=True)
    for name in args.configs:
        count, cpu, wall = compiled(train_step_program(name, args.batch, args.seq_len))
        print(f"| {name} train step, {args.batch} x {args.seq_len} tokens | {count} | {cpu:.2f} | {wall:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()

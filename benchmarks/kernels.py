"""Speed of the chunked-scan implementations against the reference and softmax attention.

    python benchmarks/kernels.py                 # chunk_gla, B=1, H=4, K=V=64, float32, T = 1k..16k
    python benchmarks/kernels.py --gate head --lengths 1024 4096
    python benchmarks/kernels.py --family delta  # chunk_delta_rule (--gate head: gated, none: plain)

Prints one markdown table: per implementation and T, the forward and forward+backward times (the
best of 3 rounds, each the median of 5 consecutive calls, the implementations taking turns), and
each as a ratio to `reference` and to `jax.nn.dot_product_attention` (causal) on the same shape,
all measured in the same run. Pallas kernels are timed only on their own device (here
they would run in an interpreter, which says nothing about their speed).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.pallas_kernels import delta, gla


def median_seconds(fn, *args, repeats: int, budget: float) -> float:
    """Median of up to `repeats` consecutive calls (fewer once they have taken `budget` seconds)."""
    times = []
    while len(times) < repeats and sum(times) < budget:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(functions, inputs, rounds: int, repeats: int, budget: float = 20.0):
    """{name: seconds} for jitted `functions`: the best of `rounds` round medians, the functions
    taking turns round by round. This VM's speed drifts by 20-40% over tens of seconds; taking
    turns measures every row in the same spells. Each turn is a run of consecutive calls, the
    steady state of a training loop: calls interleaved one by one would make each pay the page
    faults of re-mapping the buffers the previous one freed."""
    for fn in functions.values():
        jax.block_until_ready(fn(*inputs))  # compile and warm up
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            best[name] = min(best[name], median_seconds(fn, *inputs, repeats=repeats, budget=budget / rounds))
    return best


def gla_fn(impl: str, gate: str, chunk_size: int):
    def forward(q, k, v, log_g, beta):
        del beta
        gates = {"key": dict(log_g=log_g), "head": dict(log_a=log_g[..., 0]), "none": {}}[gate]
        return gla.chunk_gla(q, k, v, **gates, impl=impl, chunk_size=chunk_size)
    return forward


def delta_fn(impl: str, gate: str, chunk_size: int):
    def forward(q, k, v, log_g, beta):
        gates = {"head": dict(log_a=log_g[..., 0]), "none": {}}[gate]
        k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(k.dtype)
        return delta.chunk_delta_rule(q, k, v, beta, **gates, impl=impl, chunk_size=chunk_size)
    return forward


FAMILIES = {"gla": (gla_fn, gla.IMPLEMENTATIONS, "chunk_gla"),
            "delta": (delta_fn, delta.IMPLEMENTATIONS, "chunk_delta_rule")}
GATES = ["key", "head", "none"]


def chosen_gate(parser: argparse.ArgumentParser, family: str, gate: str | None) -> str:
    """The gate to time: `gate`, or the family's default (per-key for GLA, per-head for the delta
    rule); a parser error for a gate the family does not have."""
    if family == "delta" and gate == "key":
        parser.error("the delta rule has per-head gates only: --gate head or none")
    return gate or {"gla": "key", "delta": "head"}[family]


def softmax_fn(q, k, v, log_g, beta):
    del log_g, beta
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def random_inputs(rng, shape, dtype):
    """(q, k, v [B,T,H,D] in dtype, log_g [B,T,H,D] float32 in log(0.9..1), beta [B,T,H] float32 in
    (0, 1)), the arguments of every benchmarked forward."""
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    log_g = jnp.asarray(np.log(rng.uniform(0.9, 1.0, size=shape)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, size=shape[:3]), jnp.float32)
    return q, k, v, log_g, beta


def timed_pair(forward):
    """The jitted forward and forward+backward (gradients of every input) of `forward`."""
    loss = lambda *args: jnp.sum(forward(*args).astype(jnp.float32))
    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--family", default="gla", choices=list(FAMILIES))
    parser.add_argument("--gate", default=None, choices=GATES,
                        help="per-key log_g (GLA; the gla default), per-head log_a (RetNet/SSD, Gated "
                             "DeltaNet; the delta default) or no decay (linear attention, DeltaNet)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="consecutive calls per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes")
    args = parser.parse_args()
    make_fn, implementations, op_name = FAMILIES[args.family]
    gate = chosen_gate(parser, args.family, args.gate)

    backend = jax.default_backend()
    impls = ["reference"] + [i.name for i in implementations if backend in i.native_backends]
    print(f"# {op_name} on {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}: "
          f"B={args.batch} H={args.heads} K=V={args.dim} {args.dtype}, gate={gate}, chunk={args.chunk_size}")
    print("| impl | T | fwd ms | fwd+bwd ms | fwd vs reference | fwd+bwd vs reference | fwd vs softmax | fwd+bwd vs softmax |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    previous = {}
    for length in args.lengths:
        inputs = random_inputs(rng, (args.batch, length, args.heads, args.dim), jnp.dtype(args.dtype))
        pairs = {"softmax": timed_pair(softmax_fn)}
        pairs.update((impl, timed_pair(make_fn(impl, gate, args.chunk_size))) for impl in impls)
        seconds = measure({(name, pass_): fn for name, pair in pairs.items() for pass_, fn in enumerate(pair)},
                          inputs, args.rounds, args.repeats)
        rows = {name: (seconds[name, 0], seconds[name, 1]) for name in pairs}
        for name, (fwd, fwd_bwd) in rows.items():
            ref_fwd, ref_bwd = rows["reference"]
            soft_fwd, soft_bwd = rows["softmax"]
            growth = ""
            if name in previous:
                growth = f" (x{fwd_bwd / previous[name]:.2f} vs T/2)"
            print(f"| {name} | {length} | {fwd * 1e3:.1f} | {fwd_bwd * 1e3:.1f}{growth} | {ref_fwd / fwd:.1f}x "
                  f"| {ref_bwd / fwd_bwd:.1f}x | {soft_fwd / fwd:.2f}x | {soft_bwd / fwd_bwd:.2f}x |", flush=True)
            previous[name] = fwd_bwd
    print("Ratios are speed-ups: (time of reference or softmax) / (time of this row); > 1 means this row is faster.")


if __name__ == "__main__":
    main()

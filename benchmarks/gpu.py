"""chunk_gla or chunk_delta_rule on a CUDA GPU: correctness of the Pallas kernel, then speed against
XLA, cuDNN and fla.

Run through `benchmarks/gpu.sh [--family gla|delta]`. Steps:
1. `pallas_gpu` against `reference` (forward, final state and all gradients; float32 and bf16);
2. the device's measured peaks: a bf16 8192^3 matmul (FLOP/s) and a 1 GiB copy (bytes/s);
3. per T: median fwd and fwd+bwd times of `pallas_gpu`, `xla` and causal
   `jax.nn.dot_product_attention(implementation="cudnn")` (B=4, H=16, K=V=128, bf16), with achieved
   TFLOP/s and GB/s as fractions of the measured peaks, and, when the `fla-core` package imports
   (with torch), fla's kernel on the same inputs: `chunk_gla` (GLA: per-key gates) or
   `chunk_gated_delta_rule` (the delta rule: Gated DeltaNet, L2-normalised keys, beta in (0, 1),
   one log decay per head and step, which is fla's `g`).
FLOPs, per head and token, counting the matmuls of the chunked forward on whole tiles (2 per
multiply-add; C = the chunk the implementation walks):
  GLA 2C(K+V) + 4KV: q k^T and scores @ v inside the chunk; q S and k^T v against the state.
  Delta rule 2C(3K+2V) + 6KV: q k^T, k k^T, the chunk's inverse (I + L)^-1 applied to
  [beta v | beta exp(G) k], scores @ U inside the chunk; weights S, q S and k^T U against the
  state. Building the inverse is not counted: its cost depends on the method (the Pallas kernel's
  block doubling does 4 C^2 log2(C) per token), and elementwise work is not counted for either.
  Causal softmax forward 2T(K+V)/2 per token. fwd+bwd counts 3x the forward.
Bytes: one read of the inputs and one write of the outputs (the least any implementation must move).
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.pallas_kernels.delta import chunk_delta_rule
from seqmix.pallas_kernels.gla import chunk_gla


@dataclasses.dataclass(frozen=True)
class Family:
    """What the benchmark needs of a kernel family.

    gates(rng, shape, log_decays) -> the per-token float32 inputs after q, k, v for q's shape
    (B, T, H, D), with log_decays(size) drawing the log decays; op(q, k, v, *gates, **options)
    calls the family's op; chunked_flops(chunk, K, V): the chunked forward's matmul FLOPs per head
    and token; fla() -> fla's op on torch tensors (q, k, v, *gates) returning the output (raises
    ImportError where fla or torch is missing)."""

    name: str
    inputs: str
    gate_names: tuple[str, ...]
    normalised_keys: bool
    gates: Callable
    op: Callable
    chunked_flops: Callable
    fla_name: str
    fla: Callable


def _fla_gla():
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    return lambda q, k, v, log_g: fla_chunk_gla(q, k, v, log_g, output_final_state=False)[0]


def _fla_gated_delta_rule():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    # fla's g is our log_a (natural-log decay per head and step), in the same [B,T,H,*] layout;
    # fla wants beta in the inputs' dtype and keys L2-normalised by the caller, as seqmix does.
    return lambda q, k, v, beta, log_a: chunk_gated_delta_rule(
        q, k, v, log_a, beta.to(q.dtype), scale=q.shape[-1] ** -0.5, output_final_state=False)[0]


FAMILIES = {
    "gla": Family(
        name="chunk_gla", inputs="per-key gates", gate_names=("log_g",), normalised_keys=False,
        gates=lambda rng, shape, log_decays: (jnp.asarray(log_decays(shape), jnp.float32),),
        op=lambda q, k, v, log_g, **options: chunk_gla(q, k, v, log_g=log_g, **options),
        chunked_flops=lambda chunk, key_dim, value_dim: 2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim,
        fla_name="chunk_gla", fla=_fla_gla,
    ),
    "delta": Family(
        name="chunk_delta_rule", inputs="per-head gates, beta in (0, 1), L2-normalised keys",
        gate_names=("beta", "log_a"), normalised_keys=True,
        gates=lambda rng, shape, log_decays: (jnp.asarray(rng.uniform(0.0, 1.0, size=shape[:3]), jnp.float32),
                                              jnp.asarray(log_decays(shape[:3]), jnp.float32)),
        op=lambda q, k, v, beta, log_a, **options: chunk_delta_rule(q, k, v, beta, log_a=log_a, **options),
        chunked_flops=lambda chunk, key_dim, value_dim: (2 * chunk * (3 * key_dim + 2 * value_dim)
                                                         + 6 * key_dim * value_dim),
        fla_name="chunk_gated_delta_rule", fla=_fla_gated_delta_rule,
    ),
}

# The chunk each implementation walks at the ops' default chunk_size (64), for the FLOP counts: the
# Pallas GPU kernels always walk 16 tokens.
CHUNKS = {"pallas_gpu": 16, "xla": 64}


def median_seconds(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def queries_keys_values(rng, shape, normalised_keys, dtype):
    q, k, v = (rng.normal(size=shape) for _ in range(3))
    if normalised_keys:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def check_against_reference(family: Family):
    rng = np.random.default_rng(0)
    batch, length, heads, dim = 2, 300, 4, 64
    shape = (batch, length, heads, dim)
    q, k, v = queries_keys_values(rng, shape, family.normalised_keys, jnp.float32)
    gates = family.gates(rng, shape, lambda size: rng.uniform(-1.0, 0.0, size=size))
    h0 = jnp.asarray(rng.normal(size=(batch, heads, dim, dim)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(1, 7), 50)[None].repeat(batch, 0), jnp.int32)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(impl, dtype, q, k, v, gates, h0):
        out, state = family.op(q.astype(dtype), k.astype(dtype), v.astype(dtype), *gates, initial_state=h0,
                               segment_ids=segments, output_final_state=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(state), (out, state)

    names = ["out", "final state", "dq", "dk", "dv", *(f"d{name}" for name in family.gate_names), "dh0"]
    print("## pallas_gpu against reference (relative error)")
    print("| dtype | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    worst = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        grad = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
        (_, expected), expected_grads = grad("reference", jnp.float32, q, k, v, gates, h0)
        (_, actual), actual_grads = grad("pallas_gpu", dtype, q, k, v, gates, h0)
        errors = [relative_error(a, e) for a, e in zip(jax.tree.leaves((actual, actual_grads)),
                                                       jax.tree.leaves((expected, expected_grads)), strict=True)]
        worst[jnp.dtype(dtype).name] = max(errors)
        print(f"| {jnp.dtype(dtype).name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    ok = worst["float32"] < 1e-4 and worst["bfloat16"] < 5e-2
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'} (float32 < 1e-4, bf16 < 5e-2)\n")
    return ok


def measured_peaks():
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    matmul = median_seconds(jax.jit(lambda a: a @ a), a, repeats=5)
    x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    copy = median_seconds(jax.jit(lambda x: x * 1.0001), x, repeats=5)
    return 2 * 8192**3 / matmul, 2 * x.nbytes / copy


def fla_timer(family: Family):
    """fla's op as (fwd_seconds, fwd_bwd_seconds) on given jax inputs (q, k, v, *gates), or None."""
    try:
        import torch
        fla_op = family.fla()
    except ImportError as error:
        print(f"fla-core not importable ({error}); its rows are left out\n")
        return None

    def timed(q, k, v, *gates):
        to = lambda x, dtype: torch.from_numpy(np.asarray(x, np.float32)).to("cuda", dtype).requires_grad_()
        inputs = [to(x, torch.bfloat16) for x in (q, k, v)] + [to(g, torch.float32) for g in gates]

        def run(backward):
            out = fla_op(*inputs)
            if backward:
                out.float().sum().backward()
            torch.cuda.synchronize()

        results = []
        for backward in (False, True):
            run(backward)
            times = []
            for _ in range(10):
                start = time.perf_counter()
                run(backward)
                times.append(time.perf_counter() - start)
            results.append(statistics.median(times))
        return tuple(results)

    return timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gla")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    family = FAMILIES[args.family]
    print(f"# {family.name} on {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    ok = check_against_reference(family)
    peak_flops, peak_bytes = measured_peaks()
    print(f"measured peaks: {peak_flops / 1e12:.0f} TFLOP/s (bf16 matmul), {peak_bytes / 1e9:.0f} GB/s (copy)\n")
    fla = fla_timer(family)
    b, h, d = args.batch, args.heads, args.dim
    print(f"## B={b} H={h} K=V={d} bf16, {family.inputs}; times in ms (median of 10)")
    print("| T | impl | fwd | fwd+bwd | fwd TFLOP/s (of peak) | fwd GB/s (of peak) | fwd+bwd vs cuDNN | fwd+bwd seqmix/fla |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for length in args.lengths:
        shape = (b, length, h, d)
        q, k, v = queries_keys_values(rng, shape, family.normalised_keys, jnp.bfloat16)
        gates = family.gates(rng, shape, lambda size: np.log(rng.uniform(0.9, 1.0, size=size)))
        chunked = lambda impl: lambda q, k, v, *gates: family.op(q, k, v, *gates, impl=impl)
        softmax = lambda q, k, v, *gates: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn")
        candidates = {"pallas_gpu": chunked("pallas_gpu"), "xla": chunked("xla"), "cudnn softmax": softmax}
        timings = {}
        for name, fn in candidates.items():
            loss = lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32))
            fwd = median_seconds(jax.jit(fn), q, k, v, *gates)
            argnums = tuple(range(3 + len(gates)))
            fwd_bwd = median_seconds(jax.jit(jax.grad(loss, argnums=argnums)), q, k, v, *gates)
            per_head = (length * family.chunked_flops(CHUNKS[name], d, d) if name in CHUNKS
                        else length**2 * 2 * d)
            moved = 4 * q.nbytes + sum(g.nbytes for g in gates)
            timings[name] = (fwd, fwd_bwd, b * h * per_head, moved)
        if fla is not None:
            fla_fwd, fla_fwd_bwd = fla(q, k, v, *gates)
        for name, (fwd, fwd_bwd, flops, moved) in timings.items():
            versus_fla = f"{fla_fwd_bwd / fwd_bwd:.2f}x" if fla is not None and name == "pallas_gpu" else ""
            print(f"| {length} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | {flops / fwd / 1e12:.1f} "
                  f"({flops / fwd / peak_flops:.0%}) | {moved / fwd / 1e9:.0f} ({moved / fwd / peak_bytes:.0%}) "
                  f"| {timings['cudnn softmax'][1] / fwd_bwd:.2f}x | {versus_fla} |", flush=True)
        if fla is not None:
            print(f"| {length} | fla {family.fla_name} | {fla_fwd * 1e3:.2f} | {fla_fwd_bwd * 1e3:.2f} | | | "
                  f"{timings['cudnn softmax'][1] / fla_fwd_bwd:.2f}x | |", flush=True)
    print("\n'vs cuDNN' and 'seqmix/fla' are speed-ups: the other's time over this row's; > 1 means this row is faster.")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

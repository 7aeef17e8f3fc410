"""chunk_gla on a CUDA GPU: correctness of the Pallas kernel, then speed against XLA, cuDNN and fla.

Run through `benchmarks/gpu.sh`. Steps:
1. `pallas_gpu` against `reference` (forward, final state and all gradients; float32 and bf16);
2. the device's measured peaks: a bf16 8192^3 matmul (FLOP/s) and a 1 GiB copy (bytes/s);
3. per T: median fwd and fwd+bwd times of `pallas_gpu`, `xla` and causal
   `jax.nn.dot_product_attention(implementation="cudnn")` (B=4, H=16, K=V=128, bf16, per-key
   gates), with achieved TFLOP/s and GB/s as fractions of the measured peaks, and, when the
   `fla-core` package imports (with torch), fla's `chunk_gla` on the same inputs.
FLOPs: chunked GLA forward 2T(C(K+V) + 2KV) per head (C = chunk), causal softmax forward
2T^2(K+V)/2 per head; fwd+bwd counts 3x the forward. Bytes: one read of the inputs and one write
of the outputs (the least any implementation must move).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.pallas_kernels.gla import chunk_gla


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


def check_against_reference():
    rng = np.random.default_rng(0)
    batch, length, heads, dim = 2, 300, 4, 64
    shape = (batch, length, heads, dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    log_g = jnp.asarray(rng.uniform(-1.0, 0.0, size=shape), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, heads, dim, dim)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(1, 7), 50)[None].repeat(batch, 0), jnp.int32)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(impl, dtype, q, k, v, log_g, h0):
        out, state = chunk_gla(q.astype(dtype), k.astype(dtype), v.astype(dtype), log_g=log_g, initial_state=h0,
                               segment_ids=segments, output_final_state=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(state), (out, state)

    print("## pallas_gpu against reference (relative error)")
    print("| dtype | out | final state | dq | dk | dv | dlog_g | dh0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        grad = jax.jit(jax.value_and_grad(loss, argnums=(3, 4, 5, 6, 7), has_aux=True), static_argnums=(0, 1))
        (_, expected), expected_grads = grad("reference", jnp.float32, q, k, v, log_g, h0)
        (_, actual), actual_grads = grad("pallas_gpu", dtype, q, k, v, log_g, h0)
        errors = [relative_error(a, e) for a, e in zip((*actual, *actual_grads), (*expected, *expected_grads))]
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


def fla_timer():
    """fla's chunk_gla as (fwd_seconds, fwd_bwd_seconds) on given numpy inputs, or None."""
    try:
        import torch
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except ImportError as error:
        print(f"fla-core not importable ({error}); its column is left out\n")
        return None

    def timed(q, k, v, log_g):
        to = lambda x, dtype: torch.from_numpy(np.asarray(x, np.float32)).to("cuda", dtype)
        tq, tk, tv = (to(x, torch.bfloat16).requires_grad_() for x in (q, k, v))
        tg = to(log_g, torch.float32).requires_grad_()

        def run(backward):
            out, _ = fla_chunk_gla(tq, tk, tv, tg, output_final_state=False)
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    print(f"# chunk_gla on {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    ok = check_against_reference()
    peak_flops, peak_bytes = measured_peaks()
    print(f"measured peaks: {peak_flops / 1e12:.0f} TFLOP/s (bf16 matmul), {peak_bytes / 1e9:.0f} GB/s (copy)\n")
    fla = fla_timer()
    b, h, d = args.batch, args.heads, args.dim
    print(f"## B={b} H={h} K=V={d} bf16, per-key gates; times in ms (median of 10)")
    print("| T | impl | fwd | fwd+bwd | fwd TFLOP/s (of peak) | fwd GB/s (of peak) | fwd+bwd vs cuDNN | fwd+bwd seqmix/fla |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for length in args.lengths:
        shape = (b, length, h, d)
        q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for _ in range(3))
        log_g = jnp.asarray(np.log(rng.uniform(0.9, 1.0, size=shape)), jnp.float32)
        gla = lambda impl: lambda q, k, v, g: chunk_gla(q, k, v, log_g=g, impl=impl)
        softmax = lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        candidates = {"pallas_gpu": (gla("pallas_gpu"), 16), "xla": (gla("xla"), 64), "cudnn softmax": (softmax, None)}
        timings = {}
        for name, (fn, chunk) in candidates.items():
            loss = lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32))
            fwd = median_seconds(jax.jit(fn), q, k, v, log_g)
            fwd_bwd = median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), q, k, v, log_g)
            flops = b * h * (2 * length * (chunk * 2 * d + 2 * d * d) if chunk else length**2 * 2 * d)
            moved = 4 * q.nbytes + log_g.nbytes
            timings[name] = (fwd, fwd_bwd, flops, moved)
        if fla is not None:
            fla_fwd, fla_fwd_bwd = fla(q, k, v, log_g)
        for name, (fwd, fwd_bwd, flops, moved) in timings.items():
            versus_fla = f"{fla_fwd_bwd / fwd_bwd:.2f}x" if fla is not None and name == "pallas_gpu" else ""
            print(f"| {length} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | {flops / fwd / 1e12:.1f} "
                  f"({flops / fwd / peak_flops:.0%}) | {moved / fwd / 1e9:.0f} ({moved / fwd / peak_bytes:.0%}) "
                  f"| {timings['cudnn softmax'][1] / fwd_bwd:.2f}x | {versus_fla} |", flush=True)
        if fla is not None:
            print(f"| {length} | fla chunk_gla | {fla_fwd * 1e3:.2f} | {fla_fwd_bwd * 1e3:.2f} | | | "
                  f"{timings['cudnn softmax'][1] / fla_fwd_bwd:.2f}x | |", flush=True)
    print("\n'vs cuDNN' and 'seqmix/fla' are speed-ups: the other's time over this row's; > 1 means this row is faster.")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""A kernel family on a CUDA GPU: correctness of its Pallas kernel, then speed against XLA, cuDNN and fla.

Run through `benchmarks/gpu.sh [--family gla|delta|kda|dplr]`; without --family every family runs in
turn, each in its own process stopped after --seconds-per-family (one that hangs, crashes or runs
long loses only the rest of its own table: rows print as they are timed), and the exit status says
whether every one passed. The families, their inputs and FLOP counts are `kernels.py`'s
(`kernels.FAMILIES`): chunk_gla with per-key gates; chunk_delta_rule with per-head gates (Gated
DeltaNet) or per-key gates (KDA, Kimi's gate); chunk_dplr on RWKV-7 inputs. Steps:
1. `pallas_gpu` against `reference` (forward, final state and all gradients; float32 and bf16),
   where the family has a `pallas_gpu` implementation; a kernel that fails is reported and left
   out of the timings;
2. the device's measured peaks: a bf16 8192^3 matmul (FLOP/s) and a 1 GiB copy (bytes/s);
3. per T: median fwd and fwd+bwd times of `pallas_gpu`, `xla` and causal
   `jax.nn.dot_product_attention(implementation="cudnn")` (B=4, H=16, K=V=128, bf16; with
   --value-heads-per-key G, q and k have H/G heads), with achieved TFLOP/s and GB/s as fractions
   of the measured peaks, and, when the `fla-core` package imports (with torch), fla 0.6's kernel
   on the same inputs: `chunk_gla`; `chunk_gated_delta_rule`; `chunk_kda` (fla.ops.kda: g the
   per-key log decay, beta, grouped value heads native); `chunk_dplr_delta_rule`
   (fla.ops.generalized_delta_rule: the same a, b orientation as `chunk_dplr`, S_t =
   Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T in fla's naive.py, gk = log_g).
   Where fla's op has no grouped value heads (gla, dplr) its q and k are repeated to v's heads,
   inside the timed call, as fla's layers do. An fla op that fails is reported and left out.
   The order: cuDNN, the seqmix rows, then fla (whose autotuning compiles many kernels).
   Where --dim is wider than `sweep_gpu.VALUE_BLOCK`, the Pallas kernels split V across programs;
   the row `pallas_gpu whole V` times them holding the whole [V, K] state in one program, the form
   the split replaced (chosen from ptxas's spill report, `gpu_resources.py`), side by side.
FLOPs, per value head and token: the matmuls of the chunked forward on whole tiles (2 per
multiply-add), as `kernels.py` counts them for the `xla` path, with C = the chunk the
implementation walks (the Pallas GPU kernels walk 16). Causal softmax forward 2T(K+V)/2 per token.
Bytes: one read of the inputs and one write of the outputs (the least any implementation must move).
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import FAMILIES, Family, chosen_gate, random_cotangent_loss, random_inputs
from seqmix.pallas_kernels import sweep_gpu


def _fla_gla():
    from fla.ops.gla import chunk_gla
    return lambda q, k, v, extras: chunk_gla(q, k, v, extras["log_g"], output_final_state=False)[0]


def _fla_gated_delta_rule():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    # fla's g is our log_a (natural-log decay per head and step), in the same [B,T,H,*] layout;
    # fla wants beta in the inputs' dtype and keys L2-normalised by the caller, as seqmix does.
    return lambda q, k, v, extras: chunk_gated_delta_rule(
        q, k, v, g=extras["log_a"], beta=extras["beta"].to(q.dtype), scale=q.shape[-1] ** -0.5,
        output_final_state=False)[0]


def _fla_kda():
    from fla.ops.kda import chunk_kda
    # g: the precomputed per-key log decay [B,T,HV,K] (use_gate_in_kernel=False, the default).
    return lambda q, k, v, extras: chunk_kda(
        q, k, v, g=extras["log_g"], beta=extras["beta"].to(q.dtype), scale=q.shape[-1] ** -0.5,
        output_final_state=False)[0]


def _fla_dplr():
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule
    # a, b [B,T,H,K] in fla's orientation, which is seqmix's; gk the per-key log decay in float32.
    return lambda q, k, v, extras: chunk_dplr_delta_rule(
        q, k, v, a=extras["a"].to(q.dtype), b=extras["b"].to(q.dtype), gk=extras["log_g"],
        scale=q.shape[-1] ** -0.5, output_final_state=False)[0]


def _grouped_by_repeat(fla_op):
    """fla's op on v's heads, q and k repeated to them (for ops without grouped value heads)."""
    def run(q, k, v, extras):
        groups = v.shape[2] // q.shape[2]
        return fla_op(q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2), v, extras)
    return run


# fla's op for each family: (its name, a loader returning it on torch tensors (q, k, v, extras)).
FLA = {
    "gla": ("chunk_gla", lambda: _grouped_by_repeat(_fla_gla())),
    "delta": ("chunk_gated_delta_rule", _fla_gated_delta_rule),
    "kda": ("chunk_kda", _fla_kda),
    "dplr": ("chunk_dplr_delta_rule", lambda: _grouped_by_repeat(_fla_dplr())),
}

# The chunk each implementation walks at the ops' default chunk_size (64), for the FLOP counts: the
# Pallas GPU kernels always walk 16.
CHUNKS = {"pallas_gpu": 16, "pallas_gpu whole V": 16, "xla": 64}


@contextlib.contextmanager
def value_block(columns: int):
    """The Pallas GPU kernels traced inside hold `columns` value columns per program."""
    saved, sweep_gpu.VALUE_BLOCK = sweep_gpu.VALUE_BLOCK, columns
    try:
        yield
    finally:
        sweep_gpu.VALUE_BLOCK = saved


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


def check_against_reference(family: Family, gate: str, value_heads_per_key: int, dim: int) -> bool:
    """Prints the relative errors of `pallas_gpu` against `reference` (float32 and bf16 inputs) on
    packed rows with an initial state, K = V = dim as timed; True when they are within bounds."""
    rng = np.random.default_rng(0)
    batch, length, heads = 2, 300, 4
    q, k, v, extras = random_inputs(rng, family, gate, (batch, length, heads // value_heads_per_key, dim), heads,
                                    jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, heads, dim, dim)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(1, 7), 50)[None].repeat(batch, 0), jnp.int32)
    weights = jnp.asarray(rng.normal(size=v.shape), jnp.float32)

    def loss(impl, dtype, q, k, v, extras, h0):
        out, state = family.op(q.astype(dtype), k.astype(dtype), v.astype(dtype), **extras, initial_state=h0,
                               segment_ids=segments, output_final_state=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(state), (out, state)

    names = ["out", "final state", "dq", "dk", "dv", *(f"d{name}" for name in sorted(extras)), "dh0"]
    print("## pallas_gpu against reference (relative error)")
    print("| dtype | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    worst = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        grad = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
        (_, expected), expected_grads = grad("reference", jnp.float32, q, k, v, extras, h0)
        (_, actual), actual_grads = grad("pallas_gpu", dtype, q, k, v, extras, h0)
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


def fla_timer(family_name: str):
    """fla's op as (fwd_seconds, fwd_bwd_seconds) on given jax inputs (q, k, v, extras), or None
    where fla or torch is missing."""
    try:
        import torch
        fla_op = FLA[family_name][1]()
    except ImportError as error:
        print(f"fla-core not importable ({error}); its rows are left out\n")
        return None

    def timed(q, k, v, extras):
        to = lambda x, dtype: torch.from_numpy(np.asarray(x, np.float32)).to("cuda", dtype).requires_grad_()
        q, k, v = (to(x, torch.bfloat16) for x in (q, k, v))
        extras = {name: to(x, torch.float32) for name, x in extras.items()}

        def run(backward):
            out = fla_op(q, k, v, extras)
            if backward:
                (out.float() * v.detach().float()).sum().backward()  # as `random_cotangent_loss`
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


def every_family(seconds: int) -> int:
    """Runs this script once per family with the same arguments, each in its own process stopped
    after `seconds`; 0 when every family passed."""
    failed = []
    for name in FAMILIES:
        try:
            returncode = subprocess.run([sys.executable, __file__, "--family", name, *sys.argv[1:]],
                                        timeout=seconds).returncode
            if returncode != 0:
                failed.append(f"{name} (exit {returncode})")
        except subprocess.TimeoutExpired:
            print(f"\n{name}: stopped after {seconds} s\n", flush=True)
            failed.append(f"{name} (stopped)")
    print(f"families failed: {', '.join(failed)}" if failed else "every family passed")
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), help="one family (default: each in turn)")
    parser.add_argument("--seconds-per-family", type=int, default=120)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16, help="value heads H")
    parser.add_argument("--value-heads-per-key", type=int, default=1, help="G: q and k with H/G heads")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    if args.family is None:
        raise SystemExit(every_family(args.seconds_per_family))
    family = FAMILIES[args.family]
    gate = chosen_gate(parser, args.family, None)
    if args.heads % args.value_heads_per_key:
        parser.error("--heads must be a multiple of --value-heads-per-key")
    print(f"# {family.op_name} on {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    pallas = [i.name for i in family.implementations if i.name == "pallas_gpu"]
    ok = True
    if pallas:
        try:
            ok = check_against_reference(family, gate, args.value_heads_per_key, args.dim)
        except Exception as error:  # a kernel that does not run yet: time the rest
            print(f"pallas_gpu failed: {type(error).__name__}: {error}\n")
            ok, pallas = False, []
    else:
        print(f"{family.op_name} has no pallas_gpu implementation yet: xla, cuDNN and fla only\n")
    peak_flops, peak_bytes = measured_peaks()
    print(f"measured peaks: {peak_flops / 1e12:.0f} TFLOP/s (bf16 matmul), {peak_bytes / 1e9:.0f} GB/s (copy)\n")
    fla = fla_timer(args.family)
    fla_name = FLA[args.family][0]
    b, h, d = args.batch, args.heads, args.dim
    print(f"## B={b} H={h} (q/k heads {h // args.value_heads_per_key}) K=V={d} bf16, gate={gate}; "
          "times in ms (median of 10)")
    print("| T | impl | fwd | fwd+bwd | fwd TFLOP/s (of peak) | fwd GB/s (of peak) | fwd+bwd vs cuDNN |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for length in args.lengths:
        q, k, v, extras = random_inputs(rng, family, gate, (b, length, h // args.value_heads_per_key, d), h,
                                        jnp.bfloat16)
        chunked = lambda impl: lambda q, k, v, extras: family.op(q, k, v, **extras, impl=impl)

        def softmax(q, k, v, extras):
            groups = v.shape[2] // q.shape[2]
            q, k = (jnp.repeat(x, groups, axis=2) for x in (q, k))
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        def timed(name, fn, columns=sweep_gpu.VALUE_BLOCK):
            """(fwd s, fwd+bwd s, FLOPs, bytes moved) of fn, its Pallas GPU kernels traced with
            `columns` value columns per program."""
            loss = random_cotangent_loss(fn)
            with value_block(columns):
                fwd = median_seconds(jax.jit(fn), q, k, v, extras)
                fwd_bwd = median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), q, k, v, extras)
            per_head = (length * family.flops(CHUNKS[name], d, d)[0] if name in CHUNKS else length**2 * 2 * d)
            moved = q.nbytes + k.nbytes + 2 * v.nbytes + sum(x.nbytes for x in extras.values())
            return fwd, fwd_bwd, b * h * per_head, moved

        # cuDNN first (the ratios' denominator), then each seqmix row printed as soon as it is timed
        # and fla last (its autotuning compiles many kernels), so that a family stopped at its time
        # limit keeps the rows it finished.
        cudnn = timed("cudnn softmax", softmax)
        rows = [(name, chunked(name), sweep_gpu.VALUE_BLOCK) for name in [*pallas, "xla"]]
        if pallas and d > sweep_gpu.VALUE_BLOCK:
            rows.append(("pallas_gpu whole V", chunked("pallas_gpu"), d))
        fwd_bwd_times = {}

        def print_row(name, fwd, fwd_bwd, flops, moved):
            fwd_bwd_times[name] = fwd_bwd
            print(f"| {length} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | {flops / fwd / 1e12:.1f} "
                  f"({flops / fwd / peak_flops:.0%}) | {moved / fwd / 1e9:.0f} ({moved / fwd / peak_bytes:.0%}) "
                  f"| {cudnn[1] / fwd_bwd:.2f}x |", flush=True)

        for name, fn, columns in rows:
            print_row(name, *timed(name, fn, columns))
        print_row("cudnn softmax", *cudnn)
        if fla is not None:
            try:
                fla_fwd, fla_fwd_bwd = fla(q, k, v, extras)
            except Exception as error:  # an fla kernel that rejects these inputs: report, time the rest
                print(f"fla {fla_name} failed at T={length}: {type(error).__name__}: {error}")
                continue
            print(f"| {length} | fla {fla_name} | {fla_fwd * 1e3:.2f} | {fla_fwd_bwd * 1e3:.2f} | | | "
                  f"{cudnn[1] / fla_fwd_bwd:.2f}x |", flush=True)
            print(f"\nT={length}, fwd+bwd against fla {fla_name} (its time over each row's): " + ", ".join(
                f"{name} {fla_fwd_bwd / fwd_bwd_times[name]:.2f}x" for name, _, _ in rows) + "\n", flush=True)
    print("\n'vs cuDNN' and 'against fla' are speed-ups: the other's time over this row's; "
          "> 1 means this row is faster.")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

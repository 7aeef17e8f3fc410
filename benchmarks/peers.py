"""seqmix's `xla` paths against the peers that run on a CPU, on the same inputs, in one run.

    pip install --no-deps ejkernel==0.0.80.3 && pip install beartype chex einops jaxtyping pydantic
    python benchmarks/peers.py --family dplr --lengths 1024 4096 16384
    python benchmarks/peers.py --family delta --lengths 1024 4096 16384
    # fla's torch references too, from a Python 3.11 venv with torch's CPU build:
    #   python3.11 -m venv /tmp/hf311 && /tmp/hf311/bin/pip install torch==2.13.0 numpy einops
    #   /tmp/hf311/bin/pip install --no-deps fla-core==0.6.0
    python benchmarks/peers.py --family kda --fla-python /tmp/hf311/bin/python

Peers, each called as its users call it (its default chunk size), its output checked against
seqmix's `xla` path's on the inputs timed:
- ejkernel 0.0.80.3's XLA kernels, timed in this process, taking turns with seqmix's (as in
  `kernels.py`); its wheel asks for jax 0.10 and, installed with --no-deps, runs on seqmix's jax:
  - dplr: `rwkv7`, RWKV-7's DPLR recurrence as a token-by-token `lax.scan`,
    S_t = Diag(exp(w_t)) S + a_t (b_t^T S) + k_t v_t^T (its a and b are `chunk_dplr`'s b and a);
  - delta: `gated_delta_rule`, chunked (256 tokens, a triangular solve per chunk), a decay per
    head (`use_qk_l2norm=False`: q and k as given, k L2-normalised).
- fla 0.6's pure-torch references (`naive.py`), with --fla-python: `fla_naive.py` in that
  interpreter, after seqmix's rounds at each T, on the same inputs (saved to a file): for kda,
  `naive_chunk_kda` and `naive_recurrent_kda`; for dplr, `dplr_chunkwise` and `dplr_recurrence`;
  backward by torch's autograd.
KDA's per-key gate has no JAX peer that runs on a CPU: ejkernel's `kda` takes one decay per head
(the gated delta rule above), and jax-linear-attention's KDA and DPLR are Mosaic GPU kernels for
Hopper. The inputs are `kernels.py`'s for the family: RWKV-7's for dplr, Kimi's gates for kda.
"""

import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from kernels import FAMILIES, measure, random_inputs, timed_pair


def _ejkernel_dplr(q, k, v, extras):
    from ejkernel.kernels._xla.rwkv7 import rwkv7

    return rwkv7(q, extras["log_g"], k, v, extras["b"], extras["a"], softmax_scale=q.shape[-1] ** -0.5)[0]


def _ejkernel_delta(q, k, v, extras):
    from ejkernel.kernels._xla.gated_delta_rule import gated_delta_rule

    return gated_delta_rule(q, k, v, extras["beta"], extras["log_a"], use_qk_l2norm=False)[0]


# Per family: the gate timed, and its JAX peers (name -> forward like seqmix's).
PEERS = {"dplr": ("key", {"ejkernel rwkv7 (scan)": _ejkernel_dplr}),
         "delta": ("head", {"ejkernel gated_delta_rule (chunked)": _ejkernel_delta}),
         "kda": ("key", {})}
FLA_FAMILIES = ("kda", "dplr")


def max_relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fla_rows(fla_python: str, family: str, inputs, rounds: int, repeats: int):
    """{name: (fwd seconds, fwd+bwd seconds, o)} of fla's references on `inputs` (q, k, v, extras)."""
    q, k, v, extras = inputs
    with tempfile.TemporaryDirectory() as directory:
        arrays, outputs = Path(directory) / "inputs.npz", Path(directory) / "outputs.npz"
        np.savez(arrays, q=q, k=k, v=v, **{name: np.asarray(x) for name, x in extras.items()})
        done = subprocess.run([fla_python, str(Path(__file__).with_name("fla_naive.py")), "--family", family,
                               "--inputs", str(arrays), "--outputs", str(outputs), "--rounds", str(rounds),
                               "--repeats", str(repeats)], capture_output=True, text=True, check=True)
        times, out = json.loads(done.stdout), np.load(outputs)
        return {name: (*times[name], out[name]) for name in times}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="dplr", choices=list(PEERS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--repeats", type=int, default=3, help="consecutive calls per turn")
    parser.add_argument("--rounds", type=int, default=2, help="turns each implementation takes")
    parser.add_argument("--fla-python", help="a Python with torch and fla-core, to time fla's references too")
    args = parser.parse_args()
    gate, jax_peers = PEERS[args.family]
    if jax_peers and importlib.util.find_spec("ejkernel") is None:
        parser.error("the JAX peer is ejkernel's: pip install --no-deps ejkernel==0.0.80.3 && "
                     "pip install beartype chex einops jaxtyping pydantic")
    if args.fla_python and args.family not in FLA_FAMILIES:
        parser.error(f"--fla-python times fla's references of {' and '.join(FLA_FAMILIES)}")
    if not jax_peers and not args.fla_python:
        parser.error(f"--family {args.family} has no JAX peer: give --fla-python to time fla's references")
    family = FAMILIES[args.family]
    forwards = {"seqmix xla": lambda q, k, v, extras: family.op(q, k, v, **extras, impl="xla"),
                "seqmix reference": lambda q, k, v, extras: family.op(q, k, v, **extras, impl="reference"),
                **jax_peers}
    print(f"# {family.op_name} against its peers on {jax.devices()[0].device_kind}, jax {jax.__version__}: "
          f"B=1 H={args.heads} K=V={args.dim} float32, fwd+bwd = gradients of every input")
    print("| impl | T | fwd ms | fwd+bwd ms | fwd+bwd: seqmix xla faster by | max rel. difference of o |")
    print("|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        inputs = random_inputs(np.random.default_rng(0), family, gate, (1, length, args.heads, args.dim),
                               args.heads, jnp.float32)
        pairs = {name: timed_pair(forward) for name, forward in forwards.items()}
        fwd = measure({name: pair[0] for name, pair in pairs.items()}, inputs, args.rounds, args.repeats)
        fwd_bwd = measure({name: pair[1] for name, pair in pairs.items()}, inputs, args.rounds, args.repeats)
        rows = {name: (fwd[name], fwd_bwd[name], pair[0](*inputs)) for name, pair in pairs.items()}
        if args.fla_python:
            rows |= fla_rows(args.fla_python, args.family, inputs, args.rounds, args.repeats)
        ours = rows["seqmix xla"]
        for name, (forward, forward_backward, out) in rows.items():
            print(f"| {name} | {length} | {forward * 1e3:.1f} | {forward_backward * 1e3:.1f} | "
                  f"{forward_backward / ours[1]:.1f}x | {max_relative_difference(out, ours[2]):.1e} |")


if __name__ == "__main__":
    main()

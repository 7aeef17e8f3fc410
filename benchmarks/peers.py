"""seqmix's `xla` paths against the JAX peers that run on a CPU, on the same inputs, side by side in
one run (the implementations taking turns, as in `kernels.py`).

    pip install --no-deps ejkernel==0.0.80.3 && pip install beartype chex einops jaxtyping pydantic
    python benchmarks/peers.py --family dplr --lengths 1024 4096 16384
    python benchmarks/peers.py --family delta --lengths 1024 4096 16384

Peers, each called as its users call it (its default chunk size), checked against seqmix's output
on the inputs before they are timed:
- dplr: ejkernel's XLA `rwkv7`, RWKV-7's DPLR recurrence as a token-by-token `lax.scan`,
  S_t = Diag(exp(w_t)) S + a_t (b_t^T S) + k_t v_t^T (its a and b are `chunk_dplr`'s b and a), on
  the RWKV-7 inputs of `kernels.py --family dplr`;
- delta: ejkernel's XLA `gated_delta_rule`, chunked (256 tokens, a triangular solve per chunk), on
  `kernels.py --family delta`'s inputs (a decay per head, k L2-normalised; `use_qk_l2norm=False`
  leaves q and k as given).
KDA's per-key gate has no JAX peer that runs on a CPU: ejkernel's `kda` takes one decay per head
(the gated delta rule above), and jax-linear-attention's KDA and DPLR are Mosaic GPU kernels for
Hopper. ejkernel's wheel asks for jax 0.10; installed with --no-deps it runs on seqmix's jax.
"""

import argparse
import importlib.util

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


def max_relative_difference(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


PEERS = {"dplr": ("ejkernel rwkv7 (scan)", _ejkernel_dplr, "key"),
         "delta": ("ejkernel gated_delta_rule (chunked)", _ejkernel_delta, "head")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="dplr", choices=list(PEERS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--repeats", type=int, default=3, help="consecutive calls per turn")
    parser.add_argument("--rounds", type=int, default=2, help="turns each implementation takes")
    args = parser.parse_args()
    if importlib.util.find_spec("ejkernel") is None:
        parser.error("the peer is ejkernel's: pip install --no-deps ejkernel==0.0.80.3 && "
                     "pip install beartype chex einops jaxtyping pydantic")
    family = FAMILIES[args.family]
    peer_name, peer, gate = PEERS[args.family]
    forwards = {"seqmix xla": lambda q, k, v, extras: family.op(q, k, v, **extras, impl="xla"),
                "seqmix reference": lambda q, k, v, extras: family.op(q, k, v, **extras, impl="reference"),
                peer_name: peer}
    print(f"# {family.op_name} against {peer_name} on {jax.devices()[0].device_kind}, jax {jax.__version__}: "
          f"B=1 H={args.heads} K=V={args.dim} float32, fwd+bwd = gradients of every input")
    print("| impl | T | fwd ms | fwd+bwd ms | fwd+bwd: seqmix xla faster by | max rel. difference of o |")
    print("|---|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        q, k, v, extras = random_inputs(np.random.default_rng(0), family, gate, (1, length, args.heads, args.dim),
                                        args.heads, jnp.float32)
        inputs = (q, k, v, extras)
        pairs = {name: timed_pair(forward) for name, forward in forwards.items()}
        outputs = {name: pair[0](*inputs) for name, pair in pairs.items()}
        fwd = measure({name: pair[0] for name, pair in pairs.items()}, inputs, args.rounds, args.repeats)
        fwd_bwd = measure({name: pair[1] for name, pair in pairs.items()}, inputs, args.rounds, args.repeats)
        for name in forwards:
            difference = max_relative_difference(outputs[name], outputs["seqmix xla"])
            print(f"| {name} | {length} | {fwd[name] * 1e3:.1f} | {fwd_bwd[name] * 1e3:.1f} | "
                  f"{fwd_bwd[name] / fwd_bwd['seqmix xla']:.1f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()

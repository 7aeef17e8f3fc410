"""Speed of the chunked-scan implementations against the reference and softmax attention, and the
share of this machine's matmul rate they reach.

    python benchmarks/kernels.py                 # chunk_gla, B=1, H=4, K=V=64, float32, T = 1k..16k
    python benchmarks/kernels.py --gate head --lengths 1024 4096
    python benchmarks/kernels.py --family delta  # chunk_delta_rule (--gate head: gated, none: plain)
    python benchmarks/kernels.py --family kda    # chunk_delta_rule with per-key log_g (Kimi Delta Attention)
    python benchmarks/kernels.py --family dplr   # chunk_dplr on RWKV-7-like inputs
    python benchmarks/kernels.py --family kda --gate steep   # a few steep keys, as trained gates have
    python benchmarks/kernels.py --family kda --value-heads-per-key 2   # H/2 query/key heads
    python benchmarks/kernels.py --family dplr --lengths 1024 4096 16384 32768   # no softmax past 16k

Prints one markdown table: per implementation and T, the forward and forward+backward times (the
best of 3 rounds, each the median of 5 consecutive calls, the implementations taking turns), and
each as a ratio to `reference` and to `jax.nn.dot_product_attention` (causal; up to
--softmax-up-to) on the same shape, all measured in the same run; "(xN per 2x T)" is the growth of
the fwd+bwd time per doubling of T since the previous length. Forward+backward means the gradients
of every input. Pallas kernels are timed only on their own device (here they would run in an
interpreter, which says nothing about their speed).

A second table gives each chunked implementation's fwd+bwd matmul FLOPs per second, as a fraction
of the machine's rate on batched 64x64x64 float32 matmuls: `chunked.mm` (the `jnp.einsum` at full
float32 precision that the `xla` paths use) on [256,64,64] x [256,64,64], timed in the same rounds
as the implementations at each T (the best round), so both see the same spells of this VM's
drifting speed. Last, each chunked implementation's largest growth per doubling of T.

Matmul FLOPs of the `xla` path's chunked algorithm, per value head and token, 2 per multiply-add,
C = chunk_size, counted from what its forward and its hand-written backward multiply (elementwise
work is not counted; neither is building the delta rules' and DPLR's triangular inverse by block
doubling, 2(C^2-1)/3 per token and per build, which the forward and the backward each do):
  GLA (any gate), gla/xla.py:
    forward  2C(K+V) + 4KV: q k^T and scores @ v inside the chunk; k^T v into the state, q S out of it.
    backward 2C(3K+2V) + 8KV: the scores again, their products with d_o and v, dq and dk from
             d_scores; q^T d_o (the state's cotangent), d_o S^T, v dS^T, k dS.
  Delta rule (per head or no decay), delta/xla.py:
    forward  2C(3K+2V) + 6KV: k k^T; (I + L)^-1 [v | k_read]; the state's weights S and k^T U in
             the chunk scan; q k^T, scores @ U and q S for the output.
    backward 2C(8K+5V) + 14KV: k k^T and the solve again, q k^T, scores^T d_o; (I + L)^-T and
             d_L = -d_rhs solved^T over [V | K] columns, d_o U^T; dq, and dk as two products; and
             U again, q^T d_o, two products per chunk in the reverse scan, d_U S^T, d_o S^T, U dS^T.
  KDA (the delta rule with per-key decay), delta/xla.py with per_key_decay.py: the delta rule's,
    plus 2CK in the backward: the cotangents of k k^T under a per-key decay are two products
    (rows and columns) where the per-head form sums them into one.
  DPLR, dplr/xla.py:
    forward  2C(5K+4V) + 8KV + 2K^2 + 2K^2V/C: the decayed products a b^T, a k^T, q b^T, q k^T;
             L_ak V and (I - L_ab)^-1 [L_ak V | A_read]; the chunk's transition M = Diag + B^T W
             (2K^2) and the carry M S ([K,K] by [K,V] once per chunk, 2K^2V/C); B^T U_v, K^T V,
             W S, q S, P_qb U and P_qk V.
    backward 2C(15K+10V) + 18KV + 2K^2 + 2K^2V/C: the forward's terms again, the carry reversed
             (M^T), the solve's cotangents through X^T and the four products' (two each).
  Per-key decayed products count as one [C,K] by [K,C] product (`per_key_decay`'s factored form);
  the elementwise pass it adds for key channels whose half chunk decays by more than 60 nats is
  uncounted (the header gives the share of such spans). The delta rule's and DPLR's paths walk
  chunks of at most their LONGEST_CHUNK tokens (32) whatever --chunk-size asks; their counts, and
  the header's chunk, use that C.
(The counts were checked against the dot_generals in the jaxprs of the `xla` paths' fwd and
fwd+bwd, with the doubling's levels of 16 and more as the only difference.)
"""

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.pallas_kernels import chunked, delta, dplr, gla
from seqmix.pallas_kernels.delta import xla as delta_xla
from seqmix.pallas_kernels.dplr import xla as dplr_xla

MATMUL_TILES = 256  # [64,64] tiles per batched matmul of the machine-rate measurement


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


def _log_uniform_decay(rng, shape):
    """log of U(0.9, 1): per-step decays of a slowly forgetting state."""
    return jnp.asarray(np.log(rng.uniform(0.9, 1.0, size=shape)), jnp.float32)


def _beta(rng, shape):
    return jnp.asarray(rng.uniform(0.0, 1.0, size=shape), jnp.float32)


def _kda_log_g(rng, shape):
    """Kimi Delta Attention's gate, log_g = -exp(A_log) softplus(x + dt_bias) [B,T,H,K], with A
    ~ U(1, 16) per head and dt_bias the inverse softplus of a step drawn log-uniformly in
    [1e-3, 1e-1] per head and key (Mamba2's initialisation, per key), x ~ N(0, 1) per token: keys
    that remember for thousands of tokens beside keys that forget within a few."""
    heads, key_dim = shape[2:]
    a = rng.uniform(1.0, 16.0, size=(heads, 1))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(heads, key_dim)))
    dt_bias = dt + np.log(-np.expm1(-dt))
    return jnp.asarray(-a * np.logaddexp(0.0, rng.normal(size=shape) + dt_bias), jnp.float32)


def _rwkv7_inputs(rng, shape):
    """RWKV-7's a, b and log decay, [B,T,H,K] each: a = -kappa_hat, b = kappa_hat * alpha with the
    removal key kappa_hat L2-normalised and the in-context learning rate alpha = sigmoid(N(0, 1)) in
    (0, 1); log_g = -exp(-0.5 - softplus(-(w0 + x))) in (-e^-0.5, 0), w0 RWKV-7's decay_speed + 0.5
    over the H*K channels of a middle layer (-6.5 to -1.5), x ~ N(0, 1) per token."""
    heads, key_dim = shape[2:]
    kappa = rng.normal(size=shape)
    kappa_hat = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
    alpha = 1.0 / (1.0 + np.exp(-rng.normal(size=shape)))
    channels = heads * key_dim
    w0 = -6.5 + 5.0 * (np.arange(channels) / (channels - 1)) ** (0.85 + 0.5**0.5)
    log_g = -np.exp(-0.5 - np.logaddexp(0.0, -(w0.reshape(heads, key_dim) + rng.normal(size=shape))))
    return {name: jnp.asarray(x, jnp.float32)
            for name, x in (("a", -kappa_hat), ("b", kappa_hat * alpha), ("log_g", log_g))}


def _keyed(rng, gate: str, extras: dict, share=0.05, span=16) -> dict:
    """The per-key families' extras for `gate`: as drawn ("key"), or ("steep") with, in each span of
    16 tokens, a random `share` of the keys of log_g [B,T,H,K] decaying by 4 nats a token: past the
    60 nats per half chunk beyond which the per-key `xla` paths take a key elementwise
    (`per_key_decay`), as a trained model's gates are in most halves (a 600-step kda_small on
    held-out text: 0.4-2.9 of its 32 keys per half on average, in 42-94% of halves)."""
    if gate == "key":
        return extras
    log_g = extras["log_g"]
    batch, length, heads, key_dim = log_g.shape
    steep = np.repeat(rng.uniform(size=(batch, -(-length // span), heads, key_dim)) < share, span, axis=1)
    return dict(extras, log_g=jnp.where(jnp.asarray(steep[:, :length]), jnp.minimum(log_g, -4.0), log_g))


@dataclasses.dataclass(frozen=True)
class Family:
    """A benchmarked op: op(q, k, v, **extras, impl=, chunk_size=) -> o; extras(rng, shape, gate)
    -> the op's other array arguments (all float32, all differentiated) for the value heads' shape
    [B,T,H,K]; gates: the --gate choices, the first the default; flops(C, K, V) -> (forward,
    backward) matmul FLOPs of the `xla` path per value head and token (see the module docstring);
    normalised_keys: whether k is L2-normalised (the delta rules); longest_chunk: the longest chunk
    its `xla` path walks (None: any)."""

    op_name: str
    op: Callable
    implementations: list
    gates: tuple[str, ...]
    extras: Callable
    flops: Callable
    normalised_keys: bool
    longest_chunk: int | None = None

    def xla_chunk(self, chunk_size: int) -> int:
        return chunk_size if self.longest_chunk is None else min(chunk_size, self.longest_chunk)


def _gla_flops(chunk, key_dim, value_dim):
    return (2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim,
            2 * chunk * (3 * key_dim + 2 * value_dim) + 8 * key_dim * value_dim)


def _delta_flops(chunk, key_dim, value_dim):
    return (2 * chunk * (3 * key_dim + 2 * value_dim) + 6 * key_dim * value_dim,
            2 * chunk * (8 * key_dim + 5 * value_dim) + 14 * key_dim * value_dim)


def _kda_flops(chunk, key_dim, value_dim):
    forward, backward = _delta_flops(chunk, key_dim, value_dim)
    return forward, backward + 2 * chunk * key_dim


def _dplr_flops(chunk, key_dim, value_dim):
    carry = 2 * key_dim**2 + 2 * key_dim**2 * value_dim / chunk
    return (2 * chunk * (5 * key_dim + 4 * value_dim) + 8 * key_dim * value_dim + carry,
            2 * chunk * (15 * key_dim + 10 * value_dim) + 18 * key_dim * value_dim + carry)


FAMILIES = {
    "gla": Family(
        op_name="chunk_gla", op=gla.chunk_gla, implementations=gla.IMPLEMENTATIONS, gates=("key", "head", "none"),
        extras=lambda rng, shape, gate: {"key": {"log_g": _log_uniform_decay(rng, shape)},
                                         "head": {"log_a": _log_uniform_decay(rng, shape[:3])},
                                         "none": {}}[gate],
        flops=_gla_flops, normalised_keys=False),
    "delta": Family(
        op_name="chunk_delta_rule", op=delta.chunk_delta_rule, implementations=delta.IMPLEMENTATIONS,
        gates=("head", "none"),
        extras=lambda rng, shape, gate: {"beta": _beta(rng, shape[:3]),
                                         **({"log_a": _log_uniform_decay(rng, shape[:3])} if gate == "head" else {})},
        flops=_delta_flops, normalised_keys=True, longest_chunk=delta_xla.LONGEST_CHUNK),
    "kda": Family(
        op_name="chunk_delta_rule (per-key log_g, KDA)", op=delta.chunk_delta_rule,
        implementations=delta.IMPLEMENTATIONS, gates=("key", "steep"),
        extras=lambda rng, shape, gate: _keyed(rng, gate, {"beta": _beta(rng, shape[:3]),
                                                           "log_g": _kda_log_g(rng, shape)}),
        flops=_kda_flops, normalised_keys=True, longest_chunk=delta_xla.LONGEST_CHUNK),
    "dplr": Family(
        op_name="chunk_dplr (RWKV-7 inputs)", op=dplr.chunk_dplr, implementations=dplr.IMPLEMENTATIONS,
        gates=("key", "steep"), extras=lambda rng, shape, gate: _keyed(rng, gate, _rwkv7_inputs(rng, shape)),
        flops=_dplr_flops,
        normalised_keys=False, longest_chunk=dplr_xla.LONGEST_CHUNK),
}
GATES = ["key", "head", "none", "steep"]


def chosen_gate(parser: argparse.ArgumentParser, family: str, gate: str | None) -> str:
    """The gate to time: `gate`, or the family's default (its first); a parser error for a gate the
    family does not have."""
    gates = FAMILIES[family].gates
    if gate is not None and gate not in gates:
        parser.error(f"--family {family} takes --gate {' or '.join(gates)}")
    return gate or gates[0]


def random_inputs(rng, family: Family, gate: str, shape, value_heads: int, dtype):
    """(q, k [B,T,Hk,K] and v [B,T,H,V] in dtype, the family's extras for `gate`): the arguments of
    every benchmarked forward, for q's shape (B, T, Hk, D) and H = value_heads (K = V = D). q, k, v
    are N(0, 1), k L2-normalised for the delta rules."""
    batch, length, _, dim = shape
    q, k = (rng.normal(size=shape) for _ in range(2))
    if family.normalised_keys:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, length, value_heads, dim))
    extras = family.extras(rng, (batch, length, value_heads, dim), gate)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), extras)


def forward_of(family: Family, impl: str, chunk_size: int):
    def forward(q, k, v, extras):
        return family.op(q, k, v, **extras, impl=impl, chunk_size=chunk_size)
    return forward


def softmax_forward(q, k, v, extras):
    """Causal softmax attention on v's heads (q and k repeated to them, as grouped heads read them)."""
    del extras
    groups = v.shape[2] // q.shape[2]
    q, k = (jnp.repeat(x, groups, axis=2) for x in (q, k))
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def random_cotangent_loss(forward):
    """loss(q, k, v, extras): the output's sum weighted by v, whose shape it has, so that the
    backward pass receives a random cotangent, as in training. The plain sum's cotangent is a
    constant of ones, which XLA folds into the backward pass and which flattered the `xla` paths:
    at T = 4k, K = V = 64, side by side, their fwd+bwd ratio to the reference fell from 11.6x to
    9.5x for GLA, 9.4x to 9.0x for the gated delta rule and 6.6x to 6.3x for KDA, and rose from
    3.4x to 3.7x for DPLR (benchmarks/RESULTS.md, 2026-12-05)."""
    return lambda q, k, v, extras: jnp.sum(forward(q, k, v, extras).astype(jnp.float32) * v.astype(jnp.float32))


def timed_pair(forward):
    """The jitted forward and forward+backward (gradients of every input) of `forward`."""
    return jax.jit(forward), jax.jit(jax.grad(random_cotangent_loss(forward), argnums=(0, 1, 2, 3)))


def decay_spans(extras, half: int) -> str:
    """How strong the inputs' decays are: the median per-step log decay and, for per-key gates, the
    share of (half-chunk, key) spans (`half` tokens) that decay by more than
    `chunked.FACTORED_SPAN_LIMIT` nats (`per_key_decay`: the `xla` paths add an elementwise pass for
    a block of chunks holding one such span); '' without decays."""
    log_decay = next((np.asarray(extras[name]) for name in ("log_g", "log_a") if name in extras), None)
    if log_decay is None:
        return ""
    summary = f"; per-step log decay median {np.median(log_decay):.3g}, min {log_decay.min():.3g}"
    if "log_g" not in extras:
        return summary
    usable = log_decay.shape[1] // half * half
    spans = log_decay[:, :usable].reshape((log_decay.shape[0], -1, half) + log_decay.shape[2:]).sum(axis=2)
    share = np.mean(spans < -chunked.FACTORED_SPAN_LIMIT)
    return f"{summary}; {half}-token spans of a key beyond {chunked.FACTORED_SPAN_LIMIT:g} nats: {share:.2%}"


def growth_per_doubling(seconds: float, previous_seconds: float, length: int, previous_length: int) -> float:
    return (seconds / previous_seconds) ** (1.0 / math.log2(length / previous_length))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="value heads H (and the state's)")
    parser.add_argument("--value-heads-per-key", type=int, default=1,
                        help="G: grouped value heads, q and k with H/G heads (Qwen3-Next: 2)")
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--family", default="gla", choices=list(FAMILIES))
    parser.add_argument("--gate", default=None, choices=GATES,
                        help="per-key log_g (GLA, KDA, DPLR; the gla default), per-head log_a (RetNet/SSD, "
                             "Gated DeltaNet; the delta default), no decay (linear attention, DeltaNet), or "
                             "KDA's and DPLR's per-key gates with 5%% of the keys steep in each 16-token span")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="consecutive calls per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes")
    parser.add_argument("--softmax-up-to", type=int, default=16384,
                        help="longest T to time softmax attention at (its float32 T x T scores take 17 GB per "
                             "array at T=32k, B=1, H=4); beyond, the 'vs softmax' columns are left empty")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    gate = chosen_gate(parser, args.family, args.gate)
    if args.heads % args.value_heads_per_key:
        parser.error("--heads must be a multiple of --value-heads-per-key")
    query_heads = args.heads // args.value_heads_per_key

    backend = jax.default_backend()
    chunked_impls = [i.name for i in family.implementations if backend in i.native_backends]
    xla_chunk = family.xla_chunk(args.chunk_size)
    forward_flops, backward_flops = family.flops(xla_chunk, args.dim, args.dim)
    tiles = jnp.asarray(np.random.default_rng(1).normal(size=(MATMUL_TILES, 64, 64)), jnp.float32)
    matmul = jax.jit(chunked.mm)
    rng = np.random.default_rng(0)
    previous, rates = {}, []
    for index, length in enumerate(args.lengths):
        inputs = random_inputs(rng, family, gate, (args.batch, length, query_heads, args.dim), args.heads,
                               jnp.dtype(args.dtype))
        if index == 0:
            print(f"# {family.op_name} on {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}: "
                  f"B={args.batch} H={args.heads} (q/k heads {query_heads}) K=V={args.dim} {args.dtype}, "
                  f"gate={gate}, chunk={xla_chunk}{decay_spans(inputs[3], xla_chunk // 2)}")
            print("| impl | T | fwd ms | fwd+bwd ms | fwd vs reference | fwd+bwd vs reference "
                  "| fwd vs softmax | fwd+bwd vs softmax |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
        pairs = {"softmax": timed_pair(softmax_forward)} if length <= args.softmax_up_to else {}
        pairs.update((impl, timed_pair(forward_of(family, impl, args.chunk_size)))
                     for impl in ["reference", *chunked_impls])
        functions = {(name, pass_): fn for name, pair in pairs.items() for pass_, fn in enumerate(pair)}
        functions["matmul"] = lambda *_: matmul(tiles, tiles)
        seconds = measure(functions, inputs, args.rounds, args.repeats)
        rows = {name: (seconds[name, 0], seconds[name, 1]) for name in pairs}
        ref_fwd, ref_bwd = rows["reference"]
        for name, (fwd, fwd_bwd) in rows.items():
            growth = ""
            if name in previous:
                per_doubling = growth_per_doubling(fwd_bwd, previous[name], length, args.lengths[index - 1])
                growth = f" (x{per_doubling:.2f} per 2x T)"
            versus_softmax = " | "
            if "softmax" in rows:
                soft_fwd, soft_bwd = rows["softmax"]
                versus_softmax = f"{soft_fwd / fwd:.2f}x | {soft_bwd / fwd_bwd:.2f}x"
            print(f"| {name} | {length} | {fwd * 1e3:.1f} | {fwd_bwd * 1e3:.1f}{growth} | {ref_fwd / fwd:.1f}x "
                  f"| {ref_bwd / fwd_bwd:.1f}x | {versus_softmax} |", flush=True)
            previous[name] = fwd_bwd
        matmul_rate = 2 * 64**3 * MATMUL_TILES / seconds["matmul"]
        flops = args.batch * length * args.heads * (forward_flops + backward_flops)
        rates += [(name, length, flops, rows[name][1], matmul_rate) for name in chunked_impls]
    print("Ratios are speed-ups: (time of reference or softmax) / (time of this row); > 1 means this row is faster.")

    print(f"\nfwd+bwd matmul FLOP rate against batched 64x64x64 float32 matmuls ({MATMUL_TILES} tiles, the same "
          f"rounds); {(forward_flops + backward_flops) / 1e3:.1f} kFLOP per value head and token "
          f"({forward_flops / 1e3:.1f}k forward, {backward_flops / 1e3:.1f}k backward)")
    print("| impl | T | fwd+bwd GFLOP | fwd+bwd GFLOP/s | matmul GFLOP/s | of the matmul rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, length, flops, fwd_bwd, matmul_rate in rates:
        print(f"| {name} | {length} | {flops / 1e9:.2f} | {flops / fwd_bwd / 1e9:.1f} | {matmul_rate / 1e9:.1f} "
              f"| {flops / fwd_bwd / matmul_rate:.0%} |")
    for name in chunked_impls:
        times = [(length, fwd_bwd) for impl, length, _, fwd_bwd, _ in rates if impl == name]
        growths = [(f"{a}-{b}", growth_per_doubling(tb, ta, b, a)) for (a, ta), (b, tb) in zip(times, times[1:])]
        if growths:
            print(f"{name} fwd+bwd time per doubling of T: "
                  + ", ".join(f"x{g:.2f} ({span})" for span, g in growths)
                  + f"; largest x{max(g for _, g in growths):.2f}")


if __name__ == "__main__":
    main()

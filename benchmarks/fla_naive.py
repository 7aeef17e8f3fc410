"""fla's pure-torch references on CPU, timed on inputs that `peers.py` writes: run by `peers.py
--fla-python PYTHON` in a Python that has torch and fla-core (see `peers.py`), not on its own.

    python fla_naive.py --family kda|dplr --inputs INPUTS.npz --outputs OUTPUTS.npz --rounds 2 --repeats 3

Reads q, k, v [B,T,H,K] and the family's extras (KDA: beta [B,T,H], log_g [B,T,H,K]; DPLR: a, b,
log_g [B,T,H,K]) in seqmix's conventions, calls fla 0.6's `naive.py` forms (loaded by file path:
the package's Triton parts need a GPU), writes each one's output o [B,T,H,V] to OUTPUTS.npz and
prints one JSON object, {name: [fwd seconds, fwd+bwd seconds]}: the best of `rounds` medians of
up to `repeats` consecutive calls, fwd+bwd the gradients of every input by torch's autograd.
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def naive_module(relative: str):
    """fla's `fla/<relative>` (a naive.py), loaded by path: importing the package would load Triton."""
    root = Path(importlib.util.find_spec("fla").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(relative.replace("/", "."), root / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forms(family: str):
    """{name: f(inputs) -> o [B,T,H,V]} of the family's naive forms, seqmix's arguments in fla's
    conventions: KDA's are seqmix's; fla's DPLR takes [B,H,T,D] and calls a and b alpha and beta."""
    if family == "kda":
        kda = naive_module("ops/kda/naive.py")
        return {name: lambda x, f=f: f(x["q"], x["k"], x["v"], x["log_g"], x["beta"])[0]
                for name, f in (("fla naive_chunk_kda", kda.naive_chunk_kda),
                                ("fla naive_recurrent_kda", kda.naive_recurrent_kda))}
    dplr = naive_module("ops/generalized_delta_rule/dplr/naive.py")
    head_major = lambda x: x.transpose(1, 2)
    return {name: lambda x, f=f: head_major(f(*(head_major(x[n]) for n in ("q", "k", "v", "a", "b", "log_g")))[0])
            for name, f in (("fla dplr_chunkwise", dplr.dplr_chunkwise),
                            ("fla dplr_recurrence", dplr.dplr_recurrence))}


def best_median(fn, rounds: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best = min(best, statistics.median(times))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=["kda", "dplr"])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    inputs = {name: torch.from_numpy(array) for name, array in np.load(args.inputs).items()}
    results, outputs = {}, {}
    for name, form in forms(args.family).items():
        with torch.no_grad():
            outputs[name] = form(inputs).numpy()
            forward = best_median(lambda: form(inputs), args.rounds, args.repeats)

        def forward_backward():
            leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
            (form(leaves) * inputs["v"]).sum().backward()  # a random cotangent (kernels.random_cotangent_loss)

        results[name] = [forward, best_median(forward_backward, args.rounds, args.repeats)]
    np.savez(args.outputs, **outputs)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

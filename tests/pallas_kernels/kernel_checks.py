"""Helpers shared by the kernel families' tests.

A family's tests call its op through a module-level jitted `run` and take gradients through
`outputs_and_gradients`: parametrized cases with the same implementation and shapes (the reference
beside each implementation, the same shapes under several gate or beta ranges) then share one
compilation instead of compiling the same program again op by op.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.pallas_kernels import chunked


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def packed_segments(rng, batch, length):
    """Rows of several segments with padding between and after them (ids restart per row)."""
    rows = []
    for _ in range(batch):
        ids, segment = [], 0
        while len(ids) < length:
            segment += 1
            ids += [segment] * int(rng.integers(3, 20)) + [0] * int(rng.integers(0, 3))
        rows.append(ids[:length])
    return jnp.asarray(rows, jnp.int32)


def assert_matches_reference(out, state, expected_out, expected_state, segment_ids):
    """Output and final state within 1e-4 relative error of the reference's; padding reads nothing."""
    assert relative_error(out, expected_out) < 1e-4
    assert relative_error(state, expected_state) < 1e-4
    assert np.all(np.asarray(out)[np.asarray(segment_ids) == 0] == 0.0)


def assert_gradients_match(names, actual, expected):
    """Each named gradient (pytrees flattened in order) within 1e-4 relative error of the reference's."""
    for name, a, e in zip(names, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert relative_error(a, e) < 1e-4, name


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames="options")
def outputs_and_gradients(run, impl, inputs, fixed, weights, options=()):
    """((out, state), gradients) of sum(out * weights[0]) + sum(state * weights[1]) with respect
    to each of `inputs`, where (out, state) = run(impl, *inputs, *fixed, **dict(options)).
    run: a family's module-level function (its identity and impl key the compilation); options: a
    tuple of (name, value) pairs of static keywords (chunk_size, ...)."""

    def loss(*inputs):
        out, state = run(impl, *inputs, *fixed, **dict(options))
        return jnp.sum(out * weights[0]) + jnp.sum(state * weights[1]), (out, state)

    gradients, outputs = jax.grad(loss, argnums=tuple(range(len(inputs))), has_aux=True)(*inputs)
    return outputs, gradients


# The xla paths' two forwards: on a CPU the delta rules and DPLR scan tokens while the state is
# small; "chunked" makes them take the chunked forward that accelerators and larger states run.
XLA_FORWARDS = ["token_scan", "chunked"]


def xla_forward(monkeypatch, forward):
    """Selects one of XLA_FORWARDS for the ops traced after it (`chunked.swept` reads it when an op
    is traced: run the op through a function traced afresh)."""
    if forward == "chunked":
        monkeypatch.setattr(chunked, "_CPU_TOKEN_SCAN_STATE_ELEMENTS", 0)


def pallas_grids(fn, *args) -> list[tuple[int, ...]]:
    """The grids of the pallas_calls that fn(*args) traces, in order, inside nested calls (jit,
    custom VJPs, control flow) too."""

    def walk(jaxpr):
        grids = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for value in eqn.params.values():
                for inner in value if isinstance(value, (tuple, list)) else [value]:
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        grids += walk(inner)
        return grids

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def some_keys_steep(seed, shape, span=16):
    """Per-key log decays [B,T,H,K] float32: mild ones in (-0.3, 0), and in each span of tokens a
    random set of keys decaying by 4 nats a token, a share that grows with the head (from about a
    tenth of the keys to half of them): halves of a chunk with few and with many steep keys beside
    mild ones, as trained gates have them. 16 tokens of -4 pass the 60 nats beyond which the per-key
    paths take a key's decays elementwise, while neighbours still see each other (e^-4)."""
    batch, length, heads, key_dim = shape
    rng = np.random.default_rng(seed)
    share = np.linspace(0.1, 0.5, heads)[:, None]
    steep = rng.uniform(size=(batch, -(-length // span), heads, key_dim)) < share
    steep = np.repeat(steep, span, axis=1)[:, :length]
    return jnp.asarray(np.where(steep, -4.0, rng.uniform(-0.3, 0.0, size=shape)), jnp.float32)

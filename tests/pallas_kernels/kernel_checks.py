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


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames="options")
def differentiated_outputs(run, impl, inputs, fixed, options=()):
    """run(impl, *inputs, *fixed, **dict(options)) as a differentiated call computes it, through
    `jax.vjp`: the xla paths' chunked forward, where an undifferentiated call on a CPU scans token by
    token (`chunked.swept`)."""
    return jax.vjp(lambda *inputs: run(impl, *inputs, *fixed, **dict(options)), *inputs)[0]


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

"""Logical axis names, and the one table that maps them to mesh axes.

Parameters carry logical axis names (`embed`, `vocab`, `mlp`, `heads`, `kv_heads`, `norm`,
`expert`) as metadata; activations name theirs where the model constrains them (`batch`,
`length`). `LOGICAL_AXIS_RULES` is the single place that says which mesh axes each logical axis
is split over (MaxText's pattern): FSDP splits the model dimension of every weight, tensor
parallelism heads, MLP width and vocabulary, expert parallelism the experts of mixture-of-experts
layers; the batch is split over data, fsdp and expert together, the length over sequence. Eager
sharding is off so that a model can be built without a mesh (tests, CPU runs, `nnx.eval_shape`);
the trainer places the state on the mesh afterwards (`seqmix.train.sharding`).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from seqmix.pallas_kernels.sequence_parallel import SEQUENCE_AXIS

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": (SEQUENCE_AXIS,),  # the linear mixers' scans then run sequence-parallel (LASP-2)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "norm": (),
    "conv_width": (),
}


def logical(initializer, *axis_names: str | None):
    """Wraps an initializer so the parameter it makes is annotated with logical axis names."""
    return nnx.with_partitioning(initializer, axis_names, eager_sharding=False)


def logical_to_spec(names, shape, mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names` (None: not
    split), on `mesh` (a Mesh or an AbstractMesh).

    A dimension stays replicated where its size is not divisible by the mesh axes it maps to
    (e.g. 2 kv heads on a tensor axis of 4), so any model runs on any mesh.
    """
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(axis for axis in LOGICAL_AXIS_RULES.get(name, ()) if mesh.shape[axis] > 1) if name else ()
        size = math.prod(mesh.shape[axis] for axis in axes)
        spec.append(None if not axes or dim % size else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def shard_count(name: str, size: int) -> int:
    """Into how many parts the ambient mesh splits a dimension of `size` named `name` (1 without
    a mesh, or where the size does not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec((name,), (size,), mesh)[0]
    return math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes or ()))


def constrained(x: jax.Array, *names: str | None) -> jax.Array:
    """x with its sharding pinned to the logical axes `names` (one per dimension) on the ambient
    mesh (the train step traces under one); x unchanged where there is none (decoding, tests).
    Without such pins GSPMD lays activations out after the FSDP weights they meet, not after the
    batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))

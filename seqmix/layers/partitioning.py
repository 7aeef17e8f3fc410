"""Mesh axis names, logical axis names, and the one table that maps the second to the first.

The mesh has the axes `MESH_AXES` (data, fsdp, expert, tensor, sequence), named here and nowhere
else above the kernels. Parameters carry logical axis names (`embed`, `vocab`, `mlp`, `heads`,
`kv_heads`, `norm`, `expert`, `conv_width`) as metadata; activations name theirs where the model
constrains them (`constrained`): the hidden states between blocks [batch, length, -],
attention's and the linear mixers' q/k/v and outputs [batch, length, heads or kv_heads, -], the
MLP's hidden [batch, length, mlp], the logits [batch, length, vocab]. `LOGICAL_AXIS_RULES` says
which mesh axes each logical axis is split over (MaxText's pattern): FSDP splits the model
dimension of every weight, tensor parallelism heads, MLP width and vocabulary, expert parallelism
the experts of mixture-of-experts layers; the batch is split over data, fsdp and expert together,
the length over sequence. A run may change entries (`mesh.rules` in its config): `using_rules`
puts such a table in effect for what is traced and placed inside it, without touching the default.

Eager sharding is off so that a model can be built without a mesh (tests, CPU runs,
`nnx.eval_shape`); the trainer places the state on the mesh afterwards (`seqmix.train.sharding`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType

import jax
from flax import nnx
from jax.sharding import PartitionSpec

# The mesh axis that splits sequences. The kernels' sequence-parallel ops look for the same name
# under their own constant (`pallas_kernels.sequence_parallel.SEQUENCE_AXIS`: kernels import
# nothing of the layers); a test holds the two equal.
SEQUENCE_AXIS = "sequence"
MESH_AXES = ("data", "fsdp", "expert", "tensor", SEQUENCE_AXIS)

LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...]] = MappingProxyType({
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
})

_RULES: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar(
    "seqmix_logical_axis_rules", default=LOGICAL_AXIS_RULES)


def rule_problem(name: str, mesh_axes: Sequence[str]) -> str | None:
    """What is wrong with the rule `name -> mesh_axes` (an unknown logical or mesh axis, a mesh
    axis named twice), or None when it is a valid rule."""
    if name not in LOGICAL_AXIS_RULES:
        return f"unknown logical axis (known: {', '.join(LOGICAL_AXIS_RULES)})"
    unknown = [axis for axis in mesh_axes if axis not in MESH_AXES]
    if unknown:
        return f"unknown mesh axis {unknown[0]!r} (mesh axes: {', '.join(MESH_AXES)})"
    if len(set(mesh_axes)) != len(mesh_axes):
        return f"names a mesh axis twice: {list(mesh_axes)}"
    return None


def axis_rules() -> Mapping[str, tuple[str, ...]]:
    """The logical -> mesh axes table in effect (`LOGICAL_AXIS_RULES` outside `using_rules`)."""
    return _RULES.get()


@contextlib.contextmanager
def using_rules(overrides: Mapping[str, Sequence[str]] | None) -> Iterator[None]:
    """The default table with the entries of `overrides` ({logical name: mesh axes}, e.g. a
    config's `mesh.rules`) replaced, in effect inside the block: for the parameters placed and
    the steps traced there (a jitted step reads the table when it is traced, so trace it inside).
    Raises ValueError for an invalid rule (`rule_problem`)."""
    for name, mesh_axes in (overrides or {}).items():
        problem = rule_problem(name, mesh_axes)
        if problem is not None:
            raise ValueError(f"logical axis rule {name}: {problem}")
    token = _RULES.set(MappingProxyType({**LOGICAL_AXIS_RULES, **{name: tuple(axes) for name, axes in
                                                                  (overrides or {}).items()}}))
    try:
        yield
    finally:
        _RULES.reset(token)


def logical(initializer, *axis_names: str | None):
    """Wraps an initializer so the parameter it makes is annotated with logical axis names."""
    return nnx.with_partitioning(initializer, axis_names, eager_sharding=False)


def logical_to_spec(names, shape, mesh) -> PartitionSpec:
    """PartitionSpec, by the rules in effect, for an array of `shape` (None: of any shape) whose
    dimensions carry logical `names` (None: not split), on `mesh` (a Mesh or an AbstractMesh).

    A dimension stays replicated where its size is not divisible by the mesh axes it maps to
    (e.g. 2 kv heads on a tensor axis of 4), so any model runs on any mesh; a mesh axis that an
    earlier dimension already splits over is skipped (a PartitionSpec uses each axis once).
    """
    rules, used, spec = axis_rules(), set(), []
    for index, name in enumerate(names):
        mapped = rules.get(name, ()) if name else ()
        axes = tuple(axis for axis in mapped if mesh.shape.get(axis, 1) > 1 and axis not in used)
        size = math.prod(mesh.shape[axis] for axis in axes)
        if not axes or (shape is not None and shape[index] % size):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
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
    mesh (the train step traces under one), by the rules in effect; x unchanged where there is
    none (decoding, tests). Without such pins GSPMD infers each activation's layout from the
    weights it meets (e.g. FSDP-split weights pull the hidden states onto the fsdp axis), and a
    tensor- or sequence-parallel layout is a guess, not a choice."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrained: {len(names)} axis names {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))

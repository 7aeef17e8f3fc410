"""Logical axis names on parameters.

Parameters carry logical axis names (`embed`, `vocab`, `mlp`, `heads`, `kv_heads`, `norm`) as
metadata; `seqmix.train.sharding` maps them to mesh axes through one table of rules. Eager
sharding is off so that a model can be built without a mesh (tests, CPU runs, `nnx.eval_shape`);
the trainer places the state on the mesh afterwards.
"""

from __future__ import annotations

from flax import nnx


def logical(initializer, *axis_names: str | None):
    """Wraps an initializer so the parameter it makes is annotated with logical axis names."""
    return nnx.with_partitioning(initializer, axis_names, eager_sharding=False)

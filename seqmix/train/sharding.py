"""The device mesh, and the placement of parameters, optimizer state and batches on it by the
logical-axis rules of `seqmix.layers.partitioning` (which names the mesh axes, and whose
`using_rules` puts a run's `mesh.rules` in effect)."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from seqmix.configuration import ConfigError
from seqmix.layers.partitioning import MESH_AXES, logical_to_spec


def make_mesh(config, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor, sequence) sized by a MeshConfig (-1 fills)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: getattr(config, axis) for axis in MESH_AXES}
    known = math.prod(size for size in sizes.values() if size != -1)
    fill = [axis for axis, size in sizes.items() if size == -1]
    if fill:
        if len(devices) % known:
            raise ConfigError(f"mesh.{fill[0]}: the other axes ({known} devices) do not divide {len(devices)} devices")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(
            f"mesh: axis sizes {sizes} use {math.prod(sizes.values())} devices but {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape(tuple(sizes[axis] for axis in MESH_AXES))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    names = variable.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh) if names else PartitionSpec())


def state_shardings(state: nnx.State, mesh: Mesh):
    """NamedShardings (same tree as `state`, Variables replaced) from each Variable's logical axes."""
    return jax.tree.map(
        lambda v: v.replace(_variable_sharding(v, mesh)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a [*leading, B, T] batch array by the rules in effect for `batch` and
    `length` (by default B over (data, fsdp, expert), T over sequence)."""
    rows_and_length = logical_to_spec(("batch", "length"), None, mesh)
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), *rows_and_length))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


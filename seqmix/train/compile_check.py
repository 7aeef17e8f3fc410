"""Ahead-of-time compilation of a run's train step on a mesh, with nothing allocated or run:
whether the step partitions and compiles for that mesh, and what each device would hold."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from seqmix.train.config import TrainConfig
from seqmix.train.sharding import batch_sharding
from seqmix.train.state import abstract_train_state
from seqmix.train.step import make_train_step

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")  # what the input pipeline yields


@dataclasses.dataclass
class CompiledStep:
    """Bytes per device of the compiled train step (XLA's buffer assignment)."""

    arguments: int  # parameters, optimizer state and the batch shard
    outputs: int  # the new state (donated: it reuses the arguments' buffers) and metrics
    temporaries: int  # activations, gradients and everything else the step allocates
    aliased: int  # output bytes that reuse argument buffers
    compiled: jax.stages.Compiled

    @property
    def peak(self) -> int:
        """What the device must hold while the step runs."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_train_step(config: TrainConfig, mesh: Mesh) -> CompiledStep:
    """Lowers and compiles `config`'s train step for `mesh` from abstract state and batch shapes."""
    train_state = abstract_train_state(config, mesh)
    step = make_train_step(train_state, mesh, config.compute_dtype, config.loss_chunk_tokens)
    shape = (config.grad_accum, config.data.batch_size, config.data.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, leading_dims=1))
             for key in BATCH_KEYS}
    compiled = step.lower(train_state.state, batch).compile()
    memory = compiled.memory_analysis()
    return CompiledStep(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes,
                        memory.alias_size_in_bytes, compiled)

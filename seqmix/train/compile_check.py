"""Ahead-of-time compilation of a run's train step on a mesh, with nothing allocated or run:
whether the step partitions and compiles for that mesh, what each device would hold, and what
its collectives move."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from seqmix.layers.moe import MixtureOfExperts
from seqmix.layers.partitioning import using_rules
from seqmix.train.config import TrainConfig
from seqmix.train.data.pipeline import BATCH_KEYS
from seqmix.train.sharding import batch_sharding
from seqmix.train.state import abstract_train_state
from seqmix.train.step import make_train_step


@dataclasses.dataclass
class CompiledStep:
    """Bytes per device of the compiled train step (XLA's buffer assignment)."""

    arguments: int  # parameters, optimizer state and the batch shard
    outputs: int  # the new state (donated: it reuses the arguments' buffers) and metrics
    temporaries: int  # activations, gradients and everything else the step allocates
    aliased: int  # output bytes that reuse argument buffers
    compiled: jax.stages.Compiled
    parameters: int = 0  # the model's parameters, all devices together
    active_parameters: int = 0  # those one token runs through (a mixture of experts': top_k of its experts)
    lowered: jax.stages.Lowered | None = None  # before partitioning: the sharding annotations it asks for

    @property
    def peak(self) -> int:
        """What the device must hold while the step runs."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_train_step(config: TrainConfig, mesh: Mesh) -> CompiledStep:
    """Lowers and compiles `config`'s train step for `mesh` from abstract state and batch shapes,
    under the run's logical axis rules (`mesh.rules`)."""
    with using_rules(config.mesh.rules):
        train_state = abstract_train_state(config, mesh)
        step = make_train_step(train_state, mesh, config.compute_dtype, config.loss_chunk_tokens,
                               mlm=config.mlm if config.objective == "mlm" else None, seed=config.seed)
        shape = (config.grad_accum, config.data.batch_size, config.data.seq_len)
        batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, leading_dims=1))
                 for key in BATCH_KEYS}
        lowered = step.lower(train_state.state, batch, None)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    model, _optimizer = nnx.merge(train_state.graphdef, train_state.state)
    parameters, active = parameter_counts(model)
    return CompiledStep(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes,
                        memory.alias_size_in_bytes, compiled, parameters, active, lowered)


def parameter_counts(model: nnx.Module) -> tuple[int, int]:
    """(all of `model`'s parameters, those one token runs through): a mixture of experts' token
    uses top_k of its num_experts routed experts (its router and shared experts all). The model may
    be abstract (`nnx.eval_shape`)."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    idle = 0
    for _path, module in nnx.iter_graph(model):
        if isinstance(module, MixtureOfExperts):
            experts = module.up_proj.shape[0]
            routed = sum(math.prod(w.shape) for w in (module.gate_proj, module.up_proj, module.down_proj)
                         if w is not None)  # ungated experts (Nemotron-H) have no gate_proj
            idle += routed * (experts - module.top_k) // experts
    return total, total - idle


_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective (all-gather, all-reduce, ...) in compiled
    HLO text (`compiled.as_text()`): per device, what the collectives hand it, the measure of
    the step's communication. Collectives inside loops count once per appearance in the text."""
    totals: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        shapes = _ARRAY.findall(match.group(1))
        if match.group(3):  # an async start returns (operands..., results...): keep the results
            shapes = shapes[len(shapes) // 2:]
        size = sum(_element_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in shapes)
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return totals


def _element_bytes(dtype: str) -> int:
    return 1 if dtype == "pred" else 2 if dtype == "bf16" else int(dtype[1:]) // 8

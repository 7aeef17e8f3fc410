"""The train state (model + optimizer) of a run, built directly onto a device mesh."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh

from seqmix.models.lm import LanguageModel
from seqmix.train.config import TrainConfig
from seqmix.train.optim import make_optimizer
from seqmix.train.sharding import state_shardings


@dataclasses.dataclass
class TrainState:
    """`nnx.merge(graphdef, state)` gives (model, optimizer); `shardings` mirrors `state`."""

    graphdef: nnx.GraphDef
    state: nnx.State
    shardings: nnx.State

    def abstract(self):
        """The state as ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.shardings
        )

    def model(self) -> LanguageModel:
        model, _optimizer = nnx.merge(self.graphdef, self.state)
        return model


def _model_and_optimizer(config: TrainConfig):
    model = LanguageModel(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, make_optimizer(config.optim, config.steps), wrt=nnx.Param)


def create_train_state(config: TrainConfig, mesh: Mesh) -> TrainState:
    """Initialises model and optimizer state sharded by the logical axis rules.

    The initialiser is jitted with the target shardings as outputs, so no device ever holds
    the full unsharded state (what makes FSDP of a large model possible).
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _model_and_optimizer(config)))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.split(_model_and_optimizer(config))[1], out_shardings=shardings)()
    return TrainState(graphdef, state, shardings)

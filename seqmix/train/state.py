"""The train state (model + optimizer) of a run, built directly onto a device mesh."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh

from seqmix.mixers.state_tuning import InitialState
from seqmix.models.hf import CHECKPOINT_PARAMS, read_weights
from seqmix.models.lm import LanguageModel
from seqmix.models.lora import add_lora, principal_adapters
from seqmix.train.config import TrainConfig
from seqmix.train.optim import make_optimizer
from seqmix.train.sharding import state_shardings


@dataclasses.dataclass
class TrainState:
    """`nnx.merge(graphdef, state)` gives (model, optimizer); `shardings` mirrors `state`;
    `trainable`: the variable type the optimizer updates (nnx.Param, nnx.LoRAParam with LoRA, or
    InitialState with state tuning)."""

    graphdef: nnx.GraphDef
    state: nnx.State
    shardings: nnx.State
    trainable: type = nnx.Param

    def abstract(self):
        """The state as ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.shardings
        )

    def model(self) -> LanguageModel:
        model, _optimizer = nnx.merge(self.graphdef, self.state)
        return model


def trainable_type(config: TrainConfig) -> type:
    if config.tune == "state":
        return InitialState
    return nnx.LoRAParam if config.lora is not None else nnx.Param


def _model_and_optimizer(config: TrainConfig):
    rngs = nnx.Rngs(config.seed)
    model = LanguageModel(config.model, rngs=rngs)
    if config.lora is not None:
        add_lora(model, targets=config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha, rngs=rngs)
    return model, nnx.Optimizer(model, make_optimizer(config.optim, config.steps), wrt=trainable_type(config))


def abstract_train_state(config: TrainConfig, mesh: Mesh) -> TrainState:
    """The train state of `config` on `mesh` with no array allocated: its state holds
    `jax.ShapeDtypeStruct`s carrying their shardings (what compiling the step ahead of time needs)."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _model_and_optimizer(config)))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    return TrainState(graphdef, state, shardings, trainable_type(config))


def create_train_state(config: TrainConfig, mesh: Mesh) -> TrainState:
    """Initialises model and optimizer state sharded by the logical axis rules, then (with
    `init_from`) replaces the model's weights by a Hugging Face checkpoint's, each placed
    straight onto its sharding.

    The initialiser is jitted with the target shardings as outputs, so no device ever holds
    the full unsharded state (what makes FSDP of a large model possible).
    """
    train_state = abstract_train_state(config, mesh)
    train_state.state = jax.jit(lambda: nnx.split(_model_and_optimizer(config))[1],
                                out_shardings=train_state.shardings)()
    if config.init_from is not None:
        model, optimizer = nnx.merge(train_state.graphdef, train_state.state)
        # LoRA adapters and a conversion's new parameters keep their initialisation.
        base = nnx.state(model, CHECKPOINT_PARAMS)
        weights = read_weights(config.init_from, base, config.model)
        nnx.update(model, jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), weights, base))
        train_state.state = nnx.state((model, optimizer))
    if config.lora is not None and config.lora.init == "pissa":  # from the weights the run starts from
        model, optimizer = nnx.merge(train_state.graphdef, train_state.state)
        principal_adapters(model)
        train_state.state = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                                         nnx.state((model, optimizer)), train_state.state)
    return train_state

"""The train state (model + optimizer) of a run, built directly onto a device mesh."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh

from seqmix.layers.transfer import TransferParam
from seqmix.mixers.state_tuning import InitialState
from seqmix.models.hf import CHECKPOINT_PARAMS, pretrained_config
from seqmix.models.linearize import read_initial_weights
from seqmix.models.lm import LanguageModel
from seqmix.models.lora import add_lora, principal_adapters
from seqmix.train.config import TrainConfig
from seqmix.train.distillation import replaced_layers
from seqmix.train.optim import make_optimizer
from seqmix.train.sharding import state_shardings


@dataclasses.dataclass
class TrainState:
    """`nnx.merge(graphdef, state)` gives (model, optimizer); `shardings` mirrors `state`;
    `trainable`: the nnx filter of the variables the optimizer updates (`trainable_filter`)."""

    graphdef: nnx.GraphDef
    state: nnx.State
    shardings: nnx.State
    trainable: nnx.filterlib.Filter = nnx.Param

    def abstract(self):
        """The state as ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.shardings
        )

    def model(self) -> LanguageModel:
        model, _optimizer = nnx.merge(self.graphdef, self.state)
        return model


def trainable_filter(config: TrainConfig) -> nnx.filterlib.Filter:
    """What the optimizer updates: the learned initial states (tune: state), the LoRA adapters
    (lora), the parameters a conversion added (distill.train: new), every parameter of the layers
    the conversion replaced (distill.train: converted), else every parameter."""
    if config.tune == "state":
        return InitialState
    if config.lora is not None:
        return nnx.LoRAParam
    train = "all" if config.distill is None else config.distill.train
    if train == "new":
        return TransferParam
    if train == "converted":
        replaced = set(replaced_layers(config.model, pretrained_config(config.distill.teacher or config.init_from)))
        in_replaced_mixer = lambda path, _value: (len(path) > 2 and path[0] == "layers" and path[1] in replaced
                                                  and path[2] == "self_attn")
        return nnx.All(nnx.Param, in_replaced_mixer)
    return nnx.Param


def run_model(config: TrainConfig) -> LanguageModel:
    """The model a run trains: `config.model` with the run's LoRA adapters, initialised from config.seed,
    its blocks rematerialised under `config.remat`."""
    rngs = nnx.Rngs(config.seed)
    model = LanguageModel(config.model, rngs=rngs, remat=config.remat)
    if config.lora is not None:
        add_lora(model, targets=config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha, rngs=rngs)
    return model


def _model_and_optimizer(config: TrainConfig):
    model = run_model(config)
    return model, nnx.Optimizer(model, make_optimizer(config.optim, config.steps), wrt=trainable_filter(config))


def abstract_on_mesh(build, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, state, shardings) of the graph `build()` returns, with no array allocated: the
    state holds `jax.ShapeDtypeStruct`s carrying the shardings that the logical axis rules give on `mesh`."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    return graphdef, state, shardings


def abstract_train_state(config: TrainConfig, mesh: Mesh) -> TrainState:
    """The train state of `config` on `mesh` with no array allocated: its state holds
    `jax.ShapeDtypeStruct`s carrying their shardings (what compiling the step ahead of time needs)."""
    return TrainState(*abstract_on_mesh(lambda: _model_and_optimizer(config), mesh), trainable_filter(config))


def create_train_state(config: TrainConfig, mesh: Mesh, weights: nnx.State | None = None) -> TrainState:
    """Initialises model and optimizer state sharded by the logical axis rules, the model starting
    from `weights` (a staged run's previous stage, see `_stage_weights`) or else, with `init_from`,
    from a Hugging Face checkpoint's weights, each placed straight onto its sharding.

    The initialiser is jitted with the target shardings as outputs, so no device ever holds
    the full unsharded state (what makes FSDP of a large model possible). The starting weights
    enter it as (donated) arguments, which makes the random initialisers of the weights they
    replace dead code that the compiler drops (Kimi Linear's fixture: 6.2 s of compiling -> 0.5 s).
    """
    train_state = abstract_train_state(config, mesh)
    abstract_model = train_state.model()
    if weights is not None:
        start = _stage_weights(abstract_model, weights)
    elif config.init_from is not None:
        # LoRA adapters and a conversion's new parameters keep their initialisation.
        base = nnx.state(abstract_model, CHECKPOINT_PARAMS)
        loaded = read_initial_weights(config.init_from, base, config.model)  # a student: converted from the teacher
        start = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), loaded, base)
    else:
        start = None

    def initialise(start):
        model, optimizer = _model_and_optimizer(config)
        if start is not None:
            nnx.update(model, start)
        return nnx.split((model, optimizer))[1]

    train_state.state = jax.jit(initialise, out_shardings=train_state.shardings, donate_argnums=0)(start)
    if config.lora is not None and config.lora.init == "pissa":  # from the weights the run starts from
        model, optimizer = nnx.merge(train_state.graphdef, train_state.state)
        principal_adapters(model)
        train_state.state = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                                         nnx.state((model, optimizer)), train_state.state)
    return train_state


def _stage_weights(abstract_model: LanguageModel, weights: nnx.State) -> nnx.State:
    """The parameters `weights` (the `nnx.Param` state of a model of the same config without LoRA
    adapters: the stage before's, merged) at their places in `abstract_model` (whose leaves are
    ShapeDtypeStructs carrying their shardings), each array on its sharding: a LoRA-wrapped
    projection's base takes the projection's weights; its adapters are not among them."""
    given = {path: variable for path, variable in nnx.to_flat_state(weights)}
    placed = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract_model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        source = given[tuple(part for part in path if part != "base")]
        placed.append((path, variable.replace(value=jax.device_put(source.get_value(), variable.get_value().sharding))))
    return nnx.from_flat_state(placed)

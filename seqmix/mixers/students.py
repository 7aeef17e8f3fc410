"""Students: any registered recurrent mixer standing in for a softmax attention layer, initialised
from that layer's q/k/v/o projections (`seqmix linearize --student <mixer>`).

A student layer is the mixer `student` with options {mixer: <registered name>, qkv_bias: <the
teacher's>}: it builds the named mixer with the options of its recipe (heads and head dims those of
the teacher, so that the projections' shapes match), and then
- gives a bias to the projections the recipe lists (`biased`: output gates and betas, which need one
  to start at a neutral constant; q/k/v when the teacher has biases, Qwen2);
- turns every parameter that does not come from the teacher into a `TransferParam`, set to the
  recipe's neutral value (`neutral`) or left at the mixer's own initialisation.

So "which parameters of this student are new?" is `nnx.state(model, TransferParam)` for a whole
model (or `nnx.state(layer.self_attn, TransferParam)` for one layer): attention transfer trains
them, `CHECKPOINT_PARAMS` leaves them out (no checkpoint of the teacher holds them), and LoRA-only
training keeps them frozen, exactly as LoLCATs' feature maps. The teacher's parameters are ordinary
`nnx.Param`s under `self_attn.mixer.` and come from `from_teacher`, the one mapping that both the
in-memory `seqmix.models.linearize.linearize` and the trainer (`init_from` = the teacher's
checkpoint) use.

With the neutral values every student starts as (decayed) linear attention over the teacher's own
q, k, v, in the student's feature maps, then the student's output norm, then the teacher's o_proj:

    o_t = scale * sum_{s<=t} (prod_{s<r<=t} g_r) (phi_q(q_t) . phi_k(k_s)) c_s phi_v(v_s),   y = norm(o) W_o

with decays g = exp(-INITIAL_DECAY_RATE) (RetNet: its fixed per-head decays; HGRN2: sigmoid(k), as
Liger-HGRN2) and c = 1, except in the delta-rule mixers (c = beta = INITIAL_BETA), where the
removal term beta k k^T keeps the start only close to it (exact as beta -> 0). Output gates start
at exactly 1 and norms at their identity weight. `RECIPES` says, per student, which parameter comes
from which teacher tensor, and what is new.

Grouped key/value heads are repeated to the query heads in the order of transformers' `repeat_kv`
(query head h reads key/value head h // (H / H_kv)), since every student here has as many key
heads as query heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from seqmix.configuration import ConfigError, build, require
from seqmix.layers.transfer import TransferParam
from seqmix.mixers.registry import get_mixer, register_mixer
from seqmix.mixers.rwkv7 import MAX_DECAY_RATE

INITIAL_DECAY_RATE = 2.0 ** -10  # log decay per token at the start: a token's weight is 1/e after 1024 tokens
INITIAL_BETA = 2.0 ** -5  # the delta rule's write strength (and RWKV-7's learning rate) at the start
SILU_ONE = 1.278464542761074  # silu(SILU_ONE) = 1: a silu output gate of zero kernel and this bias is 1
SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1: Mamba-style time steps of 1

Neutral = Callable[[tuple[int, ...]], jnp.ndarray]  # a new parameter's shape -> its starting value


def constant(value: float) -> Neutral:
    """Every entry `value`."""
    return lambda shape: jnp.full(shape, value, jnp.float32)


def logit(p: float) -> float:
    """The bias b with sigmoid(b) = p."""
    return math.log(p / (1.0 - p))


zeros, ones = constant(0.0), constant(1.0)


def identity_taps(shape: tuple[int, ...]) -> jnp.ndarray:
    """A ShortConvolution weight [width, C] that passes the current token through (tap 0 is the
    current token in seqmix's layout; torch's "last tap")."""
    return jnp.zeros(shape, jnp.float32).at[0].set(1.0)


def unit_row_sums(scale: float) -> Neutral:
    """A kernel [rank, C] whose rows sum to `scale` / rank each, so that a constant input of 1/scale
    on every rank channel gives 1 on every output (RWKV-7's output gate: sigmoid(0) = 0.5, times 2)."""
    return lambda shape: jnp.full(shape, scale / shape[0], jnp.float32)


@dataclasses.dataclass(frozen=True)
class From:
    """A student projection that is the teacher's projection `name` (kernel [D, out], and bias
    [out] when the teacher has one); `repeat`: a key/value projection whose heads are repeated to
    the query heads."""

    name: str
    repeat: bool = False


@dataclasses.dataclass(frozen=True)
class New:
    """A block of a fused projection with no counterpart in the teacher: zero kernel, `bias`,
    `per_head` outputs per query head (`None`: head_dim of them)."""

    bias: float
    per_head: int | None = None


@dataclasses.dataclass(frozen=True)
class Fused:
    """A student projection whose outputs are `parts` side by side (Mamba2's in_proj: z, x, B, C, dt)."""

    parts: tuple[From | New, ...]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a registered mixer becomes the student of an attention layer.

    options: the mixer's options, given the teacher's (H heads, head_dim) - what makes the
    student's projections the teacher's shapes; projections: student projection (a path in the
    mixer) -> where its kernel and bias come from; biased: projections the mixer builds without a
    bias that the student gives one (a new parameter) with this value; neutral: new parameters
    (paths in the mixer) -> their starting value (the other new parameters keep the mixer's
    initialisation); inexact: why the start is not exactly linear attention (None: it is)."""

    options: Callable[[int, int], dict]
    projections: Mapping[str, From | Fused]
    biased: Mapping[str, float] = dataclasses.field(default_factory=dict)
    neutral: Mapping[str, Neutral] = dataclasses.field(default_factory=dict)
    inexact: str | None = None

    def qkv_projections(self) -> list[str]:
        """The student's projections that hold the teacher's q, k or v (what LoRA adapts, as Liger's)."""
        return [name for name, source in self.projections.items() if source != From("o_proj")]


Q, K, V, O = From("q_proj"), From("k_proj", repeat=True), From("v_proj", repeat=True), From("o_proj")
DELTA_RULE = ("the delta rule removes beta (k . S) from the state at each write: with beta = INITIAL_BETA the "
              "start is close to linear attention (exact as beta -> 0)")
# Mamba-style decays log a = -exp(A_log) softplus(0 + dt_bias) = -INITIAL_DECAY_RATE.
MAMBA_DECAY = {"A_log": constant(math.log(INITIAL_DECAY_RATE)), "dt_bias": constant(SOFTPLUS_ONE)}

RECIPES: dict[str, Recipe] = {
    # log g = logsigmoid(gate_up(gate_down(x)))/16: a zero gate_up kernel and a bias b with
    # logsigmoid(b) = -16 * rate. gate_down keeps its random init (so gate_up gets a gradient).
    "gla": Recipe(
        options=lambda heads, head_dim: {"expand_k": 1.0, "expand_v": 1.0},
        projections={"q_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"g_proj": SILU_ONE},
        neutral={"gate_up.kernel": zeros, "gate_up.bias": constant(-math.log(math.expm1(16.0 * INITIAL_DECAY_RATE))),
                 "g_proj.kernel": zeros}),
    "deltanet": Recipe(
        options=lambda heads, head_dim: {"expand_v": 1.0},
        projections={"q_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"b_proj": logit(INITIAL_BETA)},
        neutral={"b_proj.kernel": zeros, "q_conv.weight": identity_taps, "k_conv.weight": identity_taps,
                 "v_conv.weight": identity_taps},
        inexact=DELTA_RULE),
    "gated_deltanet": Recipe(
        options=lambda heads, head_dim: {"expand_v": 1.0},
        projections={"q_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"b_proj": logit(INITIAL_BETA), "g_proj": SILU_ONE},
        neutral={"b_proj.kernel": zeros, "g_proj.kernel": zeros, "a_proj.kernel": zeros, **MAMBA_DECAY,
                 "q_conv.weight": identity_taps, "k_conv.weight": identity_taps, "v_conv.weight": identity_taps},
        inexact=DELTA_RULE),
    # Liger-HGRN2: the forget gate is the key projection, f = sigmoid(k), key 1 - f; HGRN2 ties its
    # key to its gate, so the decays are sigmoid(k) (data-dependent), not near 1.
    "hgrn2": Recipe(
        options=lambda heads, head_dim: {"expand_k": 1.0},
        projections={"q_proj": Q, "f_proj": K, "i_proj": V, "o_proj": O}),
    # RetNet's decays are fixed per head (1 - 2^(-5-h)); RoPE on q and k as the teacher's.
    "retnet": Recipe(
        options=lambda heads, head_dim: {"expand_v": 1.0},
        projections={"q_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"g_proj": SILU_ONE},
        neutral={"g_proj.kernel": zeros}),
    # One group of B/C per head (C is the teacher's q, which has H heads); the z gate and dt are new
    # columns of the fused in_proj (a teacher parameter: they train with it, not as TransferParams).
    "mamba2": Recipe(
        options=lambda heads, head_dim: {"num_heads": heads, "head_dim": head_dim, "state_dim": head_dim,
                                         "n_groups": heads, "in_proj_bias": True},
        projections={"in_proj": Fused((New(SILU_ONE), V, K, Q, New(0.0, per_head=1))), "out_proj": O},
        neutral={"conv.weight": identity_taps, **MAMBA_DECAY, "D": zeros}),
    # No token shift (mu = 0), a constant decay, and the bonus u = 1 makes RWKV-6's exclusive
    # state plus bonus the inclusive sum of linear attention.
    "rwkv6": Recipe(
        options=lambda heads, head_dim: {},
        projections={"r_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"g_proj": SILU_ONE},
        neutral={"mu_x": zeros, "mu": zeros, "mix_up": zeros, "decay_up.kernel": zeros,
                 "decay_base": constant(math.log(INITIAL_DECAY_RATE)), "bonus": ones, "g_proj.kernel": zeros}),
    # KDA's output gate sigmoid(g_b(g_a(x))) is 1/2 with a zero g_b kernel: o_norm's weight 2 undoes it.
    "kda": Recipe(
        options=lambda heads, head_dim: {},
        projections={"q_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        biased={"b_proj": logit(INITIAL_BETA)},
        neutral={"b_proj.kernel": zeros, "f_b_proj.kernel": zeros, **MAMBA_DECAY, "g_b_proj.kernel": zeros,
                 "o_norm.weight": constant(2.0), "q_conv1d.weight": identity_taps,
                 "k_conv1d.weight": identity_taps, "v_conv1d.weight": identity_taps},
        inexact=DELTA_RULE),
    # No token shift, k_a = 0 (the written key is k), no bonus (the state is inclusive), the output
    # gate exactly 1; the learning rate a = INITIAL_BETA keeps the removal term small.
    "rwkv7": Recipe(
        options=lambda heads, head_dim: {},
        projections={"r_proj": Q, "k_proj": K, "v_proj": V, "o_proj": O},
        neutral={**{f"x_{branch}": zeros for branch in "rwkvag"},
                 "w_lora.up.kernel": zeros, "w_lora.up.bias": constant(logit(INITIAL_DECAY_RATE / MAX_DECAY_RATE)),
                 "a_lora.up.kernel": zeros, "a_lora.up.bias": constant(logit(INITIAL_BETA)),
                 "g_lora.down.kernel": zeros, "g_lora.up.kernel": unit_row_sums(2.0),
                 "k_k": ones, "k_a": zeros, "r_k": zeros, "g_norm.weight": ones, "g_norm.bias": zeros},
        inexact="RWKV-7 removes a (kappa . S) along the normalised key at each step: with the learning rate a = "
                "INITIAL_BETA the start is close to linear attention (exact as a -> 0)"),
}


@dataclasses.dataclass
class StudentConfig:
    mixer: str  # the registered mixer (a key of RECIPES)
    qkv_bias: bool = False  # the teacher's q/k/v projections have biases (Qwen2): so do the student's

    def validate(self, path: str) -> None:
        require(self.mixer in RECIPES, path, "mixer",
                f"{self.mixer!r} has no student recipe (known: {', '.join(RECIPES)})")


def _parameters(module: nnx.Module) -> dict[str, tuple[nnx.Module, str, nnx.Param]]:
    """{dotted path in `module`: (owning module, attribute, parameter)} of every nnx.Param."""
    return {".".join(map(str, (*path, attribute))): (owner, attribute, value)
            for path, owner in nnx.iter_modules(module) for attribute, value in vars(owner).items()
            if isinstance(value, nnx.Param)}


def _add_bias(linear: nnx.Linear, param_type: type, value: float) -> None:
    """Gives a bias-free nnx.Linear a bias [out] of `value`, sharded like its kernel's outputs."""
    axes = linear.kernel.get_metadata().get("out_sharding") or (None, None)
    linear.bias = param_type(jnp.full((linear.out_features,), value, jnp.float32), out_sharding=(axes[-1],),
                             eager_sharding=False)
    linear.use_bias = True


@register_mixer("student", StudentConfig, depth_aware=True)
class Student(nnx.Module):
    """x [B, T, D] -> [B, T, D]: `mixer`, the registered mixer of the recipe, with the teacher's
    heads; its calls and caches are the mixer's."""

    def __init__(self, model_config, config: StudentConfig, *, layer_index: int, rngs: nnx.Rngs):
        recipe, spec = RECIPES[config.mixer], get_mixer(config.mixer)
        options = build(spec.config_cls, recipe.options(model_config.n_heads, model_config.dim_per_head),
                        f"student {config.mixer}")
        self.mixer = spec.build(model_config, options, layer_index, rngs=rngs)
        modules = dict((".".join(map(str, path)), module) for path, module in nnx.iter_modules(self.mixer))
        if config.qkv_bias:
            for name, source in recipe.projections.items():
                if isinstance(source, From) and source.name != "o_proj" and modules[name].bias is None:
                    _add_bias(modules[name], nnx.Param, 0.0)  # the teacher's bias replaces it
        for name, value in recipe.biased.items():
            _add_bias(modules[name], TransferParam, value)
        mapped = {f"{name}.{leaf}" for name in recipe.projections for leaf in ("kernel", "bias")}
        parameters = _parameters(self.mixer)
        unknown = sorted(set(recipe.neutral) - set(parameters))
        if unknown:
            raise ValueError(f"student {config.mixer}: the mixer has no parameter {unknown[0]}")
        for path, (owner, attribute, param) in parameters.items():
            if path not in mapped:
                value = recipe.neutral[path](param.shape) if path in recipe.neutral else param.get_value()
                setattr(owner, attribute, TransferParam(value, **param.get_metadata()))

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        """x [B, T, D]; segment_ids, positions [B, T] int32 or None. Returns (y [B, T, D], cache)."""
        return self.mixer(x, segment_ids=segment_ids, positions=positions, cache=cache)

    def init_cache(self, batch: int, max_len: int, dtype):
        """The mixer's empty cache."""
        return self.mixer.init_cache(batch, max_len, dtype)


def _repeated(array, groups: int, head_dim: int):
    """[..., H_kv * head_dim] -> [..., H_kv * groups * head_dim], each head repeated `groups` times
    in place (transformers' repeat_kv: query head h reads key/value head h // groups)."""
    heads = array.reshape(*array.shape[:-1], -1, head_dim)
    return jnp.repeat(heads, groups, axis=-2).reshape(*array.shape[:-1], -1)


def from_teacher(mixer: str, teacher: Mapping[str, jnp.ndarray], head_dim: int) -> dict[str, jnp.ndarray]:
    """The parameters a student of `mixer` takes from its teacher attention layer: {path in the
    `Student` module ("mixer.q_proj.kernel"): float32 array}. `teacher`: the attention layer's
    parameters {"q_proj.kernel": [D, H * head_dim], "k_proj.kernel", "v_proj.kernel": [D, H_kv *
    head_dim], "o_proj.kernel": [H * head_dim, D], and "q_proj.bias" [H * head_dim] ... when it has
    biases}. Every teacher parameter must find a place (a teacher option no student carries raises
    ConfigError)."""
    carried = {f"{p}_proj.{leaf}" for p in "qkv" for leaf in ("kernel", "bias")} | {"o_proj.kernel"}
    extra = sorted(set(teacher) - carried)
    if extra:
        raise ConfigError(f"student {mixer}: the teacher's attention parameter {extra[0]} has no place in the student")
    groups = teacher["q_proj.kernel"].shape[1] // teacher["k_proj.kernel"].shape[1]
    heads = teacher["q_proj.kernel"].shape[1] // head_dim

    def part(source: From | New, leaf: str, rows: int):
        if isinstance(source, New):
            width = heads * (source.per_head or head_dim)
            return jnp.zeros((rows, width)) if leaf == "kernel" else jnp.full((width,), source.bias)
        name = f"{source.name}.{leaf}"
        if leaf == "bias" and name not in teacher:  # a fused projection's bias over a bias-free teacher
            return jnp.zeros(teacher[f"{source.name}.kernel"].shape[-1] * (groups if source.repeat else 1))
        array = jnp.asarray(teacher[name], jnp.float32)
        return _repeated(array, groups, head_dim) if source.repeat else array

    rows = teacher["q_proj.kernel"].shape[0]
    mapped = {}
    for name, source in RECIPES[mixer].projections.items():
        if isinstance(source, Fused):
            for leaf in ("kernel", "bias"):
                mapped[f"mixer.{name}.{leaf}"] = jnp.concatenate([part(p, leaf, rows) for p in source.parts], axis=-1)
            continue
        for leaf in ("kernel", "bias"):
            if f"{source.name}.{leaf}" in teacher:
                mapped[f"mixer.{name}.{leaf}"] = part(source, leaf, rows)
    return mapped

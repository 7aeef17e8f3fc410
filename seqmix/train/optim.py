"""Learning-rate schedules and optimizers built from an `OptimConfig`.

The optimizers take the parameter tree that `nnx.Optimizer(model, tx, wrt=nnx.Param)` hands to
optax: a pytree whose key paths spell the module attribute names, e.g.
`('layers', 0, 'mlp', 'gate_proj', 'kernel')` (plus a trailing `value` while the leaves are still
`nnx.Param`s). Which parameters are decayed or orthogonalised is read from those names and the
leaf's rank.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from seqmix.train.config import OptimConfig

# Parameters under these attribute names are trained by AdamW even with `name: muon`.
ADAMW_ONLY_MODULES = ("embed_tokens", "lm_head")

# A state space's dynamics, not weight matrices: Mamba and S4 train them without weight decay, and
# Muon does not orthogonalise them (Mamba's A_log [E, N], S4D's eigenvalues [D, N/2], the learned
# initial states of state tuning [H, K, V]).
DYNAMICS_PARAMETERS = ("A_log", "log_neg_real_a", "imag_a", "initial_state")

# Muon's updates are rescaled to this RMS (Liu et al. 2025, "Muon is Scalable for LLM Training"),
# which matches AdamW's typical update RMS, so both optimizers share `OptimConfig.lr`.
MUON_UPDATE_RMS = 0.2


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the (possibly traced) step, 0-based.

    Linear warmup from 0 at step 0 to `config.lr` at `config.warmup_steps`, then `config.schedule`
    over the post-warmup progress p = (step - warmup_steps) / (total_steps - warmup_steps),
    clipped to [0, 1], with lr_min = min_lr_ratio * lr:
    `cosine`: lr_min + (lr - lr_min) * (1 + cos(pi p)) / 2; `linear`: lr + (lr_min - lr) * p;
    `wsd`: lr, then linear decay to lr_min over the last round(decay_fraction * total_steps)
    steps (never starting before the end of warmup); `rex`: lr_min + (lr - lr_min) (1 - p) / (1 - p/2);
    `constant`: lr. Steps past `total_steps` keep the final value.
    """
    lr = config.lr
    lr_min = config.min_lr_ratio * lr
    warmup = config.warmup_steps
    decay_start = max(warmup, total_steps - round(config.decay_fraction * total_steps))

    def progress(step: jax.Array, start: int) -> jax.Array:
        return jnp.clip((step - start) / max(total_steps - start, 1), 0.0, 1.0)

    def rex(step: jax.Array) -> jax.Array:
        p = progress(step, warmup)
        return lr_min + (lr - lr_min) * (1.0 - p) / (1.0 - p / 2.0)

    after_warmup = {
        "cosine": lambda step: lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(math.pi * progress(step, warmup))),
        "linear": lambda step: lr + (lr_min - lr) * progress(step, warmup),
        "wsd": lambda step: lr + (lr_min - lr) * progress(step, decay_start),
        "rex": rex,
        "constant": lambda step: jnp.full_like(step, lr),
    }
    if config.schedule not in after_warmup:
        raise ValueError(f"unknown schedule {config.schedule!r}")
    decay = after_warmup[config.schedule]

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < warmup, lr * step / max(warmup, 1), decay(step))

    return schedule


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (when `grad_clip > 0`) followed by `config.name`, under `make_schedule`.

    `adamw`: AdamW (b1, b2, eps) with decoupled weight decay on parameters of rank >= 2 only
    (matrices and embeddings; norm scales, biases and `DYNAMICS_PARAMETERS` are not decayed).
    `muon`: Muon (optax.contrib.muon, Nesterov momentum 0.95, updates rescaled to RMS
    `MUON_UPDATE_RMS` * lr, weight decay `weight_decay`) on the 2-D hidden matrices, and the
    AdamW above on everything else: the token embedding and output head (`ADAMW_ONLY_MODULES`),
    norms, biases and parameters of any other rank.
    """
    schedule = make_schedule(config, total_steps)
    adamw = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=_decay_mask,
    )
    if config.name == "adamw":
        tx = adamw
    elif config.name == "muon":
        muon = optax.contrib.muon(schedule, weight_decay=config.weight_decay, consistent_rms=MUON_UPDATE_RMS)
        tx = optax.partition({"muon": muon, "adamw": adamw}, _muon_labels)
    else:
        raise ValueError(f"unknown optimizer {config.name!r}")
    if config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def _key_path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree key path (DictKey / GetAttrKey / SequenceKey / FlattenedIndexKey) as strings."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(key.key))  # FlattenedIndexKey
    return tuple(names)


def _is_dynamics(path: tuple[Any, ...]) -> bool:
    return bool(set(_key_path_names(path)) & set(DYNAMICS_PARAMETERS))


def _decay_mask(params: Any) -> Any:
    """True for the leaves of `params` that get weight decay: those of rank >= 2, but dynamics."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf.ndim >= 2 and not _is_dynamics(path), params)


def _muon_labels(params: Any) -> Any:
    """'muon' for the 2-D leaves of `params` outside `ADAMW_ONLY_MODULES` and
    `DYNAMICS_PARAMETERS`, 'adamw' for the rest."""

    def label(path: tuple[Any, ...], leaf: jax.Array) -> str:
        hidden = not set(_key_path_names(path)) & set(ADAMW_ONLY_MODULES)
        return "muon" if leaf.ndim == 2 and hidden and not _is_dynamics(path) else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)

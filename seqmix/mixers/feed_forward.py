"""Feed-forward layers that are layers of their own (Nemotron-H's `-` and `E` layers): in a model
whose blocks have no MLP (ModelConfig.mlp_hidden = 0), a block of a norm and one of these in a
residual, beside blocks of attention or recurrence.

    mlp  y = MLP(x)                  (up -> activation -> down, ungated: `layers.mlp.MLP`)
    moe  y = MixtureOfExperts(x)     (`layers.moe`, with options of its own)

They mix no tokens: each token's output depends on that token alone, so their decode cache only
counts the tokens seen (`lengths`, which the model reads from its first layer's cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers.mlp import MLP, Activation
from seqmix.layers.moe import MixtureOfExperts, MoEConfig
from seqmix.mixers.registry import register_mixer


@struct.dataclass
class TokenCount:
    """The cache of a layer that keeps nothing of past tokens: lengths [B] int32 (tokens seen per row)."""

    lengths: jax.Array


@dataclasses.dataclass
class MLPConfig:
    hidden: int | None = None  # None: the model's mlp width
    activation: Activation = "relu2"
    bias: bool = False

    def validate(self, path: str) -> None:
        require(self.hidden is None or self.hidden >= 1, path, "hidden", f"must be >= 1 or null, got {self.hidden}")


@dataclasses.dataclass
class ExpertsConfig(MoEConfig):
    """A mixture of experts as a layer of its own: the layer pattern places it, so the options that
    choose a model's sparse blocks (dense_layers, first_dense, every) keep their defaults;
    expert_hidden None is the model's mlp width."""

    def validate(self, path: str) -> None:
        super().validate(path)
        for key, default in (("dense_layers", []), ("first_dense", 0), ("every", 1)):
            require(getattr(self, key) == default, path, key,
                    f"chooses a model's sparse blocks, not a layer of experts of its own (got {getattr(self, key)})")


class FeedForwardLayer(nnx.Module):
    """What the feed-forward mixers share: the mixer interface around a token-wise function."""

    def __call__(self, x, *, segment_ids=None, positions=None, cache: TokenCount | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions unused. Returns
        (y [B, T, D] in x's dtype, the cache with the T tokens counted, or None)."""
        del positions
        y = self.forward(x, segment_ids)
        return y, None if cache is None else TokenCount(lengths=cache.lengths + x.shape[1])

    def init_cache(self, batch: int, max_len: int, dtype) -> TokenCount:
        """No tokens seen; its size does not depend on max_len."""
        del max_len, dtype
        return TokenCount(lengths=jnp.zeros((batch,), jnp.int32))


def _stds(model_config) -> tuple[float, float]:
    """(input std, output std) of a layer's projections, as the model's blocks have them."""
    return model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5


def _width(hidden: int | None, model_config, mixer: str) -> int:
    width = model_config.mlp_width if hidden is None else hidden
    if width < 1:
        raise ValueError(f"{mixer}: no hidden width (the model's mlp_hidden is 0): set the layer's own")
    return width


@register_mixer("mlp", MLPConfig)
class FeedForward(FeedForwardLayer):
    """x [B, T, D] -> MLP(x) [B, T, D]; parameters `mlp.up_proj`, `mlp.down_proj`."""

    def __init__(self, model_config, config: MLPConfig, *, rngs: nnx.Rngs):
        std, out_std = _stds(model_config)
        self.mlp = MLP(model_config.d_model, _width(config.hidden, model_config, "mlp"), std=std, out_std=out_std,
                       rngs=rngs, activation=config.activation, bias=config.bias)

    def forward(self, x, segment_ids):
        del segment_ids
        return self.mlp(x)


@register_mixer("moe", ExpertsConfig)
class Experts(FeedForwardLayer):
    """x [B, T, D] -> MixtureOfExperts(x) [B, T, D]; parameters under `experts` (see `layers.moe`);
    segment_ids keep padding out of the load-balancing loss."""

    def __init__(self, model_config, config: ExpertsConfig, *, rngs: nnx.Rngs):
        std, out_std = _stds(model_config)
        self.experts = MixtureOfExperts(model_config.d_model, _width(config.expert_hidden, model_config, "moe"),
                                        config, std=std, out_std=out_std, rngs=rngs)

    def forward(self, x, segment_ids):
        return self.experts(x, segment_ids=segment_ids)

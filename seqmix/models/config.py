"""Architecture config of a language model: sizes plus a per-layer pattern of mixers."""

from __future__ import annotations

import dataclasses
from typing import Any

from seqmix.configuration import build, require
from seqmix.layers.mlp import Activation
from seqmix.layers.moe import MoEConfig
from seqmix.layers.rotary import RopeScaling
from seqmix.mixers import get_mixer
from seqmix.mixers.registry import MixerSpec
from seqmix.plugins import import_all


@dataclasses.dataclass
class ModelConfig:
    """A decoder-only LM: embed -> n_layers x (norm, mixer, residual, norm, MLP, residual) -> norm -> head.

    The MLP is a gated MLP (`GatedMLP`: SwiGLU, or GeGLU with mlp_activation gelu_tanh) of width
    mlp_hidden, or, with `moe`, a mixture of experts on the layers it makes sparse
    (`MoEConfig.sparse`). mlp_hidden 0: blocks of a norm and a mixer alone (Mamba-2; Nemotron-H,
    whose feed-forward layers are layers of their own).

    Blocks are pre-norm, or post-norm for the kinds in `post_norm_layers` (OLMo-hybrid's
    attention), or take their residuals after the norms for the kinds in `residual_scales`
    (MiniMax): kind -> [mixer_alpha, mixer_beta, mlp_alpha, mlp_beta], each half of the block
    x <- alpha * norm(x) + beta * f(norm(x)).

    The embeddings are multiplied by embedding_multiplier (Falcon-H1's muP multiplier, Gemma's
    sqrt(d_model)), the logits by logit_multiplier, then soft-capped, cap * tanh(logits / cap),
    when logit_soft_cap is set (Gemma 2, RecurrentGemma).

    `layer_pattern` names a layer kind per layer and is repeated to fill `n_layers`. A kind is
    either a key of `mixers` (`{type: <registered mixer>, <option>: ...}`) or directly the name
    of a registered mixer with default options, e.g.
    `layer_pattern: [local, local, local, global]` with
    `mixers: {local: {type: attention, sliding_window: 64}, global: {type: attention}}`.

    `imports` lists modules (`my_pkg.my_mixers`) or Python files (`my_mixer.py`) that register
    mixers of the user's (`seqmix.plugins`), imported before the layer pattern is read. They belong
    to the model, not the run, because what builds a model needs them: a run's config.yaml records
    them (files made absolute by `load_train_config`), so generate, eval and export import them
    again, and so does a seqmix-format export's config.json for `from_pretrained`.
    """

    imports: list[str] = dataclasses.field(default_factory=list)  # code registering mixers of the user's
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 64; 0: no MLP
    mlp_activation: Activation = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU)
    mlp_bias: bool = False
    mlp_multipliers: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])  # gate, down (Falcon-H1)
    moe: MoEConfig | None = None  # mixture-of-experts MLPs on the layers it selects
    layer_pattern: list[str] = dataclasses.field(default_factory=lambda: ["attention"])
    post_norm_layers: list[str] = dataclasses.field(default_factory=list)  # layer kinds in post-norm blocks
    residual_scales: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    mixers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama-3's long-context RoPE scaling
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + w), w from 0 (Gemma, Qwen3-Next)
    tie_embeddings: bool = True
    embedding_multiplier: float = 1.0
    logit_multiplier: float = 1.0
    logit_soft_cap: float | None = None
    init_std: float = 0.02
    # A trainable state before each row's first token in every recurrent layer (state tuning,
    # `tune: state`), zeros at first; the layers' mixers must provide `learn_initial_state`.
    learned_initial_state: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return -(-(8 * self.d_model // 3) // 64) * 64 if self.mlp_hidden is None else self.mlp_hidden

    def layer_kinds(self) -> list[str]:
        """The layer kind of each of the n_layers layers."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]

    def mixer(self, kind: str, path: str = "model") -> tuple[MixerSpec, Any]:
        """The registered mixer of a layer kind and its built options dataclass."""
        options = dict(self.mixers.get(kind, {}))
        mixer_name = options.pop("type", kind)
        where = f"{path}.mixers.{kind}" if kind in self.mixers else f"{path}.layer_pattern"
        spec = get_mixer(mixer_name, f"{where}.type" if kind in self.mixers else where)
        return spec, build(spec.config_cls, options, where)

    def non_causal_layers(self) -> list[str]:
        """The layer kinds whose mixers read the tokens after each token (`causal` false in their
        options or their options class, or in options nested there, e.g. a parallel hybrid's
        attention): such a model cannot be trained to predict the next token, nor generate."""

        def causal(options) -> bool:
            nested = [getattr(options, field.name) for field in dataclasses.fields(options)]
            return getattr(options, "causal", True) and all(causal(o) for o in nested if dataclasses.is_dataclass(o))

        return [kind for kind in dict.fromkeys(self.layer_pattern) if not causal(self.mixer(kind)[1])]

    def validate(self, path: str) -> None:
        import_all(self.imports, f"{path}.imports" if path else "imports")  # before any mixer is looked up
        for key in ("vocab_size", "d_model", "n_layers", "n_heads"):
            require(getattr(self, key) > 0, path, key, f"must be positive, got {getattr(self, key)}")
        require(self.head_dim is not None or self.d_model % self.n_heads == 0, path, "d_model",
                f"{self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)")
        require(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, path, "n_kv_heads",
                f"{self.n_kv_heads} must be positive and divide n_heads={self.n_heads}")
        require(self.dim_per_head % 2 == 0, path, "head_dim", f"{self.dim_per_head} must be even for rotary embeddings")
        require(self.mlp_width >= 0, path, "mlp_hidden", f"must be >= 0 (0: no MLP), got {self.mlp_hidden}")
        require(self.mlp_width > 0 or self.moe is None, path, "moe", "needs blocks with an MLP (mlp_hidden > 0)")
        require(self.logit_soft_cap is None or self.logit_soft_cap > 0, path, "logit_soft_cap",
                f"must be positive or null, got {self.logit_soft_cap}")
        require(len(self.layer_pattern) > 0, path, "layer_pattern", "must name at least one layer kind")
        require(self.n_layers % len(self.layer_pattern) == 0, path, "n_layers",
                f"{self.n_layers} is not a multiple of the layer_pattern length {len(self.layer_pattern)}")
        require(self.rope_theta > 0, path, "rope_theta", "must be positive")
        require(self.norm_eps > 0, path, "norm_eps", "must be positive")
        for kind in self.layer_pattern:
            self.mixer(kind, path)
        for key in ("post_norm_layers", "residual_scales"):
            for kind in getattr(self, key):
                require(kind in self.layer_pattern, path, key, f"{kind!r} is not a kind of layer_pattern")
        require(len(self.mlp_multipliers) == 2, path, "mlp_multipliers",
                f"must be [gate, down], got {self.mlp_multipliers}")
        for kind, scales in self.residual_scales.items():
            require(len(scales) == 4, path, f"residual_scales.{kind}",
                    f"must be [mixer_alpha, mixer_beta, mlp_alpha, mlp_beta], got {scales}")
        both = sorted(set(self.post_norm_layers) & set(self.residual_scales))
        require(not both, path, "residual_scales", f"{both} are post-norm layers too (a block has one form)")
        if self.learned_initial_state:
            stateless = [kind for kind in self.layer_pattern
                         if not self.mixer(kind, path)[0].learns_initial_state]
            require(len(stateless) < len(self.layer_pattern), path, "learned_initial_state",
                    f"no layer kind of layer_pattern has a recurrent state to learn ({', '.join(stateless)})")
        unused = sorted(set(self.mixers) - set(self.layer_pattern))
        require(not unused, path, f"mixers.{unused[0] if unused else ''}", "is not used by layer_pattern")


# Options that do not shape what a checkpoint's weights compute: how fresh weights are drawn,
# and parameters a run may add (state tuning's learned states).
_TRAINING_ONLY_OPTIONS = ("init_std", "learned_initial_state")


def architecture_differences(saved: ModelConfig, model: ModelConfig) -> list[str]:
    """Every way `model` differs from `saved` (e.g. a checkpoint's config) in what its weights
    compute, as "key: saved X, model Y" lines: the top-level options, then per layer the options
    of its mixer (layers listed together where they differ alike). A layer whose mixer is of
    another type is a conversion (a linearized layer reads its attention's weights), not a
    difference."""
    def plain(config):  # the defaults that None stands for resolved, so that None and its value agree
        resolved = {"n_kv_heads": config.kv_heads, "head_dim": config.dim_per_head, "mlp_hidden": config.mlp_width}
        return {field.name: resolved.get(field.name, getattr(config, field.name)) for field in dataclasses.fields(config)
                if field.name not in (*_TRAINING_ONLY_OPTIONS, "imports", "layer_pattern", "mixers")}

    ours, theirs = plain(model), plain(saved)
    differences = [f"{key}: saved {theirs[key]!r}, model {ours[key]!r}" for key in theirs if ours[key] != theirs[key]]
    if saved.n_layers != model.n_layers:
        return differences
    by_difference: dict[str, list[int]] = {}
    for index, (saved_kind, kind) in enumerate(zip(saved.layer_kinds(), model.layer_kinds())):
        (saved_spec, saved_options), (spec, options) = saved.mixer(saved_kind), model.mixer(kind)
        if saved_spec.name != spec.name:
            continue
        saved_fields, fields = dataclasses.asdict(saved_options), dataclasses.asdict(options)
        found = [f"{key}: saved {saved_fields[key]!r}, model {fields[key]!r}"
                 for key in saved_fields if saved_fields[key] != fields[key]]
        for line in found:
            by_difference.setdefault(line, []).append(index)
    differences += [f"layers {', '.join(map(str, layers))} {line}" for line, layers in by_difference.items()]
    return differences

"""The config of a training run: model, data, optimizer, checkpoints, mesh and the loop itself.

A run YAML (`configs/runs/*.yaml`) may give `model` as a mapping or as the path of a model YAML
(`configs/models/*.yaml`, relative to the run file or to the working directory), whose
`imports` files are found the same way, beside the file that gives the model first; a run that
starts from a Hugging Face checkpoint (`init_from`) and names no model gets the checkpoint's
(its config.json). Command-line overrides (`optim.lr=3e-4 model.n_layers=4`) apply after that.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from seqmix.configuration import ConfigError, apply_overrides, build, load_yaml, parse_override, require, to_dict
from seqmix.layers.partitioning import MESH_AXES, rule_problem
from seqmix.models.config import ModelConfig, architecture_differences
from seqmix.models.hf import CheckpointError, config_from_hf
from seqmix.plugins import resolved_files


@dataclasses.dataclass
class SourceConfig:
    """One pre-tokenized corpus directory of a mixture, and its share of the training pieces."""

    path: str
    weight: float = 1.0

    def validate(self, path: str) -> None:
        require(math.isfinite(self.weight) and self.weight > 0, path, "weight",
                f"must be a positive number, got {self.weight}")


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from and how it is cut into packed rows.

    `corpus: shakespeare` uses the embedded corpus (prepared once into `cache_dir`); `files`:
    `train_files` / `eval_files` list text (.txt), JSON lines (.jsonl, field `text_field`) or
    parquet (.parquet, column `text_field`) files or glob patterns; `alpaca`: they list Alpaca
    JSON instruction files, trained with the loss on the responses only; `tokenized`: they list
    directories that `seqmix data tokenize` wrote (tokenized with `tokenizer`), or `sources`
    mixes several such directories by weight (each `{path, weight}`).
    """

    corpus: Literal["shakespeare", "files", "alpaca", "tokenized"] = "shakespeare"
    train_files: list[str] = dataclasses.field(default_factory=list)
    eval_files: list[str] = dataclasses.field(default_factory=list)
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = "byte"  # "byte" or the path of a Hugging Face tokenizer.json
    seq_len: int = 256
    batch_size: int = 16
    # Several documents per row, told apart by segment ids; false: one document (piece) per row,
    # padded, which state tuning needs (its learned state starts each row).
    pack: bool = True
    shuffle_seed: int = 0
    cache_dir: str = ".cache/seqmix"

    def validate(self, path: str) -> None:
        require(self.seq_len > 1, path, "seq_len", f"must be at least 2, got {self.seq_len}")
        require(self.batch_size > 0, path, "batch_size", f"must be positive, got {self.batch_size}")
        require(not self.sources or self.corpus == "tokenized", path, "sources",
                f"mixes pre-tokenized directories: set corpus: tokenized (it is {self.corpus!r})")
        require(not (self.sources and self.train_files), path, "sources",
                "and train_files both name the training data: give one of them")
        if self.corpus == "tokenized":
            require(bool(self.train_files or self.sources), path, "train_files",
                    "must list at least one pre-tokenized directory (or give sources) when corpus is 'tokenized'")
        elif self.corpus != "shakespeare":
            require(bool(self.train_files), path, "train_files",
                    f"must list at least one file when corpus is {self.corpus!r}")


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Schedules (all with `warmup_steps` of linear warmup from 0): `cosine` to `min_lr_ratio * lr`;
    `linear` decay to `min_lr_ratio * lr`; `wsd` (warmup-stable-decay) holds `lr` and decays
    linearly over the last `decay_fraction` of the steps; `rex` decays as (1 - p) / (1 - p/2) in
    the post-warmup progress p; `constant`.
    `muon` orthogonalises the updates of 2-D hidden weight matrices and uses AdamW for the rest
    (embeddings, head, norms).
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables
    schedule: Literal["cosine", "linear", "wsd", "rex", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def validate(self, path: str) -> None:
        for field in dataclasses.fields(self):  # inf passes the range checks below, and trains NaNs
            value = getattr(self, field.name)
            if isinstance(value, float):
                require(math.isfinite(value), path, field.name, f"must be a finite number, got {value}")
        require(self.lr > 0, path, "lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, path, "weight_decay", "must be non-negative")
        require(0 <= self.b1 < 1, path, "b1", "must be in [0, 1)")
        require(0 <= self.b2 < 1, path, "b2", "must be in [0, 1)")
        require(self.grad_clip >= 0, path, "grad_clip", "must be non-negative")
        require(self.warmup_steps >= 0, path, "warmup_steps", "must be non-negative")
        require(0 <= self.min_lr_ratio <= 1, path, "min_lr_ratio", "must be in [0, 1]")
        require(0 < self.decay_fraction <= 1, path, "decay_fraction", "must be in (0, 1]")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    async_save: bool = True

    def validate(self, path: str) -> None:
        require(self.every_steps > 0, path, "every_steps", "must be positive")
        require(self.keep >= 1, path, "keep", "must be at least 1")


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 fills the axis with the devices the others leave. `expert`
    splits the experts of mixture-of-experts layers (and, like data, the batch). `rules` replaces
    entries of the logical axis rules for the run ({logical axis: [mesh axes]}, e.g.
    `{mlp: [], length: [sequence, tensor]}`; `seqmix.layers.partitioning.LOGICAL_AXIS_RULES`
    holds the defaults), which place the parameters and the named activations alike."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def validate(self, path: str) -> None:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for key, size in sizes.items():
            require(size == -1 or size > 0, path, key, f"must be positive or -1, got {size}")
        require(sum(size == -1 for size in sizes.values()) <= 1, path, "data", "at most one axis may be -1")
        for name, mesh_axes in self.rules.items():
            problem = rule_problem(name, mesh_axes)
            require(problem is None, f"{path}.rules" if path else "rules", name, problem or "")


@dataclasses.dataclass
class LoRAConfig:
    """LoRA adapters on the projections named in `targets`; with them, only the adapters train."""

    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    # lora: B = 0, the adapters start as nothing (Hu et al.); pissa: they start as each
    # projection's top singular part, which the frozen base then lacks (`LoRALinear.take_principal_part`)
    init: Literal["lora", "pissa"] = "lora"

    def validate(self, path: str) -> None:
        require(self.rank > 0, path, "rank", f"must be positive, got {self.rank}")
        require(bool(self.targets), path, "targets", "must name at least one projection")


@dataclasses.dataclass
class DistillConfig:
    """Distillation from a frozen teacher, the stages of RADLADS and LoLCATs
    (`seqmix.train.distillation`): the optimised loss becomes
    - `attention_output`: each converted layer's mixer, fed the teacher's input to that layer, fits
      the teacher attention's output (relative squared error, averaged over the converted layers);
    - `hidden_states`: each block's output in the student's own forward fits the teacher block's;
    - `kl`: KL(teacher || student) of the next-token distributions per token (in blocks of
      `loss_chunk_tokens` when that is set), plus `lm_weight` times the cross-entropy.
    The teacher runs in the same step, frozen, in `teacher_dtype`. `train` names what trains: `all`
    (every parameter, or with `lora` the adapters), `converted` (every parameter of the layers whose
    mixer the conversion replaced) or `new` (only the parameters the conversion added)."""

    loss: Literal["attention_output", "hidden_states", "kl"] = "kl"
    teacher: str | None = None  # a Hugging Face or seqmix-format directory; default: the run's init_from
    lm_weight: float = 0.0
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    train: Literal["all", "converted", "new"] = "all"

    def validate(self, path: str) -> None:
        require(math.isfinite(self.lm_weight) and self.lm_weight >= 0, path, "lm_weight",
                f"must be a finite non-negative number, got {self.lm_weight}")
        require(self.lm_weight == 0 or self.loss == "kl", path, "lm_weight",
                f"mixes the cross-entropy into the kl loss only, not into {self.loss}")


# What a stage of a staged run may not change: every stage trains the same model on the same data,
# each in its own directory, from the weights the stage before it left.
_FIXED_ACROSS_STAGES = ("model", "data", "init_from", "out_dir", "stages")


@dataclasses.dataclass
class MLMConfig:
    """Masked language modelling (`objective: mlm`, `seqmix.train.mlm`): `mask_rate` of the real
    tokens, drawn anew each step, become `mask_token`, and the loss is on recovering them."""

    mask_rate: float = 0.15
    # An id no text encodes to: the byte tokenizer's are 0..255, so an MLM model has vocab_size 257
    mask_token: int = 256

    def validate(self, path: str) -> None:
        require(0 < self.mask_rate < 1, path, "mask_rate", f"must be in (0, 1), got {self.mask_rate}")
        require(self.mask_token >= 0, path, "mask_token", f"must be a token id (>= 0), got {self.mask_token}")


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step; data.batch_size is the micro-batch
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters stay float32
    # > 0: the loss over blocks of this many tokens, never the whole [B, T, vocab] logits (large vocabularies)
    loss_chunk_tokens: int = 0
    # true: each block's activations recomputed in the backward pass instead of kept (`LanguageModel`'s
    # remat): a train step's memory falls to about the blocks' inputs plus one block's work, for a
    # second forward pass of every block
    remat: bool = False
    # A Hugging Face checkpoint directory whose weights start the run (matched to the model by name);
    # without a `model`, the run's model is the checkpoint's
    init_from: str | None = None
    lora: LoRAConfig | None = None  # train LoRA adapters only, the other weights frozen
    # all: every parameter (or the LoRA adapters); state: only each recurrent layer's learned
    # initial state (state tuning), which gives the model `model.learned_initial_state`
    tune: Literal["all", "state"] = "all"
    # next_token: causal language modelling; mlm: masked language modelling (bidirectional encoders)
    objective: Literal["next_token", "mlm"] = "next_token"
    mlm: MLMConfig = dataclasses.field(default_factory=MLMConfig)  # read with objective mlm
    distill: DistillConfig | None = None  # needs a teacher: distill.teacher or init_from
    # Several runs in a row (`seqmix.train.stages`), each a mapping of the keys it changes (and a
    # `name`); see `stage_configs`.
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    out_dir: str = "runs/default"
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite losses
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 200

    def __post_init__(self):
        if self.tune == "state" and not self.model.learned_initial_state:
            self.model = dataclasses.replace(self.model, learned_initial_state=True)

    def validate(self, path: str) -> None:
        for key in ("steps", "grad_accum", "eval_every", "eval_batches", "log_every", "max_nonfinite_steps"):
            require(getattr(self, key) > 0, path, key, f"must be positive, got {getattr(self, key)}")
        require(self.sample_tokens >= 0, path, "sample_tokens", "must be non-negative")
        require(self.loss_chunk_tokens >= 0, path, "loss_chunk_tokens", "must be non-negative (0: the plain loss)")
        require(self.optim.warmup_steps <= self.steps, path, "optim.warmup_steps",
                f"{self.optim.warmup_steps} exceeds steps={self.steps}")
        if self.distill is not None:
            require(self.distill.teacher is not None or self.init_from is not None, path, "distill.teacher",
                    "needs a teacher: give distill.teacher or init_from")
            require(self.lora is None or self.distill.train == "all", path, "distill.train",
                    f"{self.distill.train!r} with lora: with LoRA the adapters train, so leave train at all")
            require(self.objective == "next_token", path, "distill", "distils a causal model (objective next_token)")
        stage_configs(self, path)  # each stage is a whole run: checked now, not when the stage before it ends
        if self.tune == "state":
            self.model.validate(f"{path}.model" if path else "model")  # again, with the states it was given
            for key, value in (("lora", self.lora), ("distill", self.distill)):
                require(value is None, path, key, "cannot be combined with tune: state (which trains the states alone)")
            require(not self.data.pack, path, "data.pack",
                    "must be false with tune: state (the learned state starts each row; a packed row's later "
                    "documents would start from zero)")
        if self.data.tokenizer == "byte":
            require(self.model.vocab_size >= 256, path, "model.vocab_size",
                    f"{self.model.vocab_size} is smaller than the byte tokenizer's 256 symbols")
        if self.objective == "mlm":
            require(self.mlm.mask_token < self.model.vocab_size, path, "mlm.mask_token",
                    f"{self.mlm.mask_token} is not an id of the model's vocabulary "
                    f"(vocab_size {self.model.vocab_size})")
            require(self.data.tokenizer != "byte" or self.mlm.mask_token >= 256, path, "mlm.mask_token",
                    f"{self.mlm.mask_token} is a byte of the text; use 256 (with model.vocab_size 257)")
            require(self.data.corpus != "alpaca", path, "data.corpus",
                    "alpaca scores responses to instructions, a next-token objective; mlm reads plain text")
        else:
            non_causal = self.model.non_causal_layers()
            require(not non_causal, path, "objective",
                    f"next_token needs a causal model, but the model's {', '.join(non_causal)} layers read the "
                    "tokens after each token: use objective mlm")


def stage_configs(config: TrainConfig, path: str = "") -> list[tuple[str, TrainConfig]]:
    """(name, config) of each stage of a staged run, in order (none without `stages`). A stage is
    the run's config with the keys its mapping gives merged in (mappings merged key by key, other
    values replaced; `lora: null` drops the run's LoRA); it may not change model, data, init_from
    or out_dir. Stages before the last run in `out_dir/stages/<name>` and do not sample; the last
    runs in `out_dir` itself, so that generate, eval and export of the run read its result. A
    distilling stage's teacher defaults to the run's init_from."""
    run = {key: value for key, value in to_dict(config).items() if key != "stages"}
    names, staged = [], []
    for index, stage in enumerate(config.stages):
        where = f"{path}.stages[{index}]" if path else f"stages[{index}]"
        name = stage.get("name")
        require(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), where, "name",
                f"each stage needs a name of letters, digits, - or _ (its directory), got {name!r}")
        require(name not in names, where, "name", f"{name!r} names an earlier stage too")
        names.append(name)
        for key in _FIXED_ACROSS_STAGES:
            require(key not in stage, where, key, "is the run's, the same in every stage; set it outside stages")
        mapping = _merged(run, {key: value for key, value in stage.items() if key != "name"})
        if index < len(config.stages) - 1:
            mapping.update(out_dir=str(Path(config.out_dir) / "stages" / name), sample_tokens=0)
        staged.append((name, build(TrainConfig, mapping, where)))
    return staged


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in: mappings key by key (recursively), other values replaced."""
    merged = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Reads a run YAML (or the defaults when `path` is None), applies overrides, validates."""
    path = None if path is None else _run_file(path)
    mapping: dict[str, Any] = load_yaml(path) if path is not None else {}
    # `model=<file>` swaps the whole model config before `model.<field>=...` refine it.
    refinements = []
    init_from = mapping.get("init_from")
    model_file = path  # the YAML that gives the model, beside which its relative `imports` files are
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["model"]:
            mapping["model"], model_file = value, None
        else:
            refinements.append(text)
            init_from = value if keys == ["init_from"] else init_from
    model = mapping.get("model")
    if isinstance(model, str):
        model_file = _resolve_relative(model, path)
        mapping["model"] = load_yaml(model_file)
    elif model is None and init_from is not None:
        mapping["model"] = _checkpoint_model(str(init_from))
    apply_overrides(mapping, refinements)
    _resolve_import_files(mapping, model_file)
    config = build(TrainConfig, mapping)
    if init_from is not None:
        _require_checkpoint_architecture(str(init_from), config.model)
    return config


def _resolve_import_files(mapping: dict[str, Any], config_file: Path | None) -> None:
    """Makes the relative files of `model.imports` absolute, so that the run's recorded config.yaml
    finds them from anywhere: each, whether the YAML or an override names it, is looked for beside
    `config_file` (the YAML that gives the model), then in the working directory."""
    model = mapping.get("model")
    if isinstance(model, dict) and "imports" in model:
        model["imports"] = resolved_files(model["imports"], config_file, "model.imports")


def _require_checkpoint_architecture(directory: str, model: ModelConfig) -> None:
    """Refuses a run whose own `model` computes something else than the init_from checkpoint's,
    naming every difference (a tied model would silently drop an untied checkpoint's head)."""
    differences = architecture_differences(build(ModelConfig, _checkpoint_model(directory), "init_from"), model)
    if differences:
        raise ConfigError(f"init_from: {directory} holds another architecture than the run's model "
                          f"({len(differences)} difference(s)): " + "; ".join(differences)
                          + ". Leave model out to take the checkpoint's, or match it")


# The checkout seqmix runs from, whose configs/ a relative run file may name from any directory.
CHECKOUT = Path(__file__).resolve().parents[2]


def _run_file(path: str | Path) -> Path:
    """A run YAML: `path` as given (from the working directory), else, if relative, the same path
    in the seqmix checkout (`seqmix train configs/runs/smoke.yaml` from anywhere)."""
    candidates = [Path(path)] + ([] if Path(path).is_absolute() else [CHECKOUT / path])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: run config not found (looked for {' and '.join(str(c.absolute()) for c in candidates)})")


def _checkpoint_model(directory: str) -> dict[str, Any]:
    """The model options of a Hugging Face checkpoint directory's config.json."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"init_from: {directory} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        return to_dict(config_from_hf(json.loads(config_file.read_text()), str(config_file)))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: not JSON ({err})") from err
    except CheckpointError as err:
        raise ConfigError(str(err)) from err


def _resolve_relative(reference: str, config_path: str | Path | None) -> Path:
    candidates = [Path(reference)]
    if config_path is not None:
        candidates.insert(0, Path(config_path).parent / reference)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"model: model config {reference!r} not found (looked in {', '.join(map(str, candidates))})")

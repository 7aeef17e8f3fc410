"""Attaching LoRA adapters to a model's projections by name, and merging them back for export."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from seqmix.layers.lora import LoRALinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


def add_lora(model: nnx.Module, *, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 8.0,
             rngs: nnx.Rngs) -> int:
    """Wraps every `nnx.Linear` attribute named in `targets` (in any submodule, e.g. each layer's
    self_attn.q_proj or mlp.gate_proj) in a `LoRALinear`, in place. Returns how many it wrapped;
    a target name that matches nothing is an error naming the projections the model has (a typo,
    or a name another architecture uses, would otherwise train nothing)."""
    found = {name: 0 for name in targets}
    projections = sorted({name for _path, module in nnx.iter_modules(model) for name, child in vars(module).items()
                          if isinstance(child, nnx.Linear)})
    for _path, module in list(nnx.iter_modules(model)):
        for name in targets:
            projection = getattr(module, name, None)
            if isinstance(projection, nnx.Linear):
                setattr(module, name, LoRALinear(projection, rank=rank, alpha=alpha, rngs=rngs))
                found[name] += 1
    missing = [name for name, count in found.items() if count == 0]
    if missing:
        raise ValueError(f"LoRA target {missing[0]!r} names no projection of the model "
                         f"(its projections: {', '.join(projections)})")
    return sum(found.values())


def principal_adapters(model: nnx.Module) -> int:
    """Initialises every LoRA adapter of `model` by PiSSA (`LoRALinear.take_principal_part`), in
    place: the model computes what it did, its adapters hold each projection's principal part.
    Returns how many it initialised."""
    adapted = [module for _path, module in nnx.iter_modules(model) if isinstance(module, LoRALinear)]
    for module in adapted:
        module.take_principal_part()
    return len(adapted)


def merge_lora(model: nnx.Module) -> int:
    """Replaces every `LoRALinear` by its merged `nnx.Linear`, in place, so the model has its
    original parameter names (ready for `save_pretrained`). Returns how many it merged."""
    merged = 0
    for _path, module in list(nnx.iter_modules(model)):
        for name, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                merged += 1
    return merged

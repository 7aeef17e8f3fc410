"""How a Hugging Face checkpoint's tensors and a seqmix model's parameters correspond.

Both sides are named the torch way. A seqmix parameter's *torch name* (`torch_name`) is its module
path under `model.` (`lm_head` at the top) with `.weight` for kernels, embeddings and norm scales,
`.bias` for biases, and the parameter's own name otherwise (`A_log`, a mixture of experts'
stacked `gate_proj`); its *torch array* is its value with a projection kernel [in, out]
transposed to torch's [out, in]. Where a family lays a tensor out as seqmix does under the same
torch name, nothing needs saying: the tensor is the parameter. Everything else is a
`Conversion`, which works both ways (import and export) from one description:

    renamed   one hub tensor is one parameter under another name (optionally another shape)
    split     hub tensors concatenated along rows are several parameters, optionally interleaved
              in groups (Qwen3-Next's q/k/v/z rows per key head) and as depthwise convolutions
    stacked   one hub tensor per expert is one [E, ...] parameter
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that does not match its config or what seqmix can load."""


Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """Hub tensors `hub` <-> seqmix torch arrays `ours`, each a tuple of torch names; `to_ours`
    maps the hub arrays (in `hub` order) to ours (in `ours` order), `to_hub` back."""

    hub: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[Arrays], Arrays]
    to_hub: Callable[[Arrays], Arrays]


def torch_name(path: tuple) -> tuple[str, bool]:
    """(torch name, whether the torch array is the parameter transposed) of a seqmix parameter
    path (a LoRA-wrapped projection's `base` counts as the projection)."""
    *module, leaf = (str(part) for part in path if part != "base")
    suffix = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}.get(leaf, leaf)
    name = ".".join([*module, suffix])
    return (name if module[0] == "lm_head" else f"model.{name}"), leaf == "kernel"


def renamed(hub: str, ours: str, *, hub_shape: Sequence[int] | None = None) -> Conversion:
    """Hub tensor `hub` is parameter `ours`; with `hub_shape` the hub stores it in that shape
    (Kimi's A_log [1, 1, H, 1] for seqmix's [H])."""
    if hub_shape is None:
        return Conversion((hub,), (ours,), lambda arrays: arrays, lambda arrays: arrays)
    return Conversion((hub,), (ours,), lambda arrays: [arrays[0].reshape(-1)],
                      lambda arrays: [arrays[0].reshape(tuple(hub_shape))])


def split(hub: Sequence[str], ours: Sequence[str], sizes: Sequence[int], *, groups: int = 1,
          hub_sizes: Sequence[int] | None = None, conv: bool = False) -> Conversion:
    """Hub tensors `hub`, concatenated along their first axis (rows), are the parameters `ours`:
    in `groups` equal groups of rows, each group holding `sizes` rows of each part in turn (one
    group: the parts one after another). With several hub tensors, export writes `hub_sizes` rows
    into each; import concatenates whatever it finds, so the boundaries between hub tensors do
    not matter there. With `conv`, the hub tensors are torch depthwise convolutions [C, 1, K]
    (tap K-1 on the current token) and the parameters ShortConvolution weights [K, C] (tap 0 on
    the current token): transposed, taps reversed."""
    hub, ours, sizes = tuple(hub), tuple(ours), tuple(sizes)
    if len(hub) > 1 and (hub_sizes is None or len(hub_sizes) != len(hub)):
        raise ValueError(f"split: {len(hub)} hub tensors need as many hub_sizes")
    edges = np.cumsum(sizes)[:-1]

    def to_ours(arrays: Arrays) -> Arrays:
        rows = np.concatenate([a[:, 0, :] if conv else a for a in arrays], axis=0)
        if rows.shape[0] != groups * sum(sizes):
            raise CheckpointError(f"tensor {' + '.join(hub)} has {rows.shape[0]} rows, expected {groups * sum(sizes)}")
        grouped = rows.reshape(groups, sum(sizes), *rows.shape[1:])
        parts = [part.reshape(groups * size, *rows.shape[1:]) for part, size in
                 zip(np.split(grouped, edges, axis=1), sizes)]
        return [part[:, ::-1].T for part in parts] if conv else parts

    def to_hub(arrays: Arrays) -> Arrays:
        parts = [a.T[:, ::-1] for a in arrays] if conv else arrays
        grouped = np.concatenate([part.reshape(groups, size, *part.shape[1:]) for part, size in zip(parts, sizes)],
                                 axis=1)
        rows = grouped.reshape(groups * sum(sizes), *grouped.shape[2:])
        pieces = np.split(rows, np.cumsum(hub_sizes)[:-1], axis=0) if len(hub) > 1 else [rows]
        return [piece[:, None, :] for piece in pieces] if conv else pieces

    return Conversion(hub, ours, to_ours, to_hub)


def stacked(hub_pattern: str, ours: str, count: int) -> Conversion:
    """Hub tensors `hub_pattern.format(e)` [out, in], e < count (one per expert), are the rows
    of parameter `ours` [E, in, out] (seqmix keeps experts' kernels [in, out])."""
    return Conversion(tuple(hub_pattern.format(e) for e in range(count)), (ours,),
                      lambda arrays: [np.stack([a.T for a in arrays])], lambda arrays: [w.T for w in arrays[0]])

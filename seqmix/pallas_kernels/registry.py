"""A kernel family's implementations behind one op: `supports()` predicates and "auto" dispatch.

"auto" takes the first implementation, in the family's order of preference, that is native to the
current backend and supports the call. Interpreted Pallas and the token-by-token reference are
never chosen by "auto"; asking for one by name runs it (Pallas in interpret mode off its device).
"""

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a kernel family's op.

    `supports(call)` returns None when the implementation can run `call` (a family-specific
    description of shapes and options), else the reason it cannot, for the error message.
    `native_backends` are the backends "auto" may pick it on.
    """

    name: str
    run: Callable[..., Any]
    supports: Callable[[Any], str | None]
    native_backends: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """What an implementation's `supports` is told of a call: the key and value widths and the
    chunk length."""

    key_dim: int
    value_dim: int
    chunk_size: int


def always(call: Any) -> None:
    """`supports` of an implementation that runs every call (the reference, plain XLA paths)."""
    return None


def choose(implementations: list[Implementation], impl: str, call: Any, op_name: str) -> Implementation:
    by_name = {candidate.name: candidate for candidate in implementations}
    if impl != "auto":
        if impl not in by_name:
            raise ValueError(f"{op_name}: impl={impl!r} is not one of {['auto', *by_name]}")
        chosen = by_name[impl]
        reason = chosen.supports(call)
        if reason is not None:
            raise ValueError(f"{op_name}: impl={impl!r} cannot run this call: {reason}")
        return chosen
    backend = jax.default_backend()
    reasons = []
    for candidate in implementations:
        if backend not in candidate.native_backends:
            continue
        reason = candidate.supports(call)
        if reason is None:
            return candidate
        reasons.append(f"{candidate.name}: {reason}")
    raise ValueError(f"{op_name}: no implementation supports this call on {backend} ({'; '.join(reasons)})")


# Set while `lower_for_device` traces: the kernels are lowered for their device, not interpreted.
_lowering_for_device = contextvars.ContextVar("lowering_for_device", default=False)

# The GPU that Triton's lowering asks about (its compute capability) on a machine without one.
ABSTRACT_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
_LOWERING_PLATFORMS = {"gpu": "cuda", "tpu": "tpu"}


def interpret_off_device(device_platform: str) -> bool:
    """True when a Pallas kernel for `device_platform` must run in interpret mode here."""
    return not _lowering_for_device.get() and jax.default_backend() != device_platform


def lower_for_device(fn: Callable[..., Any], args: tuple, device_platform: str) -> jax.stages.Lowered:
    """`jax.jit(fn)` traced on `args` and lowered for a "gpu" (an H100) or a "tpu" that this machine
    need not have: the Pallas kernels themselves, not their interpreters, so that a kernel Triton or
    Mosaic rejects fails here, on a CPU, rather than on a lent device. Lowering only: nothing is
    compiled or run."""
    token = _lowering_for_device.set(True)
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=ABSTRACT_H100)):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=(_LOWERING_PLATFORMS[device_platform],))
    finally:
        _lowering_for_device.reset(token)

"""Sequence mixers: one module per family, each registered by name (see `registry`)."""

from seqmix.mixers.registry import MixerSpec, get_mixer, register_mixer, registered_mixers
from seqmix.mixers import attention, delta_net, gla  # noqa: F401  (each registers its mixers)

__all__ = ["MixerSpec", "get_mixer", "register_mixer", "registered_mixers"]

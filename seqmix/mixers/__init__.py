"""Sequence mixers: one module per family, each registered by name (see `registry`)."""

from seqmix.mixers.registry import MixerSpec, get_mixer, register_mixer, registered_mixers
# Importing a mixer module registers its mixers.
from seqmix.mixers import (  # noqa: F401
    attention, delta_net, feed_forward, gated_conv, gated_deltanet2, gated_deltaproduct, gla, hgrn2, kda,
    liger_attention, lightning, linear_attention, lolcats, mamba2, mla, mom, parallel_hybrid, retnet, rg_lru, rwkv6,
    rwkv7,
)

__all__ = ["MixerSpec", "get_mixer", "register_mixer", "registered_mixers"]

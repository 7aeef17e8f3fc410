"""Sequence mixers: one module per family, each registered by name (see `registry`)."""

from seqmix.mixers.registry import MixerSpec, get_mixer, register_mixer, registered_mixers
# Importing a mixer module registers its mixers.
from seqmix.mixers import (  # noqa: F401
    attention, bmojo, delta_net, feed_forward, gated_conv, gated_deltanet2, gated_deltaproduct, gla, hgrn2, hydra, kda,
    liger_attention, lightning, linear_attention, local_linear_attention, lolcats, longhorn, mamba, mamba2, mla, mom,
    nalaformer, parallel_hybrid, retnet, rg_lru, rwkv6, rwkv7, s4d, spectral_ssm, students,
)

__all__ = ["MixerSpec", "get_mixer", "register_mixer", "registered_mixers"]

"""seqmix: a JAX/Flax training framework for efficient sequence models."""

from seqmix.mixers import register_mixer

__all__ = ["register_mixer"]
__version__ = "0.1.0"

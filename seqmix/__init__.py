"""seqmix: a JAX/Flax training framework for efficient sequence models.

Names are resolved lazily, so that `seqmix.pallas_kernels` imports with jax alone (no flax).
"""

__version__ = "0.1.0"
__all__ = ["from_pretrained", "load_run", "register_mixer"]


def __getattr__(name: str):
    if name == "register_mixer":
        from seqmix.mixers import register_mixer

        return register_mixer
    if name == "from_pretrained":
        from seqmix.models.hf import from_pretrained

        return from_pretrained
    if name == "load_run":
        from seqmix.train.run_loader import load_run

        return load_run
    raise AttributeError(f"module 'seqmix' has no attribute {name!r}")

"""Chunked-scan kernels (reference, XLA, Pallas GPU/TPU) behind one op per family. Importable with jax alone."""

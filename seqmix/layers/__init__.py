"""Building blocks shared by mixers and models: norms, MLPs, rotary embeddings."""

"""Adapters that let other tools drive seqmix models. Each is imported on its own (its third-party
dependency is an optional extra): `seqmix.integrations.lm_eval` for lm-evaluation-harness."""

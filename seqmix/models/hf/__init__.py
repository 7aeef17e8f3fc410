"""Hugging Face checkpoints: `from_pretrained` and `save_pretrained` for Llama, Mistral, Qwen2,
Qwen3-Next, Qwen3.5, OLMo-hybrid, Kimi Linear, Mamba-2, Nemotron-H, Falcon-H1, LFM2, MiniMax and
RecurrentGemma (`checkpoint`); one module per family says how its config and tensors map onto
seqmix's (`family`, `tensors`). What no Hugging Face config describes (linearized students, any
layer pattern) goes to and from seqmix's own format (`seqmix_format`) through the same
`from_pretrained`, and `export_pretrained` picks the format."""

from seqmix.models.hf.checkpoint import (CHECKPOINT_PARAMS, FAMILIES, config_from_hf, export_pretrained,
                                         from_pretrained, hf_config, pretrained_config, read_weights, save_pretrained)
from seqmix.models.hf.tensors import CheckpointError

__all__ = ["CHECKPOINT_PARAMS", "FAMILIES", "CheckpointError", "config_from_hf", "export_pretrained",
           "from_pretrained", "hf_config", "pretrained_config", "read_weights", "save_pretrained"]

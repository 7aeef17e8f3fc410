"""Decoder-only language model assembled from registered mixers (Llama parameter names)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.mlp import GatedMLP
from seqmix.layers.moe import MixtureOfExperts
from seqmix.layers.norms import RMSNorm
from seqmix.layers.partitioning import constrained, logical
from seqmix.models.config import ModelConfig


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: [B, T] int32, restarting at 0 at each segment start."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def _default_positions(segment_ids: jax.Array | None, positions: jax.Array | None) -> jax.Array | None:
    """The forward's positions [B, T]: as given, else the index within each segment; None (each
    mixer's index within the row) when there are neither."""
    if positions is None and segment_ids is not None:
        return positions_from_segments(segment_ids)
    return positions


class Block(nnx.Module):
    """A layer of the model: its mixer, chosen by the layer kind, and its MLP (a gated MLP, or a
    mixture of experts on the layers `config.moe` makes sparse, or none when config.mlp_hidden is
    0), each in a residual. Pre-norm, x + mixer(norm(x)) then + MLP(norm(.)); for the kinds in
    `config.post_norm_layers` post-norm (OLMo-hybrid's attention layers), x + norm(mixer(x)) then
    + norm(MLP(.)); for the kinds in `config.residual_scales` residuals taken after the norms
    (MiniMax), alpha * norm(x) + beta * mixer(norm(x)), then likewise around the MLP."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        kind = config.layer_kinds()[layer_index]
        spec, mixer_config = config.mixer(kind)
        out_std = config.init_std / (2 * config.n_layers) ** 0.5
        norm = lambda: RMSNorm(config.d_model, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
        self.post_norm = kind in config.post_norm_layers
        self.residual_scales = tuple(config.residual_scales[kind]) if kind in config.residual_scales else None
        self.input_layernorm = None if self.post_norm else norm()
        self.self_attn = spec.build(config, mixer_config, layer_index, rngs=rngs)
        if config.learned_initial_state and spec.learns_initial_state:
            self.self_attn.learn_initial_state()
        has_mlp = config.mlp_width > 0
        self.post_attention_layernorm = norm() if has_mlp or self.post_norm else None
        self.post_feedforward_layernorm = norm() if has_mlp and self.post_norm else None
        if not has_mlp:
            self.mlp = None
        elif config.moe is not None and config.moe.sparse(layer_index):
            self.mlp = MixtureOfExperts(config.d_model, config.moe.expert_hidden or config.mlp_width, config.moe,
                                        std=config.init_std, out_std=out_std, rngs=rngs)
        else:
            self.mlp = GatedMLP(config.d_model, config.mlp_width, std=config.init_std, out_std=out_std, rngs=rngs,
                                activation=config.mlp_activation, bias=config.mlp_bias,
                                multipliers=tuple(config.mlp_multipliers))

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        mixed, cache = self.self_attn(self.mixer_input(x), segment_ids=segment_ids, positions=positions, cache=cache)
        return self.after_mixer(x, mixed, segment_ids), cache

    def mixer_input(self, x):
        """What the mixer reads from the block's input x [B, T, D]."""
        return x if self.post_norm else self.input_layernorm(x)

    def after_mixer(self, x, mixed, segment_ids=None):
        """The block's output from its input x and its mixer's output `mixed` (both [B, T, D]);
        segment_ids [B, T] (0 = padding) keep padding out of a mixture of experts' balancing loss."""
        if self.post_norm:
            x = x + self.post_attention_layernorm(mixed)
            return x if self.mlp is None else x + self.post_feedforward_layernorm(self._mlp(x, segment_ids))
        if self.residual_scales is not None:
            mixer_alpha, mixer_beta, mlp_alpha, mlp_beta = self.residual_scales
            # The mixer's input again: under jit XLA computes the norm once.
            x = mixer_alpha * self.input_layernorm(x) + mixer_beta * mixed
            normed = self.post_attention_layernorm(x)
            return mlp_alpha * normed + mlp_beta * self._mlp(normed, segment_ids)
        x = x + mixed
        return x if self.mlp is None else x + self._mlp(self.post_attention_layernorm(x), segment_ids)

    def _mlp(self, x, segment_ids):
        if isinstance(self.mlp, MixtureOfExperts):
            return self.mlp(x, segment_ids=segment_ids)
        return self.mlp(x)


def soft_capped(logits: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma's logit soft-capping: every logit within (-cap, cap)), or
    the logits themselves when cap is None; any shape and float dtype."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _block_output(layer: Block, x, segment_ids, positions):
    """A block's output [B, T, D] in the training forward (no cache)."""
    return layer(x, segment_ids=segment_ids, positions=positions)[0]


# The same, with the block's activations recomputed from its input in the backward pass instead of
# kept from the forward: a differentiated forward holds one [B, T, D] input per block, and the
# activations of one block at a time, at the cost of running each block's forward twice.
_rematerialised_block_output = nnx.remat(_block_output)


class LanguageModel(nnx.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab_size] float32.

    Parameters are float32; the model computes in the dtype of its parameters, so the trainer
    gets bfloat16 compute by casting a copy of them (see `seqmix.train.trainer`).
    remat: the training forward rematerialises each block (`_rematerialised_block_output`): less
    memory under a backward pass, the same values and gradients.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, remat: bool = False):
        self.remat = remat
        self.embedding_multiplier, self.logit_multiplier = config.embedding_multiplier, config.logit_multiplier
        self.logit_soft_cap = config.logit_soft_cap
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.d_model, param_dtype=jnp.float32,
            embedding_init=logical(nnx.initializers.normal(config.init_std), "vocab", "embed"), rngs=rngs,
        )
        self.layers = nnx.List([Block(config, index, rngs=rngs) for index in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
        self.lm_head = None if config.tie_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=None, param_dtype=jnp.float32,
            kernel_init=logical(nnx.initializers.normal(config.init_std), "embed", "vocab"), rngs=rngs,
        )

    def head_kernel(self) -> jax.Array:
        """The output projection [D, vocab] (the embedding's transpose when they are tied) times
        the logit multiplier: `features @ head_kernel()` are the logits before soft-capping."""
        kernel = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return kernel if self.logit_multiplier == 1.0 else kernel * self.logit_multiplier

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        return x if self.embedding_multiplier == 1.0 else x * self.embedding_multiplier

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        logits = (self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)
        logits = constrained(logits, "batch", "length", "vocab")  # the vocabulary split like the head
        return soft_capped(logits if self.logit_multiplier == 1.0 else logits * self.logit_multiplier,
                           self.logit_soft_cap)

    def features(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """The final normalised hidden states [B, T, D] that the head turns into logits
        (`soft_capped(features @ head_kernel(), logit_soft_cap)`): what a loss that never
        materialises [B, T, vocab] starts from (`train.loss.chunked_cross_entropy_sum`)."""
        return self.norm(self._hidden(tokens, segment_ids, positions))

    def _hidden(self, tokens, segment_ids, positions):
        return self.layer_outputs(tokens, segment_ids=segment_ids, positions=positions)[-1]

    def layer_outputs(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> list[jax.Array]:
        """The output [B, T, D] of every block in the training forward (arguments as `__call__`),
        before the final norm: what hidden-state alignment fits a student's blocks to."""
        positions = _default_positions(segment_ids, positions)
        # Between blocks the hidden states are split like the batch (rows, and the length over a
        # sequence axis), whatever the layout of the weights each block meets.
        block_output = _rematerialised_block_output if self.remat else _block_output
        x, outputs = constrained(self._embed(tokens), "batch", "length", None), []
        for layer in self.layers:
            x = constrained(block_output(layer, x, segment_ids, positions), "batch", "length", None)
            outputs.append(x)
        return outputs

    def mixer_inputs_and_outputs(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                                 positions: jax.Array | None = None) -> list[tuple[jax.Array, jax.Array]]:
        """(input, output) [B, T, D] of every layer's mixer in the training forward (arguments
        as `__call__`): what attention transfer fits a converted layer to, layer by layer."""
        positions = _default_positions(segment_ids, positions)
        x, pairs = self._embed(tokens), []
        for layer in self.layers:
            mixer_input = layer.mixer_input(x)
            mixed, _ = layer.self_attn(mixer_input, segment_ids=segment_ids, positions=positions)
            pairs.append((mixer_input, mixed))
            x = layer.after_mixer(x, mixed, segment_ids)
        return pairs

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Training/scoring forward. segment_ids [B, T] (0 = padding) keep packed documents apart;
        positions [B, T] default to the index within each segment (or within the row)."""
        return self._logits(self._hidden(tokens, segment_ids, positions))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list[Any]:
        """Per-layer decoding caches for rows of up to `max_len` tokens (prompt + generated)."""
        return [layer.self_attn.init_cache(batch, max_len, dtype) for layer in self.layers]

    def extend(self, tokens: jax.Array, cache: list[Any], segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, list[Any]]:
        """Appends tokens [B, T] to every row's cached context: prefill (T = prompt length) or a
        decode step (T = 1). segment_ids [B, T] (optional) mark padding with 0, e.g. the left
        padding of prompts of different lengths; no later token sees a padding token, and the
        recurrent states skip them. positions [B, T] int32 (optional): the tokens' positions,
        by default the cached length onward, which counts padding; a left-padded row scores as if
        unpadded only with its positions counted from its first real token (as `generate` does),
        because not every mixer depends on position differences alone (LoLCATs' feature maps of
        rotated queries and keys do not). Returns (logits [B, T, vocab] float32, the updated cache)."""
        if positions is None:
            lengths = cache[0].lengths  # every layer has seen the same tokens
            positions = lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self._embed(tokens)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, segment_ids=segment_ids, positions=positions, cache=layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache

"""Autoregressive generation: one chunked prefill, then cached one-token decode steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Picks a token per row from logits [B, V]: greedy when temperature == 0, otherwise a sample
    from softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches top_p (nucleus sampling). Returns [B] int32."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p (the top token always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, cache_dtype=jnp.float32) -> jax.Array:
    """Continues prompt [B, P] int32 by max_new_tokens tokens; returns [B, P + max_new_tokens]."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length] with length >= 1, got shape {prompt.shape}")
    graphdef, state = nnx.split(model)
    batch, prompt_len = prompt.shape

    @jax.jit
    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
        logits, cache = model.extend(tokens, cache)
        return logits[:, -1], cache

    @jax.jit
    def decode(state, token, cache):
        logits, cache = nnx.merge(graphdef, state).extend(token[:, None], cache)
        return logits[:, -1], cache

    logits, cache = prefill(state, prompt)
    tokens = []
    for key in jax.random.split(rng, max_new_tokens):
        token = sample_token(logits, key, temperature, top_p)
        tokens.append(token)
        if len(tokens) < max_new_tokens:
            logits, cache = decode(state, token, cache)
    return jnp.concatenate([prompt, jnp.stack(tokens, axis=1).astype(prompt.dtype)], axis=1) if tokens else prompt

"""What the linear (recurrent) mixers share: a constant-size decode cache, the choice between the
chunked op and its decode step, and the output head (per-head RMSNorm, optional gate, projection).

A linear mixer subclasses `RecurrentMixer`, sets its state's shape (`init_state`), builds its
q/k/v (and gates) in `__call__`, hands them to `recur`, and the result to `output` (set up by
`init_output`) or its own output head. Every linear mixer can learn its start state
(`mixers.state_tuning`), which `recur` and `init_cache` use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.partitioning import constrained
from seqmix.mixers.attention import KVCache
from seqmix.mixers.state_tuning import LearnsInitialState


@struct.dataclass
class RecurrentCache:
    """state [B, H, K, V] float32 (the recurrence after the tokens seen so far); conv_tails: the
    last inputs of each short convolution, a tuple of [B, width-1, C] (empty without convolutions);
    lengths [B] int32 (tokens seen per row). Nothing here grows with the number of tokens."""

    state: jax.Array
    conv_tails: tuple[jax.Array, ...]
    lengths: jax.Array


@struct.dataclass
class WindowedRecurrentCache:
    """The cache of a recurrence beside a sliding window over the same projections (Liger
    attention, LoLCATs): recurrent, the recurrence's; window, a ring of the last W keys and values
    (None for a Liger layer without its window branch)."""

    recurrent: RecurrentCache
    window: KVCache | None

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: tokens seen per row (both parts have seen the same)."""
        return self.recurrent.lengths


def _head_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a [B, T, H, ...] array (ndim dimensions): batch, length, heads, unsplit."""
    return (("batch", "length", "heads") + (None,) * ndim)[:ndim]


class RecurrentMixer(LearnsInitialState, nnx.Module):
    """Base of the linear mixers: `heads` heads with [key_dim, value_dim] states."""

    # The attributes holding the mixer's ShortConvolutions, in the order its cache keeps their
    # tails (the order `short_convolutions` is handed them).
    CONVOLUTIONS: tuple[str, ...] = ()

    def init_state(self, heads: int, key_dim: int, value_dim: int, memories: int = 1):
        """The recurrence has `memories` states of [key_dim, value_dim] per head (more than one
        for Mixture of Memories' routed memories), memories * heads in all."""
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.state_heads = memories * heads

    def initial_state_shape(self) -> tuple[int, ...]:
        return self.state_heads, self.key_dim, self.value_dim

    def init_output(self, model_config, value_dim: int, *, gated: bool, rngs: nnx.Rngs, eps: float | None = None):
        """The usual output head over `self.heads` heads of value_dim outputs: o_norm (RMSNorm
        over each head, with `eps`, the model's norm_eps when None), g_proj when `gated`
        (y = RMSNorm(o) * silu(x W_g)), o_proj."""
        d_model, width = model_config.d_model, self.heads * value_dim
        out_std = model_config.init_std / (2 * model_config.n_layers) ** 0.5
        gate = projection(d_model, width, ("embed", "heads"), std=model_config.init_std, rngs=rngs) if gated else None
        self.g_proj = nnx.data(gate)  # a submodule or None, a pytree child either way
        self.o_norm = RMSNorm(value_dim, eps=eps or model_config.norm_eps)
        self.o_proj = projection(width, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def split_heads(self, x):
        """[B, T, H * d] -> [B, T, H, d]."""
        return x.reshape(*x.shape[:2], self.heads, -1)

    def recur(self, chunked, step, tokens: dict, cache: RecurrentCache | None, segment_ids, conv_tails=()):
        """Runs the recurrence over new tokens, by the path that suits the call.

        chunked: the chunked op (`chunk_gla`, `chunk_delta_rule`) taking `tokens` as keywords;
        step: its decode step (`gla_step`, `delta_step`); tokens: keyword arrays [B, T, ...] (q,
        k, v, gates, ...; None passes through). Without a cache (training, scoring): one chunked
        call. With one: one decode step for a single unpadded token, otherwise a chunked call from
        the cached state (prefill). Returns (o [B, T, H, V], the updated cache or None).

        Under a mesh the tokens and o are pinned to their logical axes (`token_axes`): heads split
        over the tensor axis, the length over the sequence axis (where the op runs LASP-2).
        """
        tokens = {name: None if x is None else constrained(x, *self.token_axes(name, x))
                  for name, x in tokens.items()}
        if cache is None:
            start = self.start_state(tokens["q"].shape[0])
            learned = {} if start is None else {"initial_state": start}
            out = chunked(**tokens, segment_ids=segment_ids, **learned)
        else:
            if segment_ids is None and tokens["q"].shape[1] == 1:
                out, state = step(**{name: None if x is None else x[:, 0] for name, x in tokens.items()},
                                  state=cache.state)
                out = out[:, None]
            else:
                out, state = chunked(**tokens, segment_ids=segment_ids, initial_state=cache.state,
                                     output_final_state=True)
            cache = RecurrentCache(state=state, conv_tails=conv_tails, lengths=cache.lengths + out.shape[1])
        return constrained(out, *_head_axes(out.ndim)), cache

    def token_axes(self, name: str, x) -> tuple[str | None, ...]:
        """The logical axes of the token array `name` (q, k, v, log_g, ...) that `recur` hands
        the op: the kernels' [batch, length, heads, ...]. A mixer whose tokens are laid out
        otherwise (Mamba's state-sized B and C, Mamba2's grouped ones) says so here."""
        del name
        return _head_axes(x.ndim)

    def short_convolutions(self, x, layers, segment_ids, cache: RecurrentCache | None):
        """silu(conv(x W)) for each (projection, ShortConvolution) pair in `layers`, each conv
        continuing its tail in the cache (in the same order). x [B, T, D]; segment_ids [B, T] or
        None. Returns (a list of [B, T, C] in x's dtype, the tuple of new tails for the cache)."""
        tails = (None,) * len(layers) if cache is None else cache.conv_tails
        convolved = [conv(proj(x), segment_ids=segment_ids, tail=tail) for (proj, conv), tail in zip(layers, tails)]
        return [y for y, _ in convolved], tuple(tail for _, tail in convolved)

    def output(self, out, x):
        """o [B, T, H, V] -> y [B, T, D], gated by x [B, T, D] when the mixer has g_proj."""
        out = self.o_norm(out)
        if self.g_proj is not None:
            out = out * jax.nn.silu(self.split_heads(self.g_proj(x)))
        return self.o_proj(out.reshape(*out.shape[:2], -1))

    def empty_tails(self, batch: int, dtype) -> tuple[jax.Array, ...]:
        """The cache's conv_tails before any token: the empty tail of each of `CONVOLUTIONS`, in
        that order. A mixer that carries other inputs across calls (RWKV's token shift) says so here."""
        return tuple(getattr(self, name).empty_tail(batch, dtype) for name in self.CONVOLUTIONS)

    def init_cache(self, batch: int, max_len: int, dtype) -> RecurrentCache:
        """An empty cache: the state (the learned one, if any) and `empty_tails`; its size does not
        depend on max_len."""
        del max_len
        start = self.start_state(batch)
        state = jnp.zeros((batch, *self.initial_state_shape()), jnp.float32) if start is None else start
        return RecurrentCache(state=state, conv_tails=self.empty_tails(batch, dtype),
                              lengths=jnp.zeros((batch,), jnp.int32))


def decay_parameters(heads: int, rngs: nnx.Rngs, keys_per_head: int = 1) -> tuple[nnx.Param, nnx.Param]:
    """(A_log [H], dt_bias [H * keys_per_head]) of a Mamba2-style decay log a = -exp(A_log)
    softplus(. + dt_bias) (KDA's per-key form: one dt_bias per head and key), in Mamba2's
    initialisation: A ~ U(1, 16), and dt_bias the inverse softplus of a time step drawn
    log-uniformly in [1e-3, 1e-1], so early decays span short and long memories."""
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, 1.0, 16.0)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (heads * keys_per_head,), jnp.float32, math.log(1e-3),
                                    math.log(1e-1)))
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    as_param = lambda value: nnx.Param(value, out_sharding=("heads",), eager_sharding=False)
    return as_param(jnp.log(a)), as_param(dt_bias)


def softplus_log_decay(logits, A_log, dt_bias):
    """log a = -exp(A_log) * softplus(logits + dt_bias), float32, <= 0: logits [B, T, H] with
    `decay_parameters(H)`, or [B, T, H, K] with `decay_parameters(H, keys_per_head=K)` (per key)."""
    rate = jnp.exp(A_log[...]).reshape(A_log.shape + (1,) * (logits.ndim - 3))
    return -rate * jax.nn.softplus(logits.astype(jnp.float32) + dt_bias[...].reshape(logits.shape[2:]))


HEAD_OPTIONS = ("num_heads", "head_dim", "num_v_heads")  # a delta-rule layer's own head geometry


def validate_head_options(config, path: str) -> None:
    """Checks a config's HEAD_OPTIONS: each >= 1 or None (the model's)."""
    for key in HEAD_OPTIONS:
        value = getattr(config, key)
        require(value is None or value >= 1, path, key, f"must be >= 1 or null, got {value}")


def grouped_heads(model_config, config, family: str) -> tuple[int, int, int]:
    """(q/k heads, key head dim, value heads) of a layer whose config has HEAD_OPTIONS: num_heads
    and head_dim default to the model's n_heads and head dim, num_v_heads to num_heads, of which it
    must be a multiple (grouped value heads: value head j reads q/k head j // (value heads / q/k
    heads)). family names the layer in the error."""
    key_heads = config.num_heads or model_config.n_heads
    value_heads = config.num_v_heads or key_heads
    if value_heads % key_heads:
        raise ValueError(f"{family}: num_v_heads = {value_heads} is not a multiple of the {key_heads} q/k heads")
    return key_heads, config.head_dim or model_config.dim_per_head, value_heads

"""B'MOJO: one softmax attention over an eidetic memory (the last W tokens and up to M older tokens
elected for their innovation) and a fading memory (a state space model's read-out).

    q, k, v, c, f = x W_q, x W_k, x W_v, x W_c, x W_f          (H heads of d = D / H channels)
    dt_t   = softplus(x_t W_dt + dt_bias),   log a_t = -exp(A_log) dt_t               (per head)
    S_t    = a_t S_{t-1} + k_t (dt_t v_t)^T,  y_t = d^-1/2 S_t^T c_t     (fading memory: Mamba-2's SSD)
    e_t    = mean over heads and channels of (v_t - y_{t-1})^2     (innovation: what the state did not
                                                                    predict; y_{-1} = 0 at a segment start)
    E_t    = the M tokens s <= t - W of t's segment with the largest (e_s, s)      (eidetic memory)
    w_t    = {s : t - W < s <= t} in t's segment                                   (sliding window)
    o_t    = softmax over j in w_t + E_t of d^-1/2 q~_t . k~_j and the fading token's d^-1/2 q_t . f_t,
             of the values v_j and y_t;         out = o W_o          (q~, k~: q and k under RoPE)

Source: Zancato et al. 2024, "B'MOJO: Hybrid State Space Realizations of Foundation Models with
Eidetic and Fading Memory" (arXiv 2407.06324). B'MOJO runs an SSM (Mamba) over the input for the
fading memory, and an attention over a sliding window of the most recent tokens to which it appends
the SSM's outputs and the older tokens that an innovation test elected: a token that is hard to
predict from the SSM's state is kept in the eidetic memory.
Where this implementation departs from the paper, and why:
- Each query has its own window of W tokens and sees the eidetic set as of itself (the paper's
  implementation works a chunk of tokens at a time), so that decoding a token at a time and the
  training forward see the same keys.
- The innovation test, in a concrete form of the paper's description (its exact predictor is not
  reproduced here): the squared error of the SSM's previous read-out y_{t-1} as a prediction of v_t,
  the state's one-step prediction of the token in value space. The election keeps the top M by
  (score, position) among the tokens that left the window rather than comparing with a threshold:
  the memory never overflows, and a token is elected or evicted by a causal, deterministic rule (the
  top M of a growing set is kept exactly by a stream that inserts each token as it leaves the window
  and drops the least). One election per token, shared by the heads; no gradient flows through it.
- The fading memory enters the softmax as one token per query: y_t as its value and f_t (a
  projection of the query's own input) as its key, instead of SSM output tokens that pass through
  the attention's projections; so one softmax weighs the window, the eidetic tokens and the state.
- No short convolution before the SSM (Mamba's) and no output gate: the window already sees the
  neighbouring tokens that such a convolution mixes in.
The training forward builds [B, T, T] masks from segment ids and cumulative counts of the tokens
that beat each token (O(T^2), as attention's own logits); decoding keeps a constant-size cache:
the recurrent state, the rotated keys, values, scores and positions of the last W tokens and of
the M elected ones, and the previous read-out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.mixers.recurrent import RecurrentCache, RecurrentMixer, decay_parameters
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.gla import chunk_gla, gla_step


@dataclasses.dataclass
class BMojoConfig:
    window: int = 64  # W: the most recent tokens each query sees (itself included)
    memory: int = 16  # M: eidetic slots, the older tokens elected for their innovation
    chunk_size: int = 64  # the SSM's chunked op (a multiple of 16); changes the speed, never the result

    def validate(self, path: str) -> None:
        for key in ("window", "memory"):
            require(getattr(self, key) >= 1, path, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.chunk_size >= 16 and self.chunk_size % 16 == 0, path, "chunk_size",
                f"must be a positive multiple of 16, got {self.chunk_size}")


@struct.dataclass
class HeldTokens:
    """Tokens kept for attention: k (rotated), v [B, N, H, d]; score [B, N] float32 (innovation);
    position [B, N] int32 (index in the row, padding counted); segment [B, N] int32 (0: empty or
    padding)."""

    k: jax.Array
    v: jax.Array
    score: jax.Array
    position: jax.Array
    segment: jax.Array


@struct.dataclass
class BMojoCache:
    """recurrent: the SSM's state (a `RecurrentCache`); window: the last W tokens, oldest first;
    memory: the M eidetic slots (best first); readout [B, H, d] float32: the last token's y, the
    prediction of the next one. Nothing grows with the context."""

    recurrent: RecurrentCache
    window: HeldTokens
    memory: HeldTokens
    readout: jax.Array

    @property
    def lengths(self) -> jax.Array:
        """[B] int32: tokens seen per row."""
        return self.recurrent.lengths


def _concat(*parts: HeldTokens) -> HeldTokens:
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=1), *parts)


def memory_masks(held: HeldTokens, tokens: HeldTokens, *, prefix: int, window: int, memory: int):
    """What each query sees, in position order.

    held: M0 eidetic tokens (all older than every query's window); tokens: N tokens at consecutive
    positions (empty slots aside), the queries being the last T = N - prefix (prefix: the cached
    window before them).
    Returns (visible [B, T, M0 + N] bool over [held, tokens]: each query's window and its eidetic
    set, the top `memory` by (score, position) of the held tokens and of its segment's tokens that
    left its window; elected [B, M0 + N, memory] bool: the eidetic set after the last query (the
    tokens that will have left the window when T more arrive), one-hot in slot = rank).
    """
    both = _concat(held, tokens)
    held_count, count = held.score.shape[1], both.score.shape[1]
    score_u, score_s = both.score[:, :, None], both.score[:, None, :]
    order_u, order_s = both.position[:, :, None], both.position[:, None, :]
    segment_u, segment_s = both.segment[:, :, None], both.segment[:, None, :]
    # beats[u, s]: u, a real token of s's segment, ranks above s (a larger score, ties to the later)
    beats = ((score_u > score_s) | ((score_u == score_s) & (order_u > order_s))) & (segment_u == segment_s)
    beats = (beats & (segment_u != 0)).astype(jnp.int32)
    beaten_by_held = beats[:, :held_count].sum(axis=1)  # [B, M0 + N]
    # The query at token index i has the tokens <= i - W as candidates: a prefix sum over them
    # (an associative scan: XLA:CPU's cumsum of a [T, T] matrix took 8x longer at T = 2048).
    beaten_by_left = jax.lax.associative_scan(jnp.add, beats[:, held_count:], axis=1)  # [B, N, M0 + N]
    shifted = jnp.pad(beaten_by_left, ((0, 0), (window, 0), (0, 0)))[:, prefix:count - held_count]
    ranks = beaten_by_held[:, None, :] + shifted  # [B, T, M0 + N]
    query = jnp.arange(prefix, count - held_count)[:, None]
    key = jnp.arange(count - held_count)[None, :]
    q_segment = tokens.segment[:, prefix:, None]
    same = (q_segment == both.segment[:, None, :]) & (both.segment[:, None, :] != 0)
    left = jnp.concatenate([jnp.ones((len(query), held_count), bool), key <= query - window], axis=1)
    in_window = jnp.concatenate([jnp.zeros((len(query), held_count), bool), (key <= query) & (key > query - window)],
                                axis=1)
    visible = same & (in_window | (left & (ranks < memory)))
    # After the last query: the candidates are the held tokens and the tokens before the last W.
    last = count - held_count - 1 - window
    final_left = jnp.concatenate([jnp.ones((held_count,), bool), jnp.arange(count - held_count) <= last])
    final_rank = beaten_by_held + (beaten_by_left[:, last] if last >= 0 else 0)
    final = final_left & (both.segment != 0) & (final_rank < memory)
    elected = final[:, :, None] & (final_rank[:, :, None] == jnp.arange(memory))
    return visible, elected


@register_mixer("bmojo", BMojoConfig)
class BMojo(RecurrentMixer):
    """x [B, T, D] -> [B, T, D]; n_heads heads of head_dim channels, an SSM state [d, d] per head,
    a window of W tokens and M eidetic slots."""

    def __init__(self, model_config, config: BMojoConfig, *, rngs: nnx.Rngs):
        d_model, heads, head_dim = model_config.d_model, model_config.n_heads, model_config.dim_per_head
        self.init_state(heads, head_dim, head_dim)
        self.window, self.memory, self.chunk_size = config.window, config.memory, config.chunk_size
        self.rope_theta, self.rope_scaling = model_config.rope_theta, model_config.rope_scaling
        self.scale = head_dim ** -0.5
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        heads_projection = functools.partial(projection, d_model, heads * head_dim, ("embed", "heads"), std=std,
                                             rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = heads_projection(), heads_projection(), heads_projection()
        self.c_proj = heads_projection()  # the SSM's read-out (Mamba's C)
        self.f_proj = heads_projection()  # the fading-memory token's key
        self.dt_proj = projection(d_model, heads, ("embed", "heads"), std=std, rngs=rngs)
        self.A_log, self.dt_bias = decay_parameters(heads, rngs)
        self.o_proj = projection(heads * head_dim, d_model, ("heads", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: BMojoCache | None = None):
        """x [B, T, D]; segment_ids [B, T] (0 = padding) or None; positions [B, T] int32 (RoPE's;
        default 0..T-1). Returns (y [B, T, D] in x's dtype, cache).

        With a cache, the T new tokens follow each row's cached context; segment_ids then only
        mark padding, which is never elected and changes no state.
        """
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        q, k, v, c, f = (self.split_heads(proj(x)) for proj in
                         (self.q_proj, self.k_proj, self.v_proj, self.c_proj, self.f_proj))
        dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        tokens = dict(q=c, k=k, v=v.astype(jnp.float32) * dt[..., None], log_a=-jnp.exp(self.A_log[...]) * dt)
        readout, recurrent = self.recur(
            functools.partial(chunk_gla, scale=self.scale, chunk_size=self.chunk_size),
            functools.partial(gla_step, scale=self.scale), tokens, None if cache is None else cache.recurrent,
            segment_ids)
        segment = (jnp.ones((batch, length), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32) if cache is None else (segment_ids != 0).astype(jnp.int32))
        readout = jnp.where(segment[:, :, None, None] != 0, readout.astype(jnp.float32), 0.0)
        # y_{t-1}, zero where t starts a segment (or follows padding: padding reads out zero)
        before = jnp.zeros_like(readout[:, :1]) if cache is None else cache.readout[:, None]
        previous = jnp.concatenate([before, readout[:, :-1]], axis=1)
        if cache is None:
            starts = jnp.concatenate([jnp.ones((batch, 1), bool), segment[:, 1:] != segment[:, :-1]], axis=1)
            previous = jnp.where(starts[:, :, None, None], 0.0, previous)
        score = jnp.mean(jnp.square(v.astype(jnp.float32) - previous), axis=(2, 3))  # [B, T]
        start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
        new = HeldTokens(k=apply_rotary(k, positions, self.rope_theta, self.rope_scaling), v=v, score=score,
                         position=start[:, None] + jnp.arange(length, dtype=jnp.int32), segment=segment)
        if cache is None:
            held, window = self._no_tokens(batch, x.dtype), new
        else:
            held, window = cache.memory, _concat(cache.window, new)  # k, v promoted to the wider dtype
        visible, elected = memory_masks(held, window, prefix=window.score.shape[1] - length, window=self.window,
                                        memory=self.memory)
        out = self._attend(q, apply_rotary(q, positions, self.rope_theta, self.rope_scaling), f, readout,
                           _concat(held, window), visible)
        if cache is not None:
            # Each elected token moves to its slot (a one-hot sum: exact); the last W stay in the window.
            pick = lambda a, slot: jnp.einsum("bsm,bs...->bm...", elected.astype(a.dtype), a).astype(slot.dtype)
            memory = jax.tree.map(pick, _concat(held, window), cache.memory)
            memory = dataclasses.replace(memory, segment=elected.any(axis=1).astype(jnp.int32))
            latest = jax.tree.map(lambda a, slot: a[:, -self.window:].astype(slot.dtype), window, cache.window)
            cache = BMojoCache(recurrent=recurrent, window=latest, memory=memory, readout=readout[:, -1])
        return self.o_proj(out.astype(x.dtype).reshape(batch, length, -1)), cache

    def _attend(self, q, q_rotated, fading_key, fading_value, keys: HeldTokens, visible):
        """o [B, T, H, d] float32: one softmax over the visible keys [B, T, N] (logits of
        q_rotated [B, T, H, d]) and the fading-memory token, which has no position (the logit of
        q [B, T, H, d] and fading_key, the value fading_value [B, T, H, d])."""
        logits = jnp.einsum("bthd,bshd->bhts", q_rotated.astype(jnp.float32), keys.k.astype(jnp.float32)) * self.scale
        logits = jnp.where(visible[:, None], logits, jnp.finfo(jnp.float32).min)
        fading = jnp.einsum("bthd,bthd->bht", q.astype(jnp.float32), fading_key.astype(jnp.float32))[..., None]
        fading = fading * self.scale
        weights = jax.nn.softmax(jnp.concatenate([fading, logits], axis=-1), axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", weights[..., 1:], keys.v.astype(jnp.float32))
        return out + jnp.moveaxis(weights[..., 0], 1, 2)[..., None] * fading_value

    def _no_tokens(self, batch: int, dtype, count: int = 0) -> HeldTokens:
        """`count` empty slots per row."""
        kv = jnp.zeros((batch, count, self.heads, self.key_dim), dtype)
        ints = jnp.zeros((batch, count), jnp.int32)
        return HeldTokens(k=kv, v=kv, score=jnp.zeros((batch, count), jnp.float32), position=ints, segment=ints)

    def init_cache(self, batch: int, max_len: int, dtype) -> BMojoCache:
        """An empty cache: a zero state, W window and M eidetic slots per row, whatever max_len."""
        return BMojoCache(recurrent=super().init_cache(batch, max_len, dtype),
                          window=self._no_tokens(batch, dtype, self.window),
                          memory=self._no_tokens(batch, dtype, self.memory),
                          readout=jnp.zeros((batch, self.heads, self.value_dim), jnp.float32))

"""Softmax attention, causal or (`causal: false`, an encoder's) bidirectional: multi-head or
grouped-query, global or sliding-window, with RoPE on all, part (Qwen3-Next's partial RoPE) or
none (NoPE) of each head's dims, optional q/k RMSNorms (per head as in Qwen3, or over the whole
projection as in OLMo), an optional output gate (Qwen3-Next's gated attention: q_proj gives each
head a query and a gate half, [query_h | gate_h], and the heads' outputs are multiplied by
sigmoid(gate) before o_proj), biases on q/k/v (Qwen2) and on o_proj (RecurrentGemma), and a
multiplier on the keys (Falcon-H1's muP key multiplier).

Masks come from array indices and `segment_ids`: a query attends to keys of its own segment
(never across a packing boundary, never to padding) at or before it, and with a window W to the
W most recent of those (itself included); without causality, to every key of its own segment
(no window, no decode: a token's output then depends on the tokens after it). Decoding appends
to a KV cache of fixed capacity: every token for global attention, a ring buffer of the last W
for windowed attention, each slot flagged real or padding so that left-padded prompts of
different lengths share a batch.

The training forward over whole sequences takes its form from the length and the mesh
(`sequence_attention`): dense logits below BLOCKWISE_FROM tokens, else queries in blocks with an
online softmax and a written-out backward pass (`blockwise_attention`, O(T) memory), split over the
devices of a mesh whose sequence axis divides T in whole blocks (`sequence_parallel_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import lax

from seqmix.configuration import require
from seqmix.layers.linear import projection
from seqmix.layers.norms import RMSNorm
from seqmix.layers.partitioning import constrained
from seqmix.layers.rotary import apply_rotary, row_positions
from seqmix.mixers.registry import register_mixer
from seqmix.pallas_kernels.sequence_parallel import SEQUENCE_AXIS, splits_sequence


QKNorm = Literal["head", "projection"]
BIDIRECTIONAL_DECODE = ("attention with causal: false is not causal (each token reads the tokens after it): it has "
                        "no decode cache, so a model holding it cannot decode or generate; "
                        "train it with objective: mlm")


@dataclasses.dataclass
class AttentionConfig:
    sliding_window: int | None = None  # None: global attention; W: each query sees W tokens
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    output_bias: bool = False  # a bias on o_proj (RecurrentGemma)
    # RMSNorms of q and k before RoPE (the model's norm_unit_offset form): "head", each head's own
    # (Qwen3); "projection", one over all heads of the projection (OLMo); None: no norm
    qk_norm: QKNorm | None = None
    output_gate: bool = False  # out * sigmoid(gate), the gate a second half of each head in q_proj
    rotary_fraction: float = 1.0  # share of each head's dims that RoPE rotates; 0: no positions (NoPE)
    key_multiplier: float = 1.0  # k_proj's output times it, before norms and RoPE (Falcon-H1's muP multiplier)
    # false: each token attends to every token of its segment, before and after it (a bidirectional
    # encoder, trained with objective mlm); such a layer has no decode cache
    causal: bool = True

    def validate(self, path: str) -> None:
        require(self.causal or self.sliding_window is None, path, "sliding_window",
                "must be null when causal is false (bidirectional attention sees its whole segment)")
        require(self.sliding_window is None or self.sliding_window > 0, path, "sliding_window",
                f"must be positive, got {self.sliding_window}")
        require(0.0 <= self.rotary_fraction <= 1.0, path, "rotary_fraction",
                f"must be in [0, 1], got {self.rotary_fraction}")


@struct.dataclass
class KVCache:
    """Keys/values of the tokens seen so far. k, v [B, S, H_kv, D] (S: max_len slots, or W in a
    ring for a sliding window); valid [B, S] bool (the slot holds a real token, not padding or
    nothing yet); lengths [B] int32 (tokens seen per row, padding included)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    lengths: jax.Array


def empty_kv_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    """A cache of `slots` empty slots per row."""
    shape = (batch, slots, kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=jnp.zeros((batch, slots), bool),
                   lengths=jnp.zeros((batch,), jnp.int32))


def attention_mask(q_index, k_index, *, q_segment=None, k_segment=None, window=None, causal=True):
    """Boolean [B, Tq, Tk] mask from absolute indices q_index [B, Tq], k_index [B, Tk] (int32):
    keys at or before the query (every key when not `causal`), the `window` most recent of them.

    Segments [B, T] (0 = padding) restrict keys to the query's own non-padding segment.
    """
    q_idx, k_idx = q_index[:, :, None], k_index[:, None, :]
    mask = k_idx <= q_idx if causal else jnp.ones(q_idx.shape[:2] + k_idx.shape[2:], bool)
    if window is not None:
        mask &= q_idx - k_idx < window
    if q_segment is not None:
        mask &= (q_segment[:, :, None] == k_segment[:, None, :]) & (k_segment[:, None, :] != 0)
    return mask


def softmax_attention(q, k, v, mask, scale):
    """q [B, Tq, H, D], k [B, Tk, H_kv, D], v [B, Tk, H_kv, Dv], mask [B, Tq, Tk] -> [B, Tq, H, Dv]
    in q's dtype.

    Grouped-query heads share a key/value head (query head h uses kv head h // (H / H_kv)).
    Logits and softmax are float32; a query with no visible key (padding) gets uniform weights
    from the finite mask value instead of NaN from an all -inf row.
    """
    weights = jax.nn.softmax(grouped_logits(q, k, mask, scale), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape[:-1] + v.shape[-1:]).astype(q.dtype)


# Query and key blocks of `blockwise_attention`, and the shortest sequence that takes it: on this
# 2-core CPU (fwd+bwd, B = 2, H = 4 over 2 kv heads, D = 32, packed rows, `benchmarks/attention.py`)
# global causal attention took 0.98x the time of `softmax_attention` under the same mask at T = 512,
# 0.67x at 768, 0.48x at 1k and 0.31x at 4k, with an eighth of its temporary bytes at 1k; a
# 512-token window 1.16x at 512, 0.65x at 768 and 0.12x at 4k.
ATTENTION_BLOCK = 256
BLOCKWISE_FROM = 3 * ATTENTION_BLOCK
SMALLEST_BLOCK = 64  # smaller blocks lost more to the loops' steps than they saved (32: 1.3x the time at W = 64)


def block_for(window: int | None) -> int:
    """The block of `blockwise_attention`: ATTENTION_BLOCK, or for a shorter window the power of two
    that holds it (at least SMALLEST_BLOCK), so that a query block reads two key blocks of about
    the window's length instead of two of ATTENTION_BLOCK. At W = 64 and T = 4k (fwd+bwd, as above)
    blocks of 64 took 0.47x the time of blocks of 256; at W = 512, 128 and 256 were level."""
    if window is None or window >= ATTENTION_BLOCK:
        return ATTENTION_BLOCK
    return max(SMALLEST_BLOCK, 1 << (window - 1).bit_length())


def sequence_attention(q, k, v, segment_ids, scale, *, window=None, causal=True):
    """The training forward's attention over whole sequences under `attention_mask`'s mask, in the
    form that suits the length and the ambient mesh: from BLOCKWISE_FROM tokens in blocks
    (`blockwise_attention`: faster here, O(T) memory), split over the devices of a mesh whose
    sequence axis splits T in whole blocks (`sequence_parallel_attention`) or left whole for XLA to
    partition when it splits T otherwise; shorter sequences as dense logits (`softmax_attention`).
    Shapes as `blockwise_attention`."""
    batch, length = q.shape[:2]
    mesh = jax.sharding.get_abstract_mesh()
    if length >= BLOCKWISE_FROM and (causal or window is None):
        if splits_sequence_in_blocks(mesh, length):
            return sequence_parallel_attention(q, k, v, segment_ids, scale, mesh=mesh, window=window, causal=causal)
        if not splits_sequence(mesh, length):
            return blockwise_attention(q, k, v, segment_ids, scale, window=window, causal=causal)
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids, window=window, causal=causal)
    return softmax_attention(q, k, v, mask, scale)


def blockwise_attention(q, k, v, segment_ids, scale, *, window=None, causal=True, block=None):
    """`softmax_attention` of a whole sequence under `attention_mask`'s mask, never holding the
    [T, T] logits: queries in blocks of `block` tokens, each reading the key blocks it can see with
    an online softmax (running maximum and sum, rescaled per key block). The backward pass is
    written out (flash attention's): it keeps only the output and each query's maximum and sum, and
    recomputes each block's weights, so a differentiated call holds O(T) bytes. Causal attention
    skips the key blocks after the query block (half the work), and a window reads only the
    ceil(W / block) + 1 key blocks that can hold its keys: O(T W) work instead of O(T^2).

    q [B, T, H, D], k [B, T, H_kv, D], v [B, T, H_kv, Dv] (grouped heads as `softmax_attention`);
    segment_ids [B, T] (0 = padding) or None. Returns [B, T, H, Dv] in q's dtype. Masked logits hold
    float32's finite minimum (`grouped_logits`): keys a row masks count with weight 1 until its first
    visible key, whose rescaling exp(minimum - peak) = 0 removes them exactly, and a query that sees
    no key (padding) averages the values of the blocks it read, as `softmax_attention` averages every
    value (nothing reads either). Not for a window without causality (each token would read keys at
    any distance ahead). `block` defaults to `block_for(window)`.
    """
    block = block or block_for(window)
    length = q.shape[1]
    padded = -(-length // block) * block
    segments = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    pad = lambda a: jnp.pad(a, [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2))
    # Padding is segment 0, which no query sees.
    pairs = _BlockPairs(padded // block, padded // block, block, window, causal)
    q, k, v, segments = pad(q), pad(k), pad(v), pad(segments)
    return _blocks_of_attention(pairs, scale)(q, k, v, segments, segments, 0)[:, :length]


def sequence_parallel_attention(q, k, v, segment_ids, scale, *, mesh, window=None, causal=True):
    """`blockwise_attention` with T split over the mesh's sequence axis (LASP-2's form for softmax
    layers): each device all-gathers the keys, values and segment ids (O(T) bytes) and attends its
    own queries in blocks against them, so no device holds a [T / n, T] block of logits; the
    gather's transpose sums each key's gradients back onto its shard. Shapes as
    `blockwise_attention`; each device's share of T must be a multiple of ATTENTION_BLOCK
    (`splits_sequence_in_blocks`)."""
    block = block_for(window)  # a divisor of ATTENTION_BLOCK
    segments = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    local_blocks = q.shape[1] // mesh.shape[SEQUENCE_AXIS] // block
    pairs = _BlockPairs(local_blocks, local_blocks * mesh.shape[SEQUENCE_AXIS], block, window, causal)
    attend = _blocks_of_attention(pairs, scale)

    def shard(q, k, v, segments):
        gathered = [lax.all_gather(a, SEQUENCE_AXIS, axis=1, tiled=True) for a in (k, v, segments)]
        return attend(q, *gathered[:2], segments, gathered[2], lax.axis_index(SEQUENCE_AXIS) * local_blocks)

    split = jax.sharding.PartitionSpec(None, SEQUENCE_AXIS)
    return jax.shard_map(shard, mesh=mesh, in_specs=(split,) * 4, out_specs=split, axis_names={SEQUENCE_AXIS},
                         check_vma=False)(q, k, v, segments)


def splits_sequence_in_blocks(mesh, length: int) -> bool:
    """Whether attention over T = `length` tokens runs `sequence_parallel_attention` under `mesh`:
    the mesh splits the sequence (`splits_sequence`) into shares of whole blocks."""
    return splits_sequence(mesh, length) and (length // mesh.shape[SEQUENCE_AXIS]) % ATTENTION_BLOCK == 0


@dataclasses.dataclass(frozen=True)
class _BlockPairs:
    """Which key blocks a query block reads in `blockwise_attention`: the query block at global
    block g reads key blocks max(g - reach + 1, 0) ... g when causal (reach = every block, or the
    ceil(W / block) + 1 that can hold a window's keys), every key block otherwise. Queries are
    `query_blocks` blocks from global block `first` on (a sequence shard's), keys `key_blocks`
    from 0. The forward pass walks a query block's key blocks and the backward pass a key block's
    query blocks, over the same pairs."""

    query_blocks: int
    key_blocks: int
    block: int
    window: int | None
    causal: bool

    @property
    def reach(self) -> int:
        return self.key_blocks if self.window is None else min(self.key_blocks, -(-self.window // self.block) + 1)

    def keys_of(self, query_block, first):
        """(key block indices [reach] to walk, whether each is read [reach] bool) for local query
        block `query_block` of queries starting at global block `first`."""
        if not self.causal:
            return jnp.arange(self.key_blocks), jnp.ones((self.key_blocks,), bool)
        here = first + query_block
        indices = jnp.maximum(here - self.reach + 1, 0) + jnp.arange(self.reach)
        return indices, indices <= here

    def queries_of(self, key_block, first):
        """(local query block indices [reach] to walk, whether each reads key_block [reach] bool)."""
        if not self.causal:
            return jnp.arange(self.query_blocks), jnp.ones((self.query_blocks,), bool)
        indices = key_block - first + jnp.arange(self.reach)
        return jnp.clip(indices, 0, self.query_blocks - 1), (indices >= 0) & (indices < self.query_blocks)


def _blocks_of_attention(pairs: _BlockPairs, scale):
    """attend(q, k, v, q_segments, k_segments, first): `blockwise_attention` of the queries q
    [B, Tq, H, D] at global blocks first ... (a traced int32, 0 for a whole sequence) against keys
    and values from position 0 (k [B, Tk, H_kv, D], v [B, Tk, H_kv, Dv]), Tq and Tk the pairs'
    blocks, segments [B, Tq] and [B, Tk] int32; with its backward pass."""
    block, window, causal = pairs.block, pairs.window, pairs.causal
    in_block = lambda a, index: lax.dynamic_slice_in_dim(a, index * block, block, axis=1)

    def block_logits(q, k, q_segments, k_segments, first, query_block, key_block):
        """The masked logits [B, H_kv, G, block, block] of one local query block against one key
        block, and the mask."""
        batch = q.shape[0]
        positions = lambda index: jnp.broadcast_to(index * block + jnp.arange(block, dtype=jnp.int32), (batch, block))
        mask = attention_mask(positions(first + query_block), positions(key_block),
                              q_segment=in_block(q_segments, query_block), k_segment=in_block(k_segments, key_block),
                              window=window, causal=causal)
        return grouped_logits(in_block(q, query_block), in_block(k, key_block), mask, scale), mask

    def forward(q, k, v, q_segments, k_segments, first):
        """(out [B, Tq, H, Dv] in q's dtype, each query's peak and total [Tq / block, B, H_kv, G,
        block] float32: its largest logit, and the sum of its weights relative to that peak)."""
        batch, length, heads, _ = q.shape
        kv_heads, value_dim = k.shape[2], v.shape[-1]

        def query_block(index):
            def read_key_block(carry, key_block):
                peak, total, out = carry
                logits, _ = block_logits(q, k, q_segments, k_segments, first, index, key_block)
                new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
                weights = jnp.exp(logits - new_peak[..., None])
                rescale = jnp.exp(peak - new_peak)
                out = out * rescale[..., None] + jnp.einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype),
                                                            in_block(v, key_block), preferred_element_type=jnp.float32)
                return new_peak, total * rescale + jnp.sum(weights, axis=-1), out

            def step(carry, key_block_and_read):
                key_block, read = key_block_and_read
                return lax.cond(read, functools.partial(read_key_block, key_block=key_block), lambda c: c, carry), None

            shape = (batch, kv_heads, heads // kv_heads, block)
            start = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape), jnp.zeros(shape + (value_dim,)))
            (peak, total, out), _ = lax.scan(step, start, pairs.keys_of(index, first))
            out = out / total[..., None]  # [B, H_kv, G, block, Dv]; total >= 1: the peak's own weight
            return jnp.moveaxis(out, 3, 1).reshape(batch, block, heads, value_dim).astype(q.dtype), peak, total

        out, peak, total = lax.map(query_block, jnp.arange(pairs.query_blocks))  # out [blocks, B, block, H, Dv]
        return jnp.moveaxis(out, 0, 1).reshape(batch, length, heads, value_dim), peak, total

    def backward(q, k, v, q_segments, k_segments, first, out, peak, total, d_out):
        """(dq, dk, dv) in the inputs' dtypes: per key block, its query blocks' weights recomputed,
        P = exp(logits - peak) / total, and dS = P (dP - rowsum(dO O)) on the visible keys."""
        batch, length, heads, head_dim = q.shape
        kv_heads, value_dim = k.shape[2], v.shape[-1]
        grouped = lambda a: a.reshape(batch, block, kv_heads, heads // kv_heads, a.shape[-1])
        # rowsum(dO O) = rowsum(dP P), per query [Tq / block, B, H_kv, G, block], as peak and total.
        read_out = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        read_out = jnp.moveaxis(read_out.reshape(batch, pairs.query_blocks, block, kv_heads, heads // kv_heads), 2, -1)
        read_out = jnp.moveaxis(read_out, 1, 0)

        def key_block(d_queries, index):
            keys, values = in_block(k, index), in_block(v, index)

            def read_by_query_block(carry, query_block):
                d_queries, d_keys, d_values = carry
                logits, mask = block_logits(q, k, q_segments, k_segments, first, query_block, index)
                weights = jnp.exp(logits - peak[query_block][..., None]) / total[query_block][..., None]
                d_o = grouped(in_block(d_out, query_block)).astype(v.dtype)
                d_values = d_values + jnp.einsum("bkgts,btkgd->bskd", weights.astype(v.dtype), d_o,
                                                 preferred_element_type=jnp.float32)
                d_weights = jnp.einsum("btkgd,bskd->bkgts", d_o, values, preferred_element_type=jnp.float32)
                d_logits = jnp.where(mask[:, None, None], weights * (d_weights - read_out[query_block][..., None]),
                                     0.0) * scale
                d_keys = d_keys + jnp.einsum("bkgts,btkgd->bskd", d_logits.astype(q.dtype),
                                             grouped(in_block(q, query_block)), preferred_element_type=jnp.float32)
                d_q = jnp.einsum("bkgts,bskd->btkgd", d_logits.astype(k.dtype), keys, preferred_element_type=jnp.float32)
                d_queries = lax.dynamic_update_slice_in_dim(
                    d_queries, in_block(d_queries, query_block) + d_q.reshape(batch, block, heads, head_dim),
                    query_block * block, axis=1)
                return d_queries, d_keys, d_values

            def step(carry, query_block_and_read):
                query_block, read = query_block_and_read
                return lax.cond(read, functools.partial(read_by_query_block, query_block=query_block),
                                lambda c: c, carry), None

            start = (d_queries, jnp.zeros((batch, block, kv_heads, head_dim)), jnp.zeros((batch, block, kv_heads, value_dim)))
            (d_queries, d_keys, d_values), _ = lax.scan(step, start, pairs.queries_of(index, first))
            return d_queries, (d_keys, d_values)

        d_queries, (d_keys, d_values) = lax.scan(key_block, jnp.zeros(q.shape), jnp.arange(pairs.key_blocks))
        key_major = lambda a: jnp.moveaxis(a, 0, 1).reshape((batch, k.shape[1]) + a.shape[3:])
        return d_queries.astype(q.dtype), key_major(d_keys).astype(k.dtype), key_major(d_values).astype(v.dtype)

    @jax.custom_vjp
    def attend(q, k, v, q_segments, k_segments, first):
        return forward(q, k, v, q_segments, k_segments, first)[0]

    def attend_forward(q, k, v, q_segments, k_segments, first):
        out, peak, total = forward(q, k, v, q_segments, k_segments, first)
        return out, (q, k, v, q_segments, k_segments, first, out, peak, total)

    def attend_backward(residuals, d_out):
        return *backward(*residuals, d_out), None, None, None

    attend.defvjp(attend_forward, attend_backward)
    return attend


def grouped_logits(q, k, mask, scale):
    """Masked attention logits [B, H_kv, G, Tq, Tk] float32 (G = H / H_kv query heads per kv head)
    of q [B, Tq, H, D] against k [B, Tk, H_kv, D]; masked entries hold float32's finite minimum."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)


def appended(cache: KVCache, k, v, real):
    """The global cache with T new tokens (k/v [B, T, H_kv, ...], real [B, T] bool: not padding)
    written after each row's `lengths`, and the mask [B, T, S] of what each new token attends to:
    the real cached tokens at or before it."""
    length = real.shape[1]
    write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=0))
    cache = KVCache(k=write(cache.k, k.astype(cache.k.dtype), cache.lengths),
                    v=write(cache.v, v.astype(cache.v.dtype), cache.lengths),
                    valid=write(cache.valid, real, cache.lengths), lengths=cache.lengths + length)
    q_index = cache.lengths[:, None] - length + jnp.arange(length, dtype=jnp.int32)
    k_index = jnp.broadcast_to(jnp.arange(cache.k.shape[1], dtype=jnp.int32), cache.valid.shape)
    return cache, attention_mask(q_index, k_index) & cache.valid[:, None, :]


def cached_attention(q, k, v, real, cache: KVCache, scale):
    """Global attention of T new tokens (q [B, T, H, D], k/v [B, T, H_kv, D], real [B, T] bool:
    not padding) appended after each row's `lengths` cached tokens; every token stays cached.
    Returns (out [B, T, H, D], the updated cache)."""
    cache, mask = appended(cache, k, v, real)
    return softmax_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask, scale), cache


def windowed_attention(q, k, v, real, cache: KVCache, scale, *, window: int):
    """Sliding-window attention of T new tokens (shapes as `cached_attention`) against a ring
    buffer of the last W = window keys and values (slot p % W holds position p), which then
    takes the newest of them. Memory stays W tokens per row however long the context grows."""
    keys, values, mask, cache = ring_window(k.astype(q.dtype), v.astype(q.dtype), real, cache, window=window)
    return softmax_attention(q, keys, values, mask, scale), cache


def ring_window(k, v, real, cache: KVCache, *, window: int):
    """What T new tokens (k/v [B, T, H_kv, D], real [B, T] bool) see through a sliding window
    over a ring buffer of the last W = window tokens (slot p % W holds position p).

    Returns (keys, values [B, W + T, H_kv, D]: the ring's slots then the new tokens, in k's dtype;
    mask [B, T, W + T]: what each new token attends to; the ring after taking the newest W).
    """
    length = k.shape[1]
    slots = cache.k.shape[1]
    q_index = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)
    # The position each slot holds: the latest p < lengths with p % W == slot (negative: empty).
    slot = jnp.arange(slots, dtype=jnp.int32)
    held = cache.lengths[:, None] - 1 - (cache.lengths[:, None] - 1 - slot) % slots
    k_index = jnp.concatenate([jnp.where(held >= 0, held, jnp.iinfo(jnp.int32).max), q_index], axis=1)
    mask = attention_mask(q_index, k_index, window=window) & jnp.concatenate([cache.valid, real], axis=1)[:, None, :]
    keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    kept = min(length, slots)  # only the newest W tokens can still be seen later
    write = jax.vmap(lambda buf, new, at: buf.at[at].set(new))
    at = q_index[:, -kept:] % slots
    cache = KVCache(k=write(cache.k, k[:, -kept:].astype(cache.k.dtype), at),
                    v=write(cache.v, v[:, -kept:].astype(cache.v.dtype), at),
                    valid=write(cache.valid, real[:, -kept:], at), lengths=cache.lengths + length)
    return keys, values, mask, cache


@register_mixer("attention", AttentionConfig)
class Attention(nnx.Module):
    """Llama-style self-attention (q_proj, k_proj, v_proj, o_proj), x [B, T, D] -> [B, T, D]."""

    def __init__(self, model_config, config: AttentionConfig, *, rngs: nnx.Rngs):
        d_model, heads, kv_heads = model_config.d_model, model_config.n_heads, model_config.kv_heads
        self.head_dim, self.kv_heads = model_config.dim_per_head, kv_heads
        self.rope_theta, self.rope_scaling = model_config.rope_theta, model_config.rope_scaling
        # An even number of dims: RoPE rotates them in two halves.
        self.rotary_dim = int(self.head_dim * config.rotary_fraction) // 2 * 2
        self.window, self.output_gate, self.causal = config.sliding_window, config.output_gate, config.causal
        self.key_multiplier = config.key_multiplier
        std, out_std = model_config.init_std, model_config.init_std / (2 * model_config.n_layers) ** 0.5
        input_projection = functools.partial(projection, d_model, std=std, rngs=rngs, bias=config.qkv_bias)
        self.q_proj = input_projection(heads * self.head_dim * (2 if config.output_gate else 1), ("embed", "heads"))
        self.k_proj = input_projection(kv_heads * self.head_dim, ("embed", "kv_heads"))
        self.v_proj = input_projection(kv_heads * self.head_dim, ("embed", "kv_heads"))
        self.o_proj = projection(heads * self.head_dim, d_model, ("heads", "embed"), std=out_std, rngs=rngs,
                                 bias=config.output_bias)
        self.norm_over_heads = config.qk_norm == "projection"
        norm = functools.partial(RMSNorm, eps=model_config.norm_eps, unit_offset=model_config.norm_unit_offset)
        widths = (heads * self.head_dim, kv_heads * self.head_dim) if self.norm_over_heads else (self.head_dim,) * 2
        self.q_norm, self.k_norm = (norm(widths[0]), norm(widths[1])) if config.qk_norm else (None, None)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], -1, self.head_dim)

    def _rotated(self, x, norm, positions):
        """Heads [B, T, H, D] of a projection's output, normalised when asked, then rotated."""
        if norm is not None:
            x = norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape) if self.norm_over_heads else norm(x)
        return apply_rotary(x, positions, self.rope_theta, self.rope_scaling, self.rotary_dim)

    def __call__(self, x, *, segment_ids=None, positions=None, cache: KVCache | None = None):
        """x [B, T, D]; segment_ids, positions [B, T] int32. Returns (y [B, T, D], cache).

        Without a cache, attends within x (training, scoring). With a cache, the T new tokens
        are appended after each row's `lengths` and attend to everything cached so far; there
        segment_ids only mark padding (0, e.g. left-padded prompts), which no token attends to.
        """
        batch, length, _ = x.shape
        positions = row_positions(positions, batch, length)
        queries = self.q_proj(x).reshape(batch, length, -1, self.head_dim * (2 if self.output_gate else 1))
        q = self._rotated(queries[..., :self.head_dim], self.q_norm, positions)
        k = self._rotated(self._heads(self.k_proj(x) * self.key_multiplier), self.k_norm, positions)
        v = self._heads(self.v_proj(x))
        # Query heads split over the tensor axis, grouped kv heads too where their count divides
        # it (else replicated: each device then holds every kv head its query heads read).
        q = constrained(q, "batch", "length", "heads", None)
        k, v = (constrained(a, "batch", "length", "kv_heads", None) for a in (k, v))
        out, cache = self.attend(q, k, v, segment_ids=segment_ids, cache=cache)
        out = constrained(out, "batch", "length", "heads", None)
        if self.output_gate:
            out = out * jax.nn.sigmoid(queries[..., self.head_dim:]).astype(out.dtype)
        return self.o_proj(out.reshape(batch, length, -1)), cache

    def attend(self, q, k, v, *, segment_ids, cache: KVCache | None):
        """The attention of `__call__` on rotated q [B, T, H, D], k and v [B, T, H_kv, D].
        Returns (out [B, T, H, D] in q's dtype, the updated cache or None)."""
        batch, length = q.shape[:2]
        scale = self.head_dim ** -0.5
        if cache is None:
            return sequence_attention(q, k, v, segment_ids, scale, window=self.window, causal=self.causal), None
        if not self.causal:
            raise ValueError(BIDIRECTIONAL_DECODE)
        real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
        attend = cached_attention if self.window is None else functools.partial(windowed_attention, window=self.window)
        return attend(q, k, v, real, cache, scale)

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        """An empty cache for `max_len` tokens per row: all of them for global attention, a ring
        of the last `sliding_window` for windowed attention. Refused for bidirectional attention."""
        if not self.causal:
            raise ValueError(BIDIRECTIONAL_DECODE)
        slots = max_len if self.window is None else self.window
        return empty_kv_cache(batch, slots, self.kv_heads, self.head_dim, dtype)

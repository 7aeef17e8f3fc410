"""Building blocks of the kernel families' chunked XLA paths, in the chunk-major layout.

Chunk-major is [N,B,H,C,D] (chunks, batch, heads, chunk length, feature): the batch axes of every
matmul lead and each chunk's [C,D] tile is contiguous, so inputs are transposed once, by plain
copies, and everything after works in place (on CPU a transpose fused into an op that computes exps
runs as a scalar loop, several times slower). Per-token masks broadcast over heads as [N,B,1,C,1].
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.pallas_kernels import layout
from seqmix.pallas_kernels.grouped_heads import repeat_to_value_heads
from seqmix.pallas_kernels.segments import (initial_state_or_zeros, padded_groups, reset_groups, segment_starts,
                                           zero_padded)
from seqmix.pallas_kernels.tile_math import as_row, eye, matmul, matmul_nt, matmul_tn, strictly_causal

CHUNK_AXIS = 3


def chunk_major(a, chunk: int):
    """[B,Tp,H,D] -> [N,B,H,C,D]."""
    batch, padded = a.shape[:2]
    return a.reshape((batch, padded // chunk, chunk) + a.shape[2:]).transpose(1, 0, 3, 2, 4)


def time_major(a):
    """[N,B,H,C,D] -> [B,Tp,H,D]."""
    chunks, batch, heads, chunk, dim = a.shape
    return a.transpose(1, 0, 3, 2, 4).reshape(batch, chunks * chunk, heads, dim)


# The chunk-major names of tile_math's matmuls, which take batches [..., M, K] too: float32
# accumulation, float32 operands at full precision (no TF32/bf16 passes), mm_tn's operand transposed
# explicitly (see `tile_math.matmul_tn`).
mm, mm_nt, mm_tn = matmul, matmul_nt, matmul_tn


# Tokens per piece of a chunk in `prefix_sums` of more than one column.
PREFIX_PIECE = 8


def prefix_sums(x, reverse=False):
    """Inclusive prefix sums along the chunk axis of x [..., C, W] (C a multiple of PREFIX_PIECE).

    `lax.cumsum` lowers on CPU to one `reduce_window` kernel, quadratic in the summed length. A
    one-column x (a per-head gate) is summed that way whole. Wider ones (per-key gates) are summed
    in pieces of PREFIX_PIECE tokens, then the pieces' totals carried along the chunk by a cumsum
    over the C / PREFIX_PIECE pieces: three kernels. An `associative_scan` takes two per level,
    2 log2(C) in all, and XLA compiles each kernel on its own (a program's compile time follows
    its kernel count, benchmarks/compile_time.py). At T = 4k, K = V = 64, against the scan: 23-52
    fewer kernels per fwd+bwd program (KDA 259 -> 236, per-head GLA 182 -> 130), compiled in
    15-33% less time, and the same run time (new / old over three rounds: per-key GLA 1.01-1.03,
    per-head GLA 0.98-1.00, the gated delta rule 0.98-1.02, KDA 0.94-1.03, DPLR 1.00-1.06; per-key
    GLA in pieces of 4 tokens 1.02, of 16 1.12).
    The barriers keep the sums' input and output materialised: left to fuse, XLA re-evaluates the
    producer of the input (exps, products) inside the sums, and the sums inside every consumer,
    which made the GLA backward pass 1.5x slower.
    """
    x = lax.optimization_barrier(x)
    size, width = x.shape[CHUNK_AXIS], x.shape[-1]
    if width == 1:
        return lax.optimization_barrier(lax.cumsum(x, axis=CHUNK_AXIS, reverse=reverse))
    pieces = x.reshape(x.shape[:CHUNK_AXIS] + (size // PREFIX_PIECE, PREFIX_PIECE, width))
    within = lax.cumsum(pieces, axis=CHUNK_AXIS + 1, reverse=reverse)
    totals = lax.cumsum(within[..., :1, :] if reverse else within[..., -1:, :], axis=CHUNK_AXIS, reverse=reverse)
    before = shift(totals, -1 if reverse else 1)  # what the pieces before (after, in reverse) add up to
    return lax.optimization_barrier((within + before).reshape(x.shape))


def shift(x, step: int):
    """Moves entries `step` places along the chunk axis (later if > 0), filling with zeros."""
    size = x.shape[CHUNK_AXIS]
    kept = lax.slice_in_dim(x, 0, size - step, axis=CHUNK_AXIS) if step > 0 else \
        lax.slice_in_dim(x, -step, size, axis=CHUNK_AXIS)
    pad = [(0, 0)] * x.ndim
    pad[CHUNK_AXIS] = (step, 0) if step > 0 else (0, -step)
    return jnp.pad(kept, pad)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gates:
    """A chunk's log decays from log_g [N,B,H,C,W], each summed directly (never as a difference of
    sums, whose gradient cancels large terms): to_here G_i = sum_{s<=i} log_g_s, to_end
    E_j = sum_{s>j} log_g_s, and total [N,B,H,1,W]."""

    to_here: jax.Array
    to_end: jax.Array
    total: jax.Array


def gates(log_g) -> Gates:
    return Gates(
        to_here=prefix_sums(log_g),
        to_end=shift(prefix_sums(log_g, reverse=True), -1),
        total=jnp.sum(log_g, axis=CHUNK_AXIS, keepdims=True),
    )


def gate_cotangent(d_to_here, d_to_end, d_total):
    """d log_g from the cotangents of `Gates`' three sums."""
    return prefix_sums(d_to_here, reverse=True) + shift(prefix_sums(d_to_end), 1) + d_total


def as_row_scale(decay):
    """A chunk's decay [..., 1, W] -> [..., W, 1], scaling the rows (keys) of [K,V] states."""
    return jnp.swapaxes(decay, -1, -2)


def to_width(x, width: int):
    """A per-key cotangent [..., K] summed to a gate's width W (1 for a per-head gate, else K)."""
    return jnp.sum(x, axis=-1, keepdims=True) if width == 1 else x


# Largest decay of a chunk (nats) for which a factored form exp(G_i - G_j) = exp(G_i) exp(-G_j) is
# exact: exp(-G) <= e^60 leaves float32 headroom (max ~e^88) for what multiplies it (|q| |k| in
# GLA's per-key form). Typical gates decay a 64-token chunk by a few nats; only gates below about
# -1 per step exceed it.
FACTORED_SPAN_LIMIT = 60.0


def head_decay(to_here, earlier):
    """A per-head gate's decays exp(G_i - G_j) [N,B,H,C,C] on `earlier` (j < i, same segment), 1 on
    the diagonal, 0 elsewhere, from to_here G [N,B,H,C,1]. The diagonal's 1 stays out of the graph:
    its gradient, +x and -x through G_i, would leave rounding noise larger than the true gate
    gradient under strong decay. Factored (2C exponentials per chunk, not C^2) while no chunk of
    the block decays by more than FACTORED_SPAN_LIMIT nats (G is non-increasing, so its minimum is
    the strongest chunk total); otherwise masked before the exp, so no exponential exceeds 1."""

    def factored(to_here, earlier):
        grown = jnp.swapaxes(jnp.exp(-to_here), -1, -2)
        return jnp.where(earlier, jnp.exp(to_here) * grown, 0.0) + eye(to_here.shape[-2])

    def exact(to_here, earlier):
        exponent = jnp.where(earlier, to_here - jnp.swapaxes(to_here, -1, -2), -jnp.inf)
        return jnp.where(eye(to_here.shape[-2]), 1.0, jnp.exp(exponent))

    return lax.cond(jnp.min(to_here) >= -FACTORED_SPAN_LIMIT, factored, exact, to_here, earlier)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMasks:
    """Who reads whom inside a chunk. earlier [N,B,1,C,C]: j < i in the same segment; reads_state
    [N,B,1,C,1]: the token sees the carried-in state; writes_state: its segment is still open at
    the chunk end; keeps_state [N,B,1,1,1]: the carried-in state survives the chunk. In a kernel
    body, one chunk's [C,C], [C,1], [C,1] and [1,1]."""

    earlier: jax.Array
    reads_state: jax.Array
    writes_state: jax.Array
    keeps_state: jax.Array


def segment_masks(groups) -> SegmentMasks:
    """From chunk-relative reset groups [..., C, 1] int32 (see `segments`): the XLA paths' chunk-major
    [N,B,1,C,1], or one chunk's [C, 1] tile in a kernel body (`tile_math`)."""
    last_group = jnp.max(groups, axis=-2, keepdims=True)  # groups never decrease along a row
    return SegmentMasks(
        earlier=strictly_causal(groups.shape[-2]) & (groups == as_row(groups)),
        reads_state=groups == 0,
        writes_state=groups == last_group,
        keeps_state=last_group == 0,
    )


# --- Sweeping the sequence in blocks of chunks ------------------------------------------------------
# On CPU the blocks are small: their working set stays in cache, and a pass allocates O(block)
# temporaries rather than O(T). XLA's CPU runtime maps large temporary buffers afresh on every call,
# and the page faults of a whole-sequence working set cost a third of the GLA time at T = 4k.
# Accelerators take the whole sequence as one block.

_CPU_BLOCK_ELEMENTS = 2**17  # elements of one [N, B, H, C, D] block array


# On a CPU a lean token-by-token scan is the faster forward while the state stays in the core's
# cache: measured at T = 2k-4k, K = V = 64 (the chunked forward's time / the scan's), with B x H =
# 4 / 8 / 16 / 32 state rows: DPLR 2.5 / 3.1 / 2.2 / 1.1, KDA 1.4 / 1.5 / 1.1 / 1.1-1.3, the gated
# delta rule 1.8 / 1.6 / 1.1 / 0.56. Beyond 16 rows of 64 x 64 the chunked forward. Under a
# backward pass the scan also emits the state entering each chunk: fwd+bwd at T = 4k took 0.78-0.85x
# the time it took after the chunked forward for DPLR, 0.94-0.95x for the gated delta rule, the
# same for KDA.
_CPU_TOKEN_SCAN_STATE_ELEMENTS = 2**16


def block_chunks(batch: int, heads: int, chunks: int, chunk: int, dim: int) -> int:
    """Chunks per block: about _CPU_BLOCK_ELEMENTS per block array on CPU, blocks of equal size."""
    if jax.default_backend() != "cpu":
        return chunks
    target = max(1, min(chunks, _CPU_BLOCK_ELEMENTS // (batch * heads * chunk * dim)))
    blocks = -(-chunks // target)
    return -(-chunks // blocks)


def _take(a, index, length):
    return lax.dynamic_slice_in_dim(a, index * length, length, axis=1)


def _joined(blocks):
    """Per-block results stacked by a scan, [blocks, B, L, ...] -> [B, blocks * L, ...]."""
    return jnp.moveaxis(blocks, 0, 1).reshape((blocks.shape[1], -1) + blocks.shape[3:])


def sweep_forward(block_forward, inputs, state0, length: int):
    """Runs `block_forward(block_inputs, state) -> (out [B,L,...], state, residuals)` over the
    consecutive `length`-token blocks of time-major `inputs` (a tuple of [B,Tp,...]), carrying the
    state. Returns (out [B,Tp,...], final state, residuals stacked per block)."""

    def step(state, index):
        out, state, residuals = block_forward(tuple(_take(a, index, length) for a in inputs), state)
        return state, (out, residuals)

    final, (out, residuals) = lax.scan(step, state0, jnp.arange(inputs[0].shape[1] // length))
    return _joined(out), final, residuals


def sweep_backward(block_backward, inputs, residuals, d_out, d_final, length: int):
    """The reverse of `sweep_forward`: `block_backward(block_inputs, block_residuals, d_out_block,
    d_state) -> (grads, a tuple of [B,L,...], d_state entering the block)`, last block first.
    Returns (grads [B,Tp,...], d_state0)."""

    def step(d_state, index_and_residuals):
        index, block_residuals = index_and_residuals
        block_inputs = tuple(_take(a, index, length) for a in inputs)
        grads, d_state = block_backward(block_inputs, block_residuals, _take(d_out, index, length), d_state)
        return d_state, grads

    d_state0, grads = lax.scan(step, d_final, (jnp.arange(inputs[0].shape[1] // length), residuals), reverse=True)
    return tuple(map(_joined, grads)), d_state0


def scan_tokens(token_step, inputs, state, chunk: int):
    """token_step(*token, state) -> (out, state) run token by token over inputs [B,T,H,...], T a
    multiple of `chunk`. Returns (out [B,T,H,V], the final state, the state entering each
    chunk-long span [T/chunk, ...] for a backward pass to start from). Resets at segment starts are
    the caller's: a decay of 0 in the token's inputs, selected before the scan or per token."""

    def step(state, token):
        out, state = token_step(*token, state)
        return state, out

    def chunk_step(state, tokens):
        outgoing, out = lax.scan(step, state, tokens)
        return outgoing, (out, state)

    by_chunk = lambda x: jnp.swapaxes(x, 0, 1).reshape((x.shape[1] // chunk, chunk, x.shape[0]) + x.shape[2:])
    final, (out, incoming) = lax.scan(chunk_step, state, tuple(map(by_chunk, inputs)))
    return jnp.swapaxes(out.reshape((-1,) + out.shape[2:]), 0, 1), final, incoming


def swept(forward, backward, longest_chunk: int, value_major: bool = False, token_scan=None):
    """A chunked path's whole-sequence op with its written-out VJP, from its per-block math.

    forward(*inputs, state) -> (out [N,B,H,C,V], state, incoming [N,B,H,K,V]: the state entering
    each chunk, [N,B,H,V,K] if value_major) and
    backward(*inputs, incoming, d_out, d_state) -> (grads, a tuple like inputs but for groups, and
    d_state entering the block), both on chunk-major blocks (`chunk_major`) of the float32 inputs
    (q * scale, k, v, *extras, groups [..., 1] int32). Returns
    op(q, k, v, *extras, scale, initial_state, segment_ids, chunk_size): q, k [B,T,Hk,K] (repeated to
    v's heads), v [B,T,H,V], extras [B,T,H,...] -> (o [B,T,H,V] in q.dtype, final state [B,H,K,V]
    float32), differentiable in every float input and initial_state. Chunks are chunk_size tokens
    long, at most longest_chunk. The forward sweep keeps only the state entering each chunk; the
    backward recomputes the rest, block by block in reverse. value_major: the per-block math carries
    states [.., V, K] (`layout.state_in`), the public [B,H,K,V] transposed once here.
    token_scan(*inputs, starts, state, chunk) -> (out [B,T,H,V], final state, the state entering
    each chunk [T/chunk, B,H,...] in forward's layout): the same recurrence token by token on the
    float32 inputs [B,T,H,...] as forward takes them (padding zeroed; T a multiple of chunk), the
    state resetting where starts [B,T] bool (`scan_tokens`). On a CPU it replaces the chunked
    forward while the state is small (`_CPU_TOKEN_SCAN_STATE_ELEMENTS`), for calls that are
    differentiated too: the chunk states it passes on are all the backward pass reads.
    """

    def sweep_forward_blocks(inputs, state0, chunk, block):
        def block_forward(block_inputs, state):
            out, state, incoming = forward(*(chunk_major(a, chunk) for a in block_inputs), state)
            return time_major(out), state, incoming

        return sweep_forward(block_forward, inputs, state0, chunk * block)

    def forward_with_states(inputs, state0, chunk, block, length):
        """(out [B,Tp,H,V], final state, the state entering each chunk stacked per block)."""
        scanned = jax.default_backend() == "cpu" and state0.size <= _CPU_TOKEN_SCAN_STATE_ELEMENTS
        if token_scan is None or not scanned:
            return sweep_forward_blocks(inputs, state0, chunk, block)
        *tensors, groups = inputs
        padded_chunks, chunks = groups.shape[1] // chunk, -(-length // chunk)
        starts = segment_starts(groups[..., 0, 0], chunk)[:, :chunks * chunk]
        out, final, incoming = token_scan(*(x[:, :chunks * chunk] for x in tensors), starts, state0, chunk)
        # Chunks of padding only leave the state as it is.
        incoming = jnp.concatenate([incoming, jnp.broadcast_to(final, (padded_chunks - chunks,) + final.shape)])
        out = jnp.pad(out, ((0, 0), (0, groups.shape[1] - chunks * chunk), (0, 0), (0, 0)))
        return out, final, incoming.reshape((padded_chunks // block, block) + final.shape)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def run(inputs, state0, chunk, block, length):
        out, final, _ = forward_with_states(inputs, state0, chunk, block, length)
        return out, final

    def run_forward(inputs, state0, chunk, block, length):
        out, final, incoming = forward_with_states(inputs, state0, chunk, block, length)
        return (out, final), (inputs, incoming)

    def run_backward(chunk, block, length, residuals, cotangents):
        inputs, incoming = residuals
        d_out, d_final = cotangents

        def block_backward(block_inputs, block_incoming, d_out, d_state):
            block_inputs = tuple(chunk_major(a, chunk) for a in (*block_inputs, d_out))
            grads, d_state = backward(*block_inputs[:-1], block_incoming, block_inputs[-1], d_state)
            return tuple(map(time_major, grads)), d_state

        grads, d_state0 = sweep_backward(block_backward, inputs, incoming, d_out, d_final, chunk * block)
        return (*grads, None), d_state0

    run.defvjp(run_forward, run_backward)

    def op(q, k, v, *extras, scale, initial_state, segment_ids, chunk_size):
        batch, length, heads, value_dim = v.shape
        key_dim, out_dtype = q.shape[-1], q.dtype
        q, k = (repeat_to_value_heads(x, heads) for x in (q, k))
        chunk = min(chunk_size, longest_chunk)
        chunks = -(-length // chunk)
        block = block_chunks(batch, heads, chunks, chunk, key_dim + value_dim)
        padded = -(-chunks // block) * block * chunk
        valid, groups = reset_groups(segment_ids, batch, length)
        inputs = [zero_padded(x, valid, padded, jnp.float32) for x in (q.astype(jnp.float32) * scale, k, v, *extras)]
        if value_major:
            state0 = layout.state_in(initial_state, batch, heads, key_dim, value_dim)
        else:
            state0 = initial_state_or_zeros(initial_state, batch, heads, key_dim, value_dim)
        out, final = run((*inputs, padded_groups(groups, padded, chunk)[..., None]), state0, chunk, block, length)
        return out[:, :length].astype(out_dtype), layout.state_out(final) if value_major else final

    return op

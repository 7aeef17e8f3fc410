"""The (gated) delta rule's per-chunk algebra, defined once: the chunk's UT system, its output, its
state update and their written-out backward pass, for every chunked path: `delta.xla` runs it on
chunk-major batches, `delta.chunk_math` on one chunk's tiles inside both Pallas kernels.

Per chunk, with G_i the inclusive sum of the log decays inside the chunk (a scalar per head, or a
vector over the keys for KDA's per-key gate; products and exponentials below are then per key) and
S the state entering it, the value token t writes is U_t = beta_t (v_t - S'_t^T k_t), with S'_t the
decayed state before token t. Unrolled inside the chunk:

    U_t + beta_t sum_{j<t} (exp(G_t - G_j) k_t).k_j U_j = beta_t (v_t - S^T (exp(G_t) k_t))

a unit lower-triangular system (I + L) U = diag(beta) (V - (exp(G) * K) S), L = diag(beta) A with A
the decayed key products, the UT/WY form of the product of Householder-like factors. Solved once
per chunk for V and exp(G) K, it gives U = values - weights S with S left open; then

    o_t = S^T (exp(G_t) q_t) + sum_{j<=t} (exp(G_t - G_j) q_t).k_j U_j
    S'  = exp(G_C) S + sum_j (exp(G_C - G_j) k_j) U_j^T

The system is solved through its inverse X = (I + L)^-1, built by block doubling
(`triangular.unit_lower_inverse`) in float32, never by the Neumann series of L, whose powers
overflow; the backward pass multiplies by its transpose rather than differentiating the doubling.
Segments cut L, the reads of S and the writes into S' (`chunked.SegmentMasks`).

Rank-polymorphic: every array is [..., C, X], one chunk's [C, X] tiles in a kernel body (`tile_math`:
no reshapes, transposes or slices of a tile, no `lax.linalg`) or chunk-major [N,B,H,C,X] batches
on the XLA path (masks [N,B,1,C,X]); the matmuls are `tile_math`'s, which take both. The state S is
value-major, [..., V, K] float32 (the kernels' layout, shared with GLA; a decay per key scales its
lanes; the XLA path transposes the public [K, V] once, `chunked.swept(value_major=True)`).
What differs per path comes in as arguments, each made by the path itself:
- gates (`chunked.Gates`: to_here G [..., C, W], to_end E [..., C, W], total [..., 1, W]; W = 1 per
  head or no decay, K per key) and the way their cotangents return to the log decays: prefix sums
  on the XLA path, masked sums in a kernel;
- masks (`chunked.SegmentMasks`: earlier [..., C, C], reads_state and writes_state [..., C, 1],
  keeps_state [..., 1, 1] bool);
- the decayed products (key A_ij = sum_d k_id k_jd exp(G_id - G_jd) for j < i, query P_ij the same
  of q_i and k_j for j < i and q_i.k_i for j = i, both [..., C, C] float32 and 0 across segments)
  and their pullback(d_key, d_query) -> (dq, dk, d_to_here): written out on the XLA path (a
  materialised per-head decay matrix, `per_key_decay`), `jax.vjp` of the tile math in a kernel;
- the sequential part: the XLA path scans `step` (and `step_backward`) over the chunks for the
  state only and runs the rest batched over all of them; a kernel runs one chunk at a time.
Inputs: q (already scaled), k [..., C, K], v [..., C, V] in the inputs' dtype (computed in float32);
beta [..., C, 1] float32. Everything returned is float32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqmix.pallas_kernels import chunked
from seqmix.pallas_kernels.chunked import to_width
from seqmix.pallas_kernels.tile_math import matmul, matmul_nt, matmul_tn
from seqmix.pallas_kernels.triangular import unit_lower_inverse


class Carry(NamedTuple):
    """What the state's recurrence reads of a chunk (the XLA path scans over it): values [..., C, V]
    and weights [..., C, K], the solved system (U = values - weights S^T); k_written [..., C, K]:
    exp(E_j) k_j for tokens writing into the state the chunk passes on; chunk_decay [..., 1, W]:
    exp(G_C) if the carried state survives the chunk, else 0."""

    values: jax.Array
    weights: jax.Array
    k_written: jax.Array
    chunk_decay: jax.Array


class Terms(NamedTuple):
    """A chunk's terms: carry (`Carry`); gates and masks as given; key_products, query_products
    [..., C, C] as given; inverse X = (I + diag(beta) key_products)^-1 [..., C, C]; k_read, q_read
    [..., C, K]: exp(G_i) k_i and exp(G_i) q_i for tokens reading the carried state."""

    carry: Carry
    gates: chunked.Gates
    masks: chunked.SegmentMasks
    key_products: jax.Array
    query_products: jax.Array
    inverse: jax.Array
    k_read: jax.Array
    q_read: jax.Array


def terms(q, k, v, beta, gates, masks, products) -> Terms:
    """products: (key_products, query_products) of the path (see the module docstring)."""
    key_products, query_products = products
    k32, q32 = k.astype(jnp.float32), q.astype(jnp.float32)
    exp_here = jnp.exp(gates.to_here)
    inverse = unit_lower_inverse(beta * key_products)
    k_read = jnp.where(masks.reads_state, exp_here * k32, 0.0)
    carry = Carry(
        values=matmul(inverse, beta * v.astype(jnp.float32)), weights=matmul(inverse, beta * k_read),
        k_written=jnp.where(masks.writes_state, jnp.exp(gates.to_end) * k32, 0.0),
        chunk_decay=jnp.where(masks.keeps_state, jnp.exp(gates.total), 0.0),
    )
    return Terms(carry=carry, gates=gates, masks=masks, key_products=key_products, query_products=query_products,
                 inverse=inverse, k_read=k_read, q_read=jnp.where(masks.reads_state, exp_here * q32, 0.0))


def written(carry: Carry, state):
    """U [..., C, V]: the values the chunk's tokens write, given the state [..., V, K] entering it."""
    return carry.values - matmul_nt(carry.weights, state)


def step(carry: Carry, state):
    """The state's recurrence over one chunk: (U [..., C, V], the state leaving it [..., V, K])."""
    values = written(carry, state)
    return values, carry.chunk_decay * state + matmul_tn(values, carry.k_written)


def output(terms: Terms, values, state):
    """o [..., C, V] from U = values [..., C, V] and the state entering the chunk [..., V, K]."""
    return matmul(terms.query_products, values) + matmul_nt(terms.q_read, state)


def output_backward(terms: Terms, d_out):
    """The output's cotangents of U [..., C, V] and of the entering state [..., V, K], from d_out
    [..., C, V]: what `step_backward` adds to the state's own."""
    return matmul_tn(terms.query_products, d_out), matmul_tn(d_out, terms.q_read)


def step_backward(carry: Carry, d_written_by_out, d_state_by_out, d_state_out):
    """The state's recurrence in reverse over one chunk: (d U [..., C, V], d state entering it
    [..., V, K]) from `output_backward`'s two terms and d_state_out [..., V, K], the cotangent of
    the state leaving it."""
    d_written = d_written_by_out + matmul_nt(carry.k_written, d_state_out)
    return d_written, carry.chunk_decay * d_state_out + d_state_by_out - matmul_tn(d_written, carry.weights)


def _row_sums(x):
    """[..., C, D] -> [..., C, 1]."""
    return jnp.sum(x, axis=-1, keepdims=True)


def local_backward(q, k, v, beta, terms: Terms, products_pullback, state, values, d_out, d_written, d_state_out):
    """The chunk's own cotangents, once the recurrence has given the state [..., V, K] entering the
    chunk and d_state_out [..., V, K], the cotangent of the one leaving it, U = values [..., C, V]
    (`written`) and d_written [..., C, V] (`step_backward`): (dq, dk [..., C, K], dv [..., C, V],
    dbeta [..., C, 1], `chunked.Gates` of the cotangents of to_here, to_end and total)."""
    carry, gates, masks = terms.carry, terms.gates, terms.masks
    width = gates.to_here.shape[-1]
    d_q_read = matmul(d_out, state)
    d_k_written = matmul(values, d_state_out)

    # Through the solve: [values | weights] = X [beta v | beta k_read], so d[beta v | beta k_read] =
    # X^T d[values | weights] and dL = -X^T d[values | weights] [values | weights]^T, whose entries
    # outside L's support the products' pullback and key_products drop.
    d_beta_v = matmul_tn(terms.inverse, d_written)
    d_beta_k_read = matmul_tn(terms.inverse, -matmul(d_written, state))
    d_lower = -(matmul_nt(d_beta_v, carry.values) + matmul_nt(d_beta_k_read, carry.weights))
    d_k_read = beta * d_beta_k_read

    # L_ij = beta_i A_ij and o reads P U, A and P the decayed key and query products.
    d_beta = (_row_sums(d_beta_v * v.astype(jnp.float32)) + _row_sums(d_beta_k_read * terms.k_read)
              + _row_sums(d_lower * terms.key_products))
    dq, dk, d_to_here = products_pullback(d_lower * beta, matmul_nt(d_out, values))

    exp_here = jnp.exp(gates.to_here)
    dq = dq + jnp.where(masks.reads_state, exp_here * d_q_read, 0.0)
    dk = (dk + jnp.where(masks.reads_state, exp_here * d_k_read, 0.0)
          + jnp.where(masks.writes_state, jnp.exp(gates.to_end) * d_k_written, 0.0))
    d_gates = chunked.Gates(
        to_here=d_to_here + to_width(d_q_read * terms.q_read + d_k_read * terms.k_read, width),
        to_end=to_width(d_k_written * carry.k_written, width),
        total=to_width(jnp.sum(d_state_out * state, axis=-2, keepdims=True), width) * carry.chunk_decay,
    )
    return dq, dk, beta * d_beta_v, d_beta, d_gates

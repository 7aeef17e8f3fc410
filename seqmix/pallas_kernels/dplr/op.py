"""`chunk_dplr`: the one public op of the DPLR family, and its dispatch."""

import jax

from seqmix.pallas_kernels import checks
from seqmix.pallas_kernels.dplr.local import local_dplr
from seqmix.pallas_kernels.dplr.sequence_parallel import sequence_parallel_dplr
from seqmix.pallas_kernels.sequence_parallel import splits_sequence

CHUNK_MULTIPLE = 16


def chunk_dplr(q, k, v, a, b, *, log_g, scale=None, initial_state=None, segment_ids=None, output_final_state=False,
               chunk_size=64, impl="auto"):
    """The diagonal-plus-low-rank (DPLR) generalized delta rule, chunked (RWKV-7, Gated DeltaNet-2):

        S_t = Diag(exp(log_g_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,    o_t = S_t^T (scale * q_t)

    with S [K, V] (fla's `chunk_dplr_delta_rule` convention: a_t reads the undecayed previous
    state). RWKV-7 sets a = -kappa_hat, b = kappa_hat * in-context learning rate; Gated DeltaNet-2's
    S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T is a = exp(g) * b * k,
    b = -k, v = w * v.

    q, k [B,T,Hk,K] and v [B,T,H,V], bfloat16 or float32 (computed in float32), H a multiple of Hk
    (grouped value heads: value head j reads q/k head j // (H / Hk), see `grouped_heads`); a, b
    [B,T,H,K] (computed in float32); log_g [B,T,H,K] natural-log decays <= 0. The caller keeps the
    recurrence stable (RWKV-7's a, b make Diag + b a^T a contraction). scale defaults to K ** -0.5.
    segment_ids [B,T] int (0 = padding): the state resets to zero where a segment starts; padding
    neither reads nor changes it. initial_state [B,H,K,V] is the state before each row's first
    segment. Any T; chunk_size (a multiple of 16) only changes the speed.
    impl: "auto" (fastest native implementation), "xla", "pallas_gpu", "pallas_tpu" (interpreted
    off their device) or "reference".
    Under a mesh (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` inside jit) whose "sequence"
    axis has several devices and divides T, the op runs sequence-parallel (`sequence_parallel_dplr`:
    one all-gather of per-shard states and transitions).
    Returns o [B,T,H,V] in q's dtype, and final_state [B,H,K,V] float32 (the state at the end of
    each row) when output_final_state.
    """
    op = "chunk_dplr"
    checks.queries_keys_values(op, q, k, v)
    batch, length, _, key_dim = q.shape
    heads, value_dim = v.shape[2:]
    for name, array in (("a", a), ("b", b), ("log_g", log_g)):
        checks.shape(op, name, array, (batch, length, heads, key_dim), "[B,T,H,K] (v's heads, q's K)")
    checks.state_and_segments(op, initial_state, segment_ids, batch, length, heads, key_dim, value_dim)
    checks.chunk_size(op, chunk_size, CHUNK_MULTIPLE)
    scale = key_dim**-0.5 if scale is None else scale
    mesh = jax.sharding.get_abstract_mesh()
    if splits_sequence(mesh, length):
        out, final_state = sequence_parallel_dplr(
            q, k, v, a, b, mesh=mesh, log_g=log_g, scale=scale, initial_state=initial_state,
            segment_ids=segment_ids, output_final_state=True, chunk_size=chunk_size, impl=impl)
    else:
        out, final_state = local_dplr(q, k, v, a, b, log_g, scale=scale, initial_state=initial_state,
                                      segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    return (out, final_state) if output_final_state else out

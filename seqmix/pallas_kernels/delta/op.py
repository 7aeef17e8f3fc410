"""`chunk_delta_rule`: the one public op of the delta-rule family, and its dispatch."""

import jax

from seqmix.pallas_kernels import checks
from seqmix.pallas_kernels.delta.local import local_delta_rule
from seqmix.pallas_kernels.delta.sequence_parallel import sequence_parallel_delta_rule
from seqmix.pallas_kernels.log_gates import log_gate_of
from seqmix.pallas_kernels.sequence_parallel import splits_sequence

CHUNK_MULTIPLE = 16


def chunk_delta_rule(q, k, v, beta, *, log_a=None, log_g=None, scale=None, initial_state=None, segment_ids=None,
                     output_final_state=False, chunk_size=64, impl="auto"):
    """The delta rule (DeltaNet), with log_a the gated delta rule (Gated DeltaNet), with log_g the
    delta rule with a per-key decay (Kimi Delta Attention, KDA), chunked.

        S'_t = Diag(exp(log_g_t)) S_{t-1}   (or exp(log_a_t) S_{t-1}, or S_{t-1})
        S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T,    o_t = S_t^T (scale * q_t)

    q, k [B,T,Hk,K] (k L2-normalised by the caller) and v [B,T,H,V], bfloat16 or float32 (computed
    in float32), H a multiple of Hk (grouped value heads: value head j reads q/k head j // (H / Hk),
    see `grouped_heads`); beta [B,T,H] in (0, 1), or (0, 2) to allow negative eigenvalues; log_a
    [B,T,H] or log_g [B,T,H,K] natural-log decays <= 0 (not both). scale defaults to K ** -0.5.
    segment_ids [B,T] int (0 = padding): the state resets to zero where a segment starts; padding
    neither reads nor changes it. initial_state [B,H,K,V] is the state before each row's first
    segment. Any T; chunk_size (a multiple of 16) only changes the speed.
    impl: "auto" (fastest native implementation), "xla", "pallas_gpu", "pallas_tpu" (interpreted
    off their device) or "reference".
    Under a mesh (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` inside jit) whose
    "sequence" axis has several devices and divides T, the op runs sequence-parallel
    (`sequence_parallel_delta_rule`: one all-gather of per-shard states and transitions).
    Returns o [B,T,H,V] in q's dtype, and final_state [B,H,K,V] float32 (the state at the end of
    each row) when output_final_state.
    """
    op = "chunk_delta_rule"
    checks.queries_keys_values(op, q, k, v)
    batch, length, _, key_dim = q.shape
    heads, value_dim = v.shape[2:]
    checks.shape(op, "beta", beta, v.shape[:3], "[B,T,H] (v's heads)")
    checks.decays(op, log_g, log_a, batch, length, heads, key_dim)
    checks.state_and_segments(op, initial_state, segment_ids, batch, length, heads, key_dim, value_dim)
    checks.chunk_size(op, chunk_size, CHUNK_MULTIPLE)
    scale = key_dim**-0.5 if scale is None else scale
    mesh = jax.sharding.get_abstract_mesh()
    if splits_sequence(mesh, length):
        out, final_state = sequence_parallel_delta_rule(
            q, k, v, beta, mesh=mesh, log_a=log_a, log_g=log_g, scale=scale, initial_state=initial_state,
            segment_ids=segment_ids, output_final_state=True, chunk_size=chunk_size, impl=impl)
    else:
        out, final_state = local_delta_rule(
            q, k, v, beta, log_gate_of(log_g, log_a, beta.shape), scale=scale, initial_state=initial_state,
            segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    return (out, final_state) if output_final_state else out

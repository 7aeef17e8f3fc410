"""`chunk_gla`: the one public op of the gated linear attention family, and its dispatch."""

import jax

from seqmix.pallas_kernels import checks
from seqmix.pallas_kernels.gla import chunk_math
from seqmix.pallas_kernels.gla.local import local_gla
from seqmix.pallas_kernels.gla.sequence_parallel import sequence_parallel_gla
from seqmix.pallas_kernels.log_gates import log_gate_of
from seqmix.pallas_kernels.sequence_parallel import splits_sequence


def chunk_gla(q, k, v, *, log_g=None, log_a=None, scale=None, initial_state=None, segment_ids=None,
              output_final_state=False, chunk_size=64, impl="auto"):
    """Gated linear attention over packed sequences, chunked.

        S_t = diag(exp(log_g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale * q_t)

    q, k [B,T,Hk,K] and v [B,T,H,V], bfloat16 or float32 (computed in float32), H a multiple of Hk
    (grouped value heads: value head j reads q/k head j // (H / Hk), see `grouped_heads`);
    log_g [B,T,H,K] per-key log decay (GLA, HGRN2) or log_a [B,T,H] one per head (RetNet,
    Lightning, Mamba2/SSD), or neither (plain linear attention); natural logs, <= 0.
    scale defaults to K ** -0.5. segment_ids [B,T] int (0 = padding): the state resets to zero where
    a segment starts; padding neither reads nor changes it. initial_state [B,H,K,V] is the state
    before each row's first segment. Any T; chunk_size (a multiple of 16) only changes the speed.
    impl: "auto" (fastest native implementation), "xla", "pallas_gpu", "pallas_tpu" (interpreted
    off their device) or "reference".
    Under a mesh (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` inside jit) whose
    "sequence" axis has several devices and divides T, the op runs sequence-parallel
    (`sequence_parallel_gla`: one all-gather of per-shard states, whatever T).
    Returns o [B,T,H,V] in q's dtype, and final_state [B,H,K,V] float32 (the state at the end of
    each row) when output_final_state.
    """
    op = "chunk_gla"
    checks.queries_keys_values(op, q, k, v)
    batch, length, _, key_dim = q.shape
    heads, value_dim = v.shape[2:]
    checks.decays(op, log_g, log_a, batch, length, heads, key_dim)
    log_gate = log_gate_of(log_g, log_a, v.shape[:3])
    checks.state_and_segments(op, initial_state, segment_ids, batch, length, heads, key_dim, value_dim)
    checks.chunk_size(op, chunk_size, chunk_math.SUB_BLOCK)
    scale = key_dim**-0.5 if scale is None else scale
    mesh = jax.sharding.get_abstract_mesh()
    if splits_sequence(mesh, length):
        out, final_state = sequence_parallel_gla(
            q, k, v, mesh=mesh, log_g=log_g, log_a=log_a, scale=scale, initial_state=initial_state,
            segment_ids=segment_ids, output_final_state=True, chunk_size=chunk_size, impl=impl)
    else:
        out, final_state = local_gla(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                                     segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    return (out, final_state) if output_final_state else out

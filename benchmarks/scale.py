"""Scale-out on 8 fake CPU devices: train-step time and memory per device on the meshes of the
sharding tests, and, from compiled HLO, what sequence parallelism communicates as T grows.

    python benchmarks/scale.py                     # both tables
    python benchmarks/scale.py --skip-steps        # the communication table only

Table 1 trains the small attention, GLA and 3:1 Gated DeltaNet hybrid models with the stock
train step (8 x 512 bytes per step) on meshes (data, fsdp, tensor, sequence). The 8 devices are
host-platform fakes sharing this machine's cores, so step times show the partitioning's
overheads (extra collectives, resharding), not speed-ups; memory per device is XLA's buffer
assignment of the compiled step and is what a real device of the mesh would need.

Table 2 compiles forward + backward of one layer's scan (B=1, H=4, K=V=64) with T split over 8
devices, and sums the bytes the collectives hand each device: LASP-2 (`chunk_gla` with per-key
decay and `chunk_delta_rule` under the mesh: one all-gather of per-shard states, and for the
delta rule [K, K] transitions, whatever T), an all-gather of K and
V over the sequence (what all-gather context parallelism of softmax attention moves), and XLA's
own partitioning of the single-device scan with T sharded (no mesh in scope); beside them, what
XLA's partitioning of one masked softmax attention layer (the hybrids' attention) moves.
"""

import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from seqmix.mixers.attention import attention_mask, softmax_attention  # noqa: E402
from seqmix.pallas_kernels.delta import chunk_delta_rule  # noqa: E402
from seqmix.pallas_kernels.gla import chunk_gla  # noqa: E402
from seqmix.train.compile_check import collective_bytes, compile_train_step  # noqa: E402
from seqmix.train.config import MeshConfig, load_train_config  # noqa: E402
from seqmix.train.evaluate import to_global  # noqa: E402
from seqmix.train.sharding import batch_sharding, describe, make_mesh  # noqa: E402
from seqmix.train.state import create_train_state  # noqa: E402
from seqmix.train.step import make_train_step  # noqa: E402

MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4)]
MODELS = {"attention": "transformer_small", "gla": "gla_small", "gated_deltanet 3:1 hybrid": "hybrid_small"}
HEADS, KEY_DIM = 4, 64


def step_row(model_file: str, shape, steps: int) -> tuple[str, float, int]:
    """(the mesh described, median seconds per train step, peak bytes per device) of
    `model_file` on mesh `shape`."""
    config = load_train_config("configs/runs/shakespeare.yaml", [
        f"model=configs/models/{model_file}.yaml", "data.seq_len=512", "data.batch_size=8", "optim.warmup_steps=0"])
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = make_mesh(MeshConfig(*shape), devices=devices)
    peak = compile_train_step(config, mesh).peak
    train_state = create_train_state(config, mesh)
    step = make_train_step(train_state, mesh, config.compute_dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (1, 8, 513), dtype=np.int32)
    batch = to_global({"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
                       "loss_mask": np.ones((1, 8, 512), np.int32), "segment_ids": np.ones((1, 8, 512), np.int32),
                       "positions": np.broadcast_to(np.arange(512, dtype=np.int32), (1, 8, 512)).copy()},
                      batch_sharding(mesh, leading_dims=1))
    state, metrics = step(train_state.state, batch, None)  # compiles
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return describe(mesh), statistics.median(times), peak


def communication(length: int) -> dict[str, int]:
    """Collective bytes per device of GLA forward + backward at T = length, three ways."""
    mesh = jax.make_mesh((8,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    shape = (1, length, HEADS, KEY_DIM)
    q = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=split)

    def gla_loss(q, k, v, log_g):
        return jnp.sum(chunk_gla(q, k, v, log_g=log_g))

    def under_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.grad(gla_loss, argnums=(0, 1, 2, 3))(*args)

    def gather_keys_values(q, k, v, log_g):
        gather = jax.shard_map(lambda x: jax.lax.all_gather(x, "sequence", axis=1, tiled=True), mesh=mesh,
                               in_specs=PartitionSpec(None, "sequence"), out_specs=PartitionSpec(), check_vma=False)
        return jax.grad(lambda k, v: jnp.sum(gather(k) * gather(v)), argnums=(0, 1))(k, v)

    def attention_loss(q, k, v, segment_ids):
        index = jnp.broadcast_to(jnp.arange(length), (1, length))
        mask = attention_mask(index, index, q_segment=segment_ids, k_segment=segment_ids)
        return jnp.sum(softmax_attention(q, k, v, mask, KEY_DIM ** -0.5))

    def delta_under_mesh(q, k, v, log_a):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.grad(lambda *a: jnp.sum(chunk_delta_rule(*a)), argnums=(0, 1, 2, 3))(
                q, k, v, jax.nn.sigmoid(log_a[..., 0]))

    results = {}
    for name, function in [("lasp2", under_mesh), ("delta_lasp2", delta_under_mesh),
                           ("kv_all_gather", gather_keys_values),
                           ("xla", jax.grad(gla_loss, argnums=(0, 1, 2, 3)))]:
        compiled = jax.jit(function, in_shardings=(split,) * 4).lower(q, q, q, q).compile()
        results[name] = sum(collective_bytes(compiled.as_text()).values())
    segments = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=split)
    compiled = jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2)), in_shardings=(split,) * 4).lower(
        q, q, q, segments).compile()
    results["attention"] = sum(collective_bytes(compiled.as_text()).values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per mesh")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} fake CPU devices on {os.cpu_count()} cores\n")
    if not args.skip_steps:
        print("| model | mesh (data x fsdp x tensor x sequence) | step ms | ratio to 1 device | "
              "peak MiB per device |")
        print("|---|---|---:|---:|---:|")
        for name, model_file in MODELS.items():
            single = None
            for shape in MESHES:
                mesh, seconds, peak = step_row(model_file, shape, args.steps)
                single = single or seconds
                print(f"| {name} | {mesh} | {1000 * seconds:.0f} | {seconds / single:.2f} | {peak / 2**20:.1f} |",
                      flush=True)
        print()
    print(f"One layer's forward + backward, B=1, H={HEADS}, K=V={KEY_DIM}, T over 8 devices: collective bytes "
          "per device\n")
    print("| T | GLA LASP-2 | delta rule LASP-2 | all-gather of K and V | GLA, XLA's own partitioning | "
          "softmax attention, XLA's partitioning | K/V / GLA LASP-2 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        moved = communication(length)
        print(f"| {length} | {moved['lasp2']:,} | {moved['delta_lasp2']:,} | {moved['kv_all_gather']:,} | "
              f"{moved['xla']:,} | {moved['attention']:,} | {moved['kv_all_gather'] / moved['lasp2']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

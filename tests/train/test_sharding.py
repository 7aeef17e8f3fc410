"""Sharded training on 8 fake CPU devices: logical axis rules, parameter and optimizer placement,
one train step on several meshes against a single device, gradient accumulation, bfloat16
compute, and a Trainer run whose checkpoint is restored onto other meshes. The one-step
comparison covers an attention model, a GLA model, a 3:1 Gated DeltaNet hybrid, and a mixture of
experts on meshes with an expert axis.

Train states are built once per mesh and kept on the host; every step starts from a fresh
device copy (the train step donates its state). Compilation dominates the run time (about
5 s per train step compiled on this CPU), so the smoke model is cut to one sliding-window
attention layer (d_model 64, 4 query / 2 kv heads, MLP 192, byte vocabulary).
"""

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix.train.config import MeshConfig, load_train_config
from seqmix.train.data import ByteTokenizer, make_dataset
from seqmix.train.evaluate import to_global
from seqmix.train.inputs import Corpus
from seqmix.train.sharding import batch_sharding, logical_to_spec, make_mesh, state_shardings
from seqmix.train.state import TrainState, create_train_state
from seqmix.train.step import make_train_step
from seqmix.train.trainer import Trainer

pytestmark = pytest.mark.eight_devices

SEQ_LEN = 32
# warmup_steps=0: with warmup the first step's learning rate is 0 and no parameter would move.
RUN = [f"data.seq_len={SEQ_LEN}", "data.batch_size=8", "optim.warmup_steps=0", "sample_tokens=0"]
MODELS = {
    "attention": ["model.n_layers=1", "model.layer_pattern=[local]",
                  "model.mixers={local: {type: attention, sliding_window: 16}}"],
    "gla": ["model.n_layers=1", "model.layer_pattern=[gla]", "model.mixers={}"],
    "gated_deltanet_hybrid": ["model.n_layers=2", "model.mixers={}", "model.layer_pattern=[gated_deltanet, attention]"],
}
MODELS["gated_deltanet_hybrid_remat"] = MODELS["gated_deltanet_hybrid"] + ["remat=true"]
# A mixture of experts behind the attention layer: expert parallelism has a test of its own.
MOE_MODEL = MODELS["attention"] + ["model.moe={num_experts: 4, top_k: 2, expert_hidden: 32, shared_hidden: 16}"]
OVERRIDES = RUN + MODELS["attention"]
MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4)]  # (data, fsdp, tensor, sequence)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum".split()


def _documents(n, seed):
    """Short synthetic documents (4 to ~40 bytes), so that packed rows hold several segments."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 6))) + "." for _ in range(n)]


def _mesh(shape):
    n = int(np.prod(shape))
    return make_mesh(MeshConfig(*shape), devices=jax.devices()[:n])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _names(path):
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flat(state):
    """{path names: leaf} of a (model, optimizer) state, the trailing Variable 'value' dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = _names(path)
        out[names[:-1] if names[-1] == "value" else names] = leaf
    return out


def _moment_param(path):
    """For an optimizer moment path (..., 'mu'|'nu', *param path) the parameter's path, else None."""
    for i, name in enumerate(path):
        if path[0] == "1" and name in ("mu", "nu"):
            return ("0",) + path[i + 1:]
    return None


def _compare_step(new, old, ref_new, ref_old):
    """Worst relative errors of a step's result against the reference step's, per kind of leaf.

    "params": all parameters as one vector (||a - b|| / ||b||). "moments": per Adam mu/nu leaf;
    they start at zero, so after one step they are the (clipped) gradient and its square: a
    well-conditioned check of every gradient. "updates": per parameter leaf, new - old. Adam's
    first step is ~lr * g / (|g| + eps), so elements with |g| near eps = 1e-8 amplify float
    rounding: the update bound is looser, but still fails for a leaf updated wrongly or not at all.
    """
    new, old, ref_new, ref_old = map(_flat, (new, old, ref_new, ref_old))
    assert new.keys() == ref_new.keys()
    moments, updates, param_pairs = 0.0, 0.0, []
    for key in ref_new:
        a, b = np.asarray(new[key]), np.asarray(ref_new[key])
        if b.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=str(key))  # step counters
        elif key[0] == "0":
            param_pairs.append((a.ravel(), b.ravel()))
            ref_delta = b.astype(np.float64) - np.asarray(ref_old[key])
            assert np.linalg.norm(ref_delta) > 0, f"{key} did not change in the reference step"
            updates = max(updates, _rel(a.astype(np.float64) - np.asarray(old[key]), ref_delta))
        else:
            assert _moment_param(key) is not None and np.linalg.norm(b) > 0, key
            moments = max(moments, _rel(a, b))
    params = _rel(np.concatenate([a for a, _ in param_pairs]), np.concatenate([b for _, b in param_pairs]))
    return {"params": params, "moments": moments, "updates": updates}


def _assert_same_step(result, reference):
    (old, new, metrics), (ref_old, ref_new, ref_metrics) = result, reference
    assert bool(metrics["finite"]) and bool(ref_metrics["finite"])
    assert float(metrics["tokens"]) == float(ref_metrics["tokens"])
    assert _rel(metrics["loss"], ref_metrics["loss"]) < 1e-5
    assert _rel(metrics["grad_norm"], ref_metrics["grad_norm"]) < 1e-5
    errors = _compare_step(new, old, ref_new, ref_old)
    assert errors["params"] < 1e-5 and errors["moments"] < 1e-5 and errors["updates"] < 1e-3, errors


class Setup:
    """Shared config, fixed batch, train states per mesh (kept on the host) and step results.
    Meshes are (data, fsdp, tensor, sequence[, expert]) tuples."""

    def __init__(self, model: str):
        self.config = load_train_config("configs/runs/smoke.yaml", RUN + (MOE_MODEL if model == "moe" else MODELS[model]))
        dataset = make_dataset(_documents(60, seed=1), ByteTokenizer(), seq_len=SEQ_LEN, batch_size=8,
                               seed=0, shuffle=True, repeat=True)
        self.batch = next(iter(dataset))  # dict of [8, T] int32
        self._states = {}
        self._results = {}

    def state(self, shape):
        """(mesh, TrainState, host copy of its initial state) on `shape`.

        Built by create_train_state on one device and on data=2 x fsdp=4 (the sharded initialiser
        is tested there); other meshes get the single-device initial state placed by the same
        logical rules (`state_shardings`, as create_train_state does), saving a compilation each.
        """
        if shape not in self._states:
            mesh = _mesh(shape)
            if shape not in ((1, 1, 1, 1), (2, 4, 1, 1)):
                _, single, host_init = self.state((1, 1, 1, 1))
                shardings = state_shardings(single.state, mesh)
                train_state = TrainState(single.graphdef, jax.device_put(host_init, shardings), shardings)
            else:
                train_state = create_train_state(self.config, mesh)
            self._states[shape] = (mesh, train_state, jax.device_get(train_state.state))
        return self._states[shape]

    def step(self, shape, compute_dtype="float32", micro_batches=1):
        """(initial host state, new host state, metrics) of one step on `shape` from the same init."""
        key = (shape, compute_dtype, micro_batches)
        if key not in self._results:
            mesh, train_state, host_init = self.state(shape)
            # [A, B, T]: rows 0..B-1 are micro-batch 0, the next B rows micro-batch 1, ...
            stacked = {k: v.reshape(micro_batches, -1, v.shape[-1]) for k, v in self.batch.items()}
            batch = to_global(stacked, batch_sharding(mesh, leading_dims=1))
            step = make_train_step(train_state, mesh, compute_dtype)
            # A fresh device copy: the step donates its input state.
            new_state, metrics = step(jax.device_put(host_init, train_state.shardings), batch, None)
            self._results[key] = (host_init, jax.device_get(new_state), jax.device_get(metrics), step)
        return self._results[key][:3]


_SETUPS: dict[str, Setup] = {}


def setup_for(model: str) -> Setup:
    """One Setup per model for the whole module (states and step results are reused)."""
    if model not in _SETUPS:
        _SETUPS[model] = Setup(model)
    return _SETUPS[model]


@pytest.fixture(scope="module")
def setup():
    return setup_for("attention")


def test_logical_rules_map_divide_and_drop_unit_axes():
    """Breaks if the rule table or `logical_to_spec` changes: a weight split over the wrong mesh
    axis, an indivisible dimension sharded (XLA error or uneven shards), or size-1 axes kept."""
    mesh = _mesh((1, 4, 2, 1))  # fsdp=4, tensor=2
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 192), mesh)) == ("fsdp", "tensor")
    assert tuple(logical_to_spec(("mlp", "embed"), (192, 64), mesh)) == ("tensor", "fsdp")
    assert tuple(logical_to_spec(("vocab", "embed"), (256, 64), mesh)) == ("tensor", "fsdp")
    # Not divisible: 3 MLP columns on tensor=2, 6 model dims on fsdp=4, 1 kv head on tensor=2.
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 3), mesh)) == ("fsdp", None)
    assert tuple(logical_to_spec(("embed", "mlp"), (6, 192), mesh)) == (None, "tensor")
    assert tuple(logical_to_spec(("embed", "kv_heads"), (64, 1), mesh)) == ("fsdp", None)
    # Norms, unnamed and unknown axes stay replicated.
    assert tuple(logical_to_spec(("norm",), (64,), mesh)) == (None,)
    assert tuple(logical_to_spec((None, "no_such_axis"), (64, 64), mesh)) == (None, None)

    # Axes of size 1 are dropped: on data=8 nothing of a weight is split.
    data_only = _mesh((8, 1, 1, 1))
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 192), data_only)) == (None, None)
    # The batch goes over (data, fsdp) together, only over the axes larger than 1, and not at all
    # when the rows do not divide data * fsdp.
    both = _mesh((2, 4, 1, 1))
    assert tuple(logical_to_spec(("batch", "length"), (16, 32), both)) == (("data", "fsdp"), None)
    assert tuple(logical_to_spec(("batch", "length"), (16, 32), data_only)) == ("data", None)
    assert tuple(logical_to_spec(("batch",), (4,), both)) == (None,)
    assert batch_sharding(both, leading_dims=1).spec == P(None, ("data", "fsdp"), None)
    assert batch_sharding(data_only).spec == P("data", None)
    assert batch_sharding(_mesh((1, 1, 1, 1))).spec == P(None, None)


def test_activations_are_pinned_to_the_batch_under_the_ambient_mesh():
    """`constrained` splits the rows as the batch is inside a step traced under the mesh, and
    leaves an array alone without one (decoding, tests)."""
    from seqmix.layers.partitioning import constrained

    mesh = _mesh((2, 4, 1, 1))
    pinned = lambda x: constrained(x * 2, "batch", "length", None)
    x = np.ones((8, 4, 16), np.float32)
    with jax.set_mesh(mesh):
        out = jax.jit(pinned)(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    np.testing.assert_array_equal(np.asarray(jax.jit(pinned)(x)), 2 * x)


def test_create_train_state_shards_params_and_moments(setup):
    """Breaks if parameters are built replicated (no FSDP memory saving), if Adam's mu/nu are not
    laid out like their parameters (resharding every step, or full copies per device), or if
    norms get split. Also the initial values must not depend on the mesh (same seed, same model)."""
    mesh, train_state, host_init = setup.state((2, 4, 1, 1))  # data=2, fsdp=4
    flat = _flat(train_state.state)
    kernel = flat[("0", "layers", "0", "mlp", "gate_proj", "kernel")]
    assert kernel.shape == (64, 192)
    assert len(kernel.addressable_shards) == 8 and isinstance(kernel.sharding, NamedSharding)
    assert kernel.sharding.spec[0] == "fsdp" and all(s is None for s in kernel.sharding.spec[1:])
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 192)}
    # 4 distinct quarters, each held by the 2 devices of the data axis.
    assert len({s.index for s in kernel.addressable_shards}) == 4
    down = flat[("0", "layers", "0", "mlp", "down_proj", "kernel")]
    assert down.addressable_shards[0].data.shape == (192, 16)
    embedding = flat[("0", "embed_tokens", "embedding")]
    assert embedding.addressable_shards[0].data.shape == (256, 16)

    params = {k: v for k, v in flat.items() if k[0] == "0"}
    norms = [k for k in params if k[-1] == "weight"]  # RMSNorm scales (matrices are kernel/embedding)
    assert len(norms) == 3  # 2 in the block and the final norm
    for key in norms:
        assert all(s is None for s in params[key].sharding.spec), key
        assert params[key].addressable_shards[0].data.shape == params[key].shape
    per_device = sum(v.addressable_shards[0].data.size for v in params.values())
    total = sum(v.size for v in params.values())
    assert per_device < 0.3 * total, (per_device, total)  # every matrix split in 4, norms are tiny

    moments = 0
    for key, leaf in flat.items():
        param_key = _moment_param(key)
        if param_key is None:
            continue
        moments += 1
        param = params[param_key]
        assert leaf.sharding.spec == param.sharding.spec, key
        assert leaf.addressable_shards[0].data.shape == param.addressable_shards[0].data.shape, key
        assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), key
    assert moments == 2 * len(params)

    _, _, single_init = setup.state((1, 1, 1, 1))
    for key, value in _flat(single_init).items():
        np.testing.assert_array_equal(_flat(host_init)[key], value, err_msg=str(key))


# Every mesh for the attention model; GLA on those that split more than the batch (a data split
# treats every layer alike, rows in and rows out); the hybrid (the slowest to compile) on the mesh
# that splits its delta-rule scans over the sequence (LASP-2): data, fsdp and tensor parallelism
# treat its layers as they treat GLA's.
STEP_CASES = ([("attention", shape) for shape in MESHES]
              + [("gla", shape) for shape in MESHES if shape[0] < 8]
              + [("gated_deltanet_hybrid", shape) for shape in MESHES if shape[3] > 1])


@pytest.mark.parametrize("model, shape", STEP_CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
def test_train_step_matches_single_device(model, shape):
    """Breaks if sharding changes the math: a batch split that drops or duplicates rows, a loss
    or token count summed per shard instead of globally, a wrong gradient reduction over data or
    fsdp, a tensor-parallel matmul missing its all-reduce, segment ids split from their tokens,
    a chunked scan or attention split over the sequence axis that loses the state or keys
    crossing a shard boundary, or an optimizer update applied to only some shards."""
    setup = setup_for(model)
    segment_ids = setup.batch["segment_ids"]
    assert (segment_ids.max(axis=1) >= 2).sum() >= 3  # packed rows with several documents
    assert (segment_ids == 0).any()  # and some padding
    if shape[2] > 1:  # tensor parallelism really splits weights (heads, MLP width, vocabulary)
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(setup.state(shape)[1].state)]
        assert sum("tensor" in spec for spec in specs) >= 10
    reference = setup.step((1, 1, 1, 1))
    result = setup.step(shape)
    assert float(result[2]["tokens"]) == float((segment_ids != 0).sum())
    _assert_same_step(result, reference)


def test_a_rematerialised_step_split_over_the_sequence_matches_the_plain_step_on_one_device():
    """`remat=true` recomputes each block in the backward pass, here with the delta-rule scan's
    LASP-2 exchange of states across the sequence shards inside it: breaks if a recomputed block
    differs from the forward it replaces on such a mesh."""
    remat = setup_for("gated_deltanet_hybrid_remat")
    assert remat.config.remat and not setup_for("gated_deltanet_hybrid").config.remat
    _assert_same_step(remat.step((1, 2, 1, 4)), setup_for("gated_deltanet_hybrid").step((1, 1, 1, 1)))


@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 4), (1, 2, 2, 1, 2)], ids=lambda s: "x".join(map(str, s)))
def test_expert_parallel_step_matches_single_device(shape):
    """Breaks if the expert axis changes the math: experts split over devices that lose or
    duplicate a token's expert outputs, a batch split over the expert axis that drops rows, or
    expert weights left replicated (no expert parallelism at all)."""
    setup = setup_for("moe")
    _, train_state, _ = setup.state(shape)
    experts = _flat(train_state.state)[("0", "layers", "0", "mlp", "gate_proj")]
    assert experts.shape == (4, 64, 32) and experts.sharding.spec[0] == "expert"
    assert {s.data.shape[0] for s in experts.addressable_shards} == {4 // shape[4]}
    _assert_same_step(setup.step(shape), setup.step((1, 1, 1, 1)))


def test_gradient_accumulation_matches_one_big_batch(setup):
    """grad_accum=2 micro-batches of 4 rows (batch_size=4, on data=2 x fsdp=2 x tensor=2) against
    grad_accum=1 over the same 8 rows on one device. The halves hold different token counts, so
    averaging per micro-batch, dropping a micro-batch or not dividing by the total all show."""
    counts = (setup.batch["segment_ids"] != 0).reshape(2, 4, -1).sum(axis=(1, 2))
    assert counts[0] != counts[1]
    result = setup.step((2, 2, 2, 1), micro_batches=2)
    assert float(result[2]["tokens"]) == counts.sum()
    _assert_same_step(result, setup.step((1, 1, 1, 1)))


def test_bfloat16_compute_keeps_float32_master_weights(setup):
    """A bfloat16 step on data=2 x fsdp=4 against the float32 step on one device. Breaks if the
    compute cast leaks into the stored state (parameters or Adam moments left bfloat16), if the
    cast is silently skipped (no bf16 in the step), or if bfloat16 costs more than rounding."""
    shape = (2, 4, 1, 1)
    ref_old, ref_new, ref_metrics = setup.step((1, 1, 1, 1))
    old, new, metrics = setup.step(shape, "bfloat16")
    assert bool(metrics["finite"])
    flat_old = _flat(old)
    for key, value in _flat(new).items():
        assert value.dtype == flat_old[key].dtype, key
        assert flat_old[key].dtype.kind != "f" or value.dtype == np.float32, key
    assert _rel(metrics["loss"], ref_metrics["loss"]) < 2e-2
    assert _rel(metrics["grad_norm"], ref_metrics["grad_norm"]) < 2e-2
    errors = _compare_step(new, old, ref_new, ref_old)
    assert errors["moments"] < 5e-2, errors  # gradients within bfloat16 rounding of float32's
    assert errors["params"] < 5e-2, errors
    # ... but not equal to them: float32 steps agree across meshes to ~1e-6 (see above), so a
    # gradient difference of this size shows that the matmuls really ran in bfloat16.
    assert errors["moments"] > 1e-4, errors


def _trainer_config(out_dir):
    return load_train_config("configs/runs/smoke.yaml", OVERRIDES + [
        "steps=4", "log_every=1", "checkpoint.every_steps=2", "checkpoint.keep=2",
        "checkpoint.async_save=true", f"out_dir={out_dir}",
    ])


def test_trainer_checkpoint_restores_onto_other_meshes(tmp_path):
    """A 4-step Trainer run on data=2 x fsdp=4 with async checkpoints, restored on 1 device and
    on fsdp=4. Breaks if a sharded save or restore loses or permutes shards, if the restore
    ignores the target mesh, if the data iterator position is not restored (different next
    batch), or if the optimizer state (moments, step count) does not survive the round trip."""
    corpus = Corpus(ByteTokenizer(), _documents(80, seed=2), [])
    config = _trainer_config(tmp_path / "run")

    trainer = Trainer(config, mesh=_mesh((2, 4, 1, 1)), corpus=corpus)
    init = jax.device_get(trainer.train_state.state)
    result = trainer.run()
    assert result.step == 4 and sorted(result.losses) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in result.losses.values())
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    final = jax.device_get(trainer.train_state.state)
    assert _rel(_flat(final)[("0", "norm", "weight")], _flat(init)[("0", "norm", "weight")]) > 1e-4

    restored = {}
    for shape in [(1, 1, 1, 1), (1, 4, 1, 1)]:
        other = Trainer(config, mesh=_mesh(shape), corpus=corpus)
        for key, value in _flat(jax.device_get(other.train_state.state)).items():
            np.testing.assert_array_equal(value, _flat(init)[key], err_msg=f"init on {shape}: {key}")
        other.restore_latest()
        assert other.step == 4
        target = _flat(other.train_state.shardings)
        for key, value in _flat(other.train_state.state).items():
            assert value.sharding.mesh.shape == other.mesh.shape, key
            assert value.sharding.spec == target[key].spec, key
            np.testing.assert_array_equal(np.asarray(value), _flat(final)[key], err_msg=f"{shape}: {key}")
        restored[shape] = other

    runs = [trainer, *restored.values()]
    # The Trainer's own batching (grad_accum micro-batches from its restored grain iterator).
    batches = [jax.device_get(t._next_batch()) for t in runs]
    for batch in batches[1:]:
        for key in batches[0]:
            np.testing.assert_array_equal(batch[key], batches[0][key], err_msg=key)
    losses = []
    for run, batch in zip(runs, batches):
        placed = to_global(batch, batch_sharding(run.mesh, leading_dims=1))
        _, metrics = run.train_step(run.train_state.state, placed, None)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[0])
    for loss in losses[1:]:
        assert _rel(loss, losses[0]) < 1e-5, losses


def test_a_mixture_of_experts_sorts_each_devices_rows_on_that_device():
    """On 8 devices holding one row each, the dispatch's sorted rows and its grouped matmuls are
    a device's own (XLA:CPU's masked expansion of ragged_dot: [experts, rows, hidden] per device);
    a sort of the whole batch would give every device all 8 rows' copies."""
    from flax import nnx

    from seqmix.configuration import build
    from seqmix.layers.moe import MixtureOfExperts, MoEConfig

    config = build(MoEConfig, {"num_experts": 4, "top_k": 2, "expert_hidden": 64}, "moe")
    moe = MixtureOfExperts(32, 64, config, std=0.1, out_std=0.1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(moe)
    mesh = _mesh((8, 1, 1, 1))
    x = jax.random.normal(jax.random.key(0), (8, 512, 32))

    def forward(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(graphdef, params)(x)

    rows = NamedSharding(mesh, P("data"))
    compiled = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), rows)).lower(params, x).compile()
    one_device_expansion = 4 * 512 * 2 * 64 * 4  # experts x (row's tokens x top_k) x hidden x float32
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * one_device_expansion
    single = nnx.merge(graphdef, params)(x)
    np.testing.assert_allclose(np.asarray(jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), rows))(params, x)),
                               np.asarray(single), rtol=1e-5, atol=1e-5)

"""Schedules and optimizers of seqmix.train.optim, on closed-form values and a tiny NNX model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqmix.train.config import OptimConfig
from seqmix.train.optim import MUON_UPDATE_RMS, make_optimizer, make_schedule

LR = 2e-3
WARMUP = 10
TOTAL = 110  # 100 post-warmup steps; wsd decays over the last 22 (steps 88..110)
SCHEDULES = ["cosine", "linear", "wsd", "rex", "constant"]


def schedule_config(schedule: str, **overrides) -> OptimConfig:
    fields = dict(lr=LR, warmup_steps=WARMUP, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    return OptimConfig(**(fields | overrides))


@pytest.mark.parametrize(
    ("schedule", "step", "factor"),
    [
        # mid-training (p = 0.5): cosine and linear 0.1 + 0.9 / 2; rex 0.1 + 0.9 * 0.5 / 0.75.
        ("cosine", 60, 0.55), ("cosine", TOTAL, 0.1),
        ("linear", 60, 0.55), ("linear", TOTAL, 0.1),
        ("wsd", 60, 1.0), ("wsd", 88, 1.0), ("wsd", 99, 0.55), ("wsd", TOTAL, 0.1),
        ("rex", 60, 0.7), ("rex", TOTAL, 0.1),
        ("constant", 60, 1.0), ("constant", TOTAL, 1.0),
        # cosine at p = 0.25: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
        ("cosine", 35, 0.1 + 0.45 * (1 + np.cos(np.pi / 4))),
    ],
)
def test_schedule_closed_form(schedule, step, factor):
    assert float(make_schedule(schedule_config(schedule), TOTAL)(step)) == pytest.approx(factor * LR, rel=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_warmup(schedule):
    fn = make_schedule(schedule_config(schedule), TOTAL)
    assert float(fn(0)) == 0.0
    assert float(fn(WARMUP // 2)) == pytest.approx(LR / 2, rel=1e-6)
    assert float(fn(WARMUP)) == pytest.approx(LR, rel=1e-6)
    assert float(make_schedule(schedule_config(schedule, warmup_steps=0), TOTAL)(0)) == pytest.approx(LR)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_monotonic_under_jit(schedule):
    values = np.asarray(jax.jit(make_schedule(schedule_config(schedule), TOTAL))(jnp.arange(TOTAL + 20)))
    assert np.all(np.diff(values[: WARMUP + 1]) > 0)
    assert np.all(np.diff(values[WARMUP:]) <= 1e-9)
    assert values[-1] == pytest.approx(LR if schedule == "constant" else 0.1 * LR, rel=1e-5)


def test_wsd_holds_lr_through_stable_phase():
    values = np.asarray(make_schedule(schedule_config("wsd"), TOTAL)(jnp.arange(WARMUP, 89)))
    np.testing.assert_allclose(values, LR, rtol=1e-6)


class Tiny(nnx.Module):
    """Token embedding -> hidden Linear -> RMSNorm -> output head, with seqmix's attribute names,
    and a state space's decay matrix `A_log` (Mamba's name) scaling the hidden features."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 10, d: int = 32, hidden: int = 64):
        self.embed_tokens = nnx.Embed(vocab, d, rngs=rngs)
        self.hidden = nnx.Linear(d, hidden, rngs=rngs)
        self.A_log = nnx.Param(jnp.zeros((hidden, 2)))
        self.norm = nnx.RMSNorm(hidden, rngs=rngs)
        self.lm_head = nnx.Linear(hidden, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        features = self.hidden(self.embed_tokens(tokens)) * jnp.exp(self.A_log[...]).sum(-1)
        return self.lm_head(self.norm(features))


def flat(tree) -> dict[str, np.ndarray]:
    """Copies of the leaves of a param tree (State of Params or of arrays), keyed 'module/name'."""
    return {"/".join(map(str, path)): np.array(value) for path, value in nnx.to_flat_state(nnx.state(tree))}


def flat_params(model) -> dict[str, np.ndarray]:
    return flat(nnx.state(model, nnx.Param))


def step_config(name: str, **overrides) -> OptimConfig:
    """A constant learning rate without warmup or clipping, so one update is easy to predict."""
    fields = dict(name=name, lr=0.1, weight_decay=0.0, grad_clip=0.0, schedule="constant", warmup_steps=0)
    return OptimConfig(**(fields | overrides))


@nnx.jit
def apply(model, optimizer, grads):
    return optimizer.update(model, grads)


def one_update(model, config, grads) -> dict[str, np.ndarray]:
    """Applies one step of `config`'s optimizer to `model`; returns the updates, flattened."""
    return flat(apply(model, nnx.Optimizer(model, make_optimizer(config, 100), wrt=nnx.Param), grads))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_only_on_matrices(name):
    model = Tiny(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))  # no zeros to hide decay
    before = flat_params(model)
    one_update(model, step_config(name, weight_decay=0.5), jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = flat_params(model)
    for key in before:
        factor = 1 - 0.1 * 0.5 if before[key].ndim >= 2 and key != "A_log" else 1.0
        np.testing.assert_allclose(after[key], factor * before[key], rtol=1e-6, err_msg=key)
    assert {key for key in before if before[key].ndim >= 2} == {
        "A_log", "embed_tokens/embedding", "hidden/kernel", "lm_head/kernel"}


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_clipping_bounds_global_norm(scale):
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    grads = jax.tree.map(lambda p: scale * jax.random.normal(jax.random.key(1), p.shape), params)
    config = step_config("adamw", grad_clip=1.0)
    tx = make_optimizer(config, 100)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    # After one step Adam's first moment is (1 - b1) * the gradients it received, i.e. after clipping.
    seen = jax.tree.map(lambda m: m / (1 - config.b1), optax.tree.get(state, "mu"))
    norm = float(optax.tree.norm(grads))
    assert float(optax.tree.norm(seen)) == pytest.approx(min(norm, 1.0), rel=1e-5)


def random_grads(model):
    """Standard-normal gradients for every Param of `model`, as a State of Params."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_muon_orthogonalises_hidden_matrix_only():
    model = Tiny(nnx.Rngs(0))
    grads = random_grads(model)
    # Give the hidden kernel's gradient singular values spread over 1 .. 10^-1.5.
    u, _, vt = np.linalg.svd(np.array(grads["hidden"]["kernel"]), full_matrices=False)
    grads["hidden"]["kernel"][...] = u @ np.diag(np.logspace(0, -1.5, 32)) @ vt
    updates = one_update(model, step_config("muon"), grads)
    grad = flat(grads)

    # Hidden matrix: Newton-Schulz leaves U S' V^T with S'_ii in about [0.5, 1.5] (optax's
    # documented promise), scaled by MUON_UPDATE_RMS * sqrt(max(fan_in, fan_out)) * lr, which
    # makes the update's RMS about MUON_UPDATE_RMS * lr.
    kernel = updates["hidden/kernel"]
    singular = np.linalg.svd(kernel, compute_uv=False) / (0.1 * MUON_UPDATE_RMS * np.sqrt(64))
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert np.sqrt(np.mean(kernel**2)) == pytest.approx(0.1 * MUON_UPDATE_RMS, rel=0.3)
    assert np.sum(kernel * grad["hidden/kernel"]) < 0  # a descent direction

    # Embedding, head, norm, bias and the decay matrix: AdamW, whose first update is -lr * sign(grad).
    for key in ("embed_tokens/embedding", "lm_head/kernel", "norm/scale", "hidden/bias", "A_log"):
        np.testing.assert_allclose(updates[key], -0.1 * jnp.sign(grad[key]), atol=1e-5, err_msg=key)


def test_adamw_first_update_is_sign_everywhere():
    model = Tiny(nnx.Rngs(0))
    grads = random_grads(model)
    updates = one_update(model, step_config("adamw"), grads)
    for key, grad in flat(grads).items():
        np.testing.assert_allclose(updates[key], -0.1 * jnp.sign(grad), atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_fits_least_squares(name):
    model = Tiny(nnx.Rngs(0))
    tokens = jnp.arange(10)
    targets = jax.random.normal(jax.random.key(3), (10, 10))
    config = OptimConfig(name=name, lr=1e-2, warmup_steps=10, schedule="cosine")
    optimizer = nnx.Optimizer(model, make_optimizer(config, 100), wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean((model(tokens) - targets) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    first = float(train_step(model, optimizer))
    for _ in range(99):
        train_step(model, optimizer)
    assert float(loss_fn(model)) < 0.01 * first

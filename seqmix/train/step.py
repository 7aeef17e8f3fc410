"""The jitted train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from seqmix.train.distillation import Teacher, distillation_sums
from seqmix.train.loss import chunked_cross_entropy_sum, cross_entropy_sum
from seqmix.train.mlm import held_out_key, masked_for_mlm, training_key
from seqmix.train.sharding import batch_sharding
from seqmix.train.state import TrainState

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _batch_loss(model_graphdef, params, rest, batch, compute_dtype, loss_chunk_tokens=0, teacher=None):
    """(training loss, (sum of token cross-entropies, token count)) of one micro-batch [B, T],
    computed in compute_dtype. The training loss adds to the cross-entropy sum every `aux_loss`
    the model sows (`nnx.Intermediate`, e.g. MoM's load balancing), each weighted by the token
    count, so that dividing by the total count gives mean cross-entropy + the auxiliary losses.
    loss_chunk_tokens > 0 computes the cross-entropy in blocks of that many tokens from the
    final hidden states, never holding the [B, T, vocab] logits (large vocabularies).
    teacher: (a `distillation.Teacher`, its state) puts the distillation objective, summed
    likewise (`distillation_sums`), in the cross-entropy's place."""
    if compute_dtype is not None:
        # Master weights stay float32; the cast is differentiated through, so gradients
        # come back float32 while every matmul runs in the compute dtype.
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        # Frozen weights (LoRA's base) compute in it too.
        rest = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, rest)
    # copy: the frozen weights' Variables in `rest` were made outside the gradient's trace, and a
    # rematerialised block (the run's `remat`) writes its Variables back after recomputing them,
    # which flax refuses for a Variable of another trace level ("Cannot mutate Param from a
    # different trace level", found with LoRA and remat together).
    model = nnx.merge(model_graphdef, params, rest, copy=True)
    scored = batch["segment_ids"] != 0
    if "loss_mask" in batch:  # the pipeline's: instructions score their responses only
        scored &= batch["loss_mask"] != 0
    if teacher is not None:
        (cross_entropy, count), sown = nnx.capture(distillation_sums, nnx.Intermediate)(
            model, *teacher, batch, scored, loss_chunk_tokens)
    elif loss_chunk_tokens:
        features, sown = nnx.capture(model.features, nnx.Intermediate)(
            batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        cross_entropy, count = chunked_cross_entropy_sum(features, model.head_kernel(), batch["targets"], scored,
                                                         chunk_tokens=loss_chunk_tokens, soft_cap=model.logit_soft_cap)
    else:
        logits, sown = nnx.capture(model, nnx.Intermediate)(
            batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        cross_entropy, count = cross_entropy_sum(logits, batch["targets"], scored)
    aux = sum((jnp.sum(value.astype(jnp.float32)) for path, value in jax.tree_util.tree_leaves_with_path(sown)
               if any(getattr(key, "key", None) == "aux_loss" for key in path)), jnp.float32(0.0))
    return cross_entropy + aux * count, (cross_entropy, count)


def make_train_step(train_state: TrainState, mesh: Mesh, compute_dtype: str, loss_chunk_tokens: int = 0,
                    mlm=None, seed: int = 0, teacher: tuple[Teacher, nnx.State] | None = None):
    """Returns step(state, batch, teacher_state) -> (state, metrics), jitted with the state donated.

    batch: dict of [A, B, T] int32 (A micro-batches accumulated into one update). Gradients of
    the summed loss are accumulated and divided once by the total token count, so A
    micro-batches of B rows give the same update as one batch of A*B rows. A step whose loss,
    gradient norm or updated parameters are not finite leaves the state unchanged and reports
    finite=False. loss_chunk_tokens > 0: the cross-entropy in blocks (see `_batch_loss`).
    mlm (an `MLMConfig`, objective mlm): the batch is masked first (`seqmix.train.mlm`), from `seed`
    and the optimizer's step count. teacher: (a distillation `Teacher`, its state on the mesh): the
    step optimises the distillation objective, which metrics["loss"] then reports; the teacher's
    state (None without one) is an argument of the step, not a constant compiled into it.
    """
    graphdef, dtype = train_state.graphdef, COMPUTE_DTYPES[compute_dtype]

    def step(state, batch, teacher_state):
        # copy: the optimizer updates the merged Variables in place, and `state` must keep
        # the old values for a skipped (non-finite) step.
        model, optimizer = nnx.merge(graphdef, state, copy=True)
        if mlm is not None:
            batch = masked_for_mlm(batch, training_key(seed, optimizer.step[...]), rate=mlm.mask_rate,
                                   mask_token=mlm.mask_token)
        model_graphdef, params, rest = nnx.split(model, train_state.trainable, ...)
        grad_fn = jax.value_and_grad(
            lambda p, micro: _batch_loss(model_graphdef, p, rest, micro, dtype, loss_chunk_tokens,
                                         None if teacher is None else (teacher[0], teacher_state)), has_aux=True
        )

        def accumulate(carry, micro):
            grad_sum, loss_sum, ce_sum, count = carry
            (loss, (cross_entropy, tokens)), grads = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, ce_sum + cross_entropy,
                    count + tokens), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, loss_sum, ce_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0), batch)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        loss, cross_entropy, grad_norm = loss_sum / count, ce_sum / count, optax.tree.norm(grads)
        optimizer.update(model, grads)
        # An update can overflow even from finite gradients (a huge learning rate), so the
        # updated parameters are checked too.
        param_norm = optax.tree.norm(nnx.state(model, nnx.Param))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        updated = nnx.state((model, optimizer))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        # "loss" stays the cross-entropy, comparable across models; "aux_loss" is what the
        # model's auxiliary losses added to the optimised total.
        # "tokens": what the step read (under mlm, every real token, not only the masked ones it scores)
        read = count if mlm is None else jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
        metrics = {"loss": cross_entropy, "aux_loss": loss - cross_entropy, "grad_norm": grad_norm, "tokens": read,
                   "finite": finite, "param_norm": param_norm}
        return new_state, metrics

    teacher_shardings = None if teacher is None else jax.tree.map(lambda x: x.sharding, teacher[1])
    return jax.jit(
        _under_mesh(step, mesh),
        in_shardings=(train_state.shardings, batch_sharding(mesh, leading_dims=1), teacher_shardings),
        out_shardings=(train_state.shardings, None),
        donate_argnums=0,
    )


def make_eval_step(train_state: TrainState, mesh: Mesh, compute_dtype: str, loss_chunk_tokens: int = 0, mlm=None):
    """Returns eval(state, batch [B, T], index) -> (sum of token losses, token count) of the model
    in a train state (`make_model_eval_step`)."""
    model = nnx.merge(train_state.graphdef, train_state.state)[0]
    evaluate = make_model_eval_step(nnx.graphdef(model), train_state.shardings[0], mesh, compute_dtype,
                                    loss_chunk_tokens, mlm)
    return lambda state, batch, index: evaluate(state[0], batch, index)


def make_model_eval_step(graphdef: nnx.GraphDef, shardings: nnx.State, mesh: Mesh, compute_dtype: str,
                         loss_chunk_tokens: int = 0, mlm=None):
    """Returns eval(model_state, batch [B, T], index) -> (sum of token losses, token count), jitted,
    for a model split into graphdef and a state laid out by `shardings`; index: the batch's place in
    the held-out pass, which fixes its masking under `mlm`."""
    dtype = COMPUTE_DTYPES[compute_dtype]

    def evaluate(state, batch, index):
        if mlm is not None:
            batch = masked_for_mlm(batch, held_out_key(index), rate=mlm.mask_rate, mask_token=mlm.mask_token)
        model_graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
        _, (cross_entropy, count) = _batch_loss(model_graphdef, params, rest, batch, dtype, loss_chunk_tokens)
        return cross_entropy, count

    return jax.jit(_under_mesh(evaluate, mesh), in_shardings=(shardings, batch_sharding(mesh), None))


def _under_mesh(function, mesh: Mesh):
    """`function` traced with `mesh` ambient, so that ops which split sequences over its
    sequence axis (`chunk_gla`, LASP-2) find it."""
    @functools.wraps(function)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args)
    return traced

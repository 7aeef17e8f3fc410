"""The training step the model benchmarks share: masked next-token cross-entropy, AdamW, as a
pure function of (parameters, optimizer state, batch) so that it can be compiled ahead of time
and its memory read from XLA's buffer assignment."""

import jax
import optax
from flax import nnx

from seqmix.train.loss import cross_entropy_sum


def adamw_training(model: nnx.Module, learning_rate, trainable=nnx.Param):
    """(step, params, opt_state) for a model: step(params, opt_state, inputs, targets, scored) ->
    (params, opt_state, loss) is one AdamW step (weight decay 0.1) on the mean cross-entropy over
    the scored tokens (inputs, targets [B, T] int32, scored [B, T] bool), to be jitted. Only the
    `trainable` variables (e.g. nnx.LoRAParam) are optimised; the rest stays as it is."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    optimizer = optax.adamw(learning_rate, weight_decay=0.1)

    def loss_fn(params, inputs, targets, scored):
        total, count = cross_entropy_sum(nnx.merge(graphdef, params, frozen)(inputs), targets, scored)
        return total / count

    def step(params, opt_state, inputs, targets, scored):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, scored)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, optimizer.init(params)

"""How the model benchmarks train: with the trainer's own step (`seqmix.train.step.make_train_step`,
the loss, optimizer and non-finite guard that `seqmix train` compiles) on one device, so that a
benchmark's figures are those of the step a user runs."""

import jax
import numpy as np

from seqmix.models.config import ModelConfig
from seqmix.train.config import OptimConfig, TrainConfig
from seqmix.train.sharding import make_mesh
from seqmix.train.state import create_train_state
from seqmix.train.step import make_train_step


def stock_training(model: ModelConfig, *, steps: int, lr: float, warmup_steps: int, seed: int = 0,
                   remat: bool = False):
    """(step, train_state) for training `model` from scratch (its weights from `seed`) for `steps`
    steps on the first device: AdamW (b2 0.999, weight decay 0.1 on matrices and embeddings), no
    gradient clipping, `warmup_steps` of linear warmup to `lr`, then a cosine decay to 0 (warmup
    0: a constant `lr`), the blocks rematerialised with `remat` (the run's option).
    step(train_state.state, batch, None) -> (state, metrics) is jitted with the state donated;
    batch: `as_batch`'s."""
    optim = OptimConfig(lr=lr, b2=0.999, grad_clip=0.0, warmup_steps=warmup_steps, min_lr_ratio=0.0,
                        schedule="cosine" if warmup_steps else "constant")
    config = TrainConfig(model=model, optim=optim, steps=steps, seed=seed, remat=remat)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    train_state = create_train_state(config, mesh)
    return make_train_step(train_state, mesh, config.compute_dtype), train_state


def as_batch(inputs, targets, scored) -> dict:
    """The step's batch of one micro-batch from unpacked rows: inputs, targets [B, T] int32 and
    scored [B, T] bool (the tokens whose prediction is scored) -> dict of [1, B, T] arrays."""
    rows, length = inputs.shape
    arrays = {"inputs": inputs, "targets": targets, "segment_ids": np.ones((rows, length), np.int32),
              "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
              "loss_mask": np.asarray(scored, np.int32)}
    return {name: np.asarray(array)[None] for name, array in arrays.items()}

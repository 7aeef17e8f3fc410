"""State tuning ("State Tuning: State-based Test-Time Scaling on RWKV-7"): a recurrent layer learns
the state it starts each row from, as a trainable parameter (`InitialState`), while `tune: state`
keeps the rest of the model frozen.

A mixer takes part by subclassing `LearnsInitialState` and naming its state's shape
(`initial_state_shape`); `start_state` then gives the learned state (or None) wherever the mixer
starts a row: in its forward, before the first token, and in `init_cache`. The learned state starts
at zero, so a layer's function is unchanged until it is trained. A packed row's later segments
still start from zero (the kernels' contract), so state tuning trains on rows of one document each
(`data.pack: false`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class InitialState(nnx.Param):
    """A layer's learned state before each row's first token, float32, in the shape of its decode
    cache's state without the batch (heads or channels first)."""


class LearnsInitialState:
    """Mixin of the mixers that can learn their start state (`MixerSpec.learns_initial_state`)."""

    initial_state: InitialState | None = None  # set by `learn_initial_state`

    def initial_state_shape(self) -> tuple[int, ...]:
        """The state's shape without the batch, heads or channels first."""
        raise NotImplementedError

    def learn_initial_state(self):
        """Gives the layer a trainable start state, zeros at first."""
        shape = self.initial_state_shape()
        self.initial_state = InitialState(jnp.zeros(shape, jnp.float32),
                                          out_sharding=("heads",) + (None,) * (len(shape) - 1), eager_sharding=False)

    def start_state(self, batch: int) -> jax.Array | None:
        """[batch, *initial_state_shape()] float32: the learned state for every row, or None without one."""
        if self.initial_state is None:
            return None
        # float32 whatever the compute dtype: the recurrences keep their states in float32.
        return jnp.broadcast_to(self.initial_state[...].astype(jnp.float32), (batch, *self.initial_state.shape))

"""The parameters that a conversion adds to a pretrained layer (LoLCATs' feature maps and window
factors): a teacher's checkpoint has no value for them, attention transfer trains them (stage 1),
and the LoRA stage after it keeps them frozen."""

from flax import nnx


class TransferParam(nnx.Param):
    """A parameter trained by attention transfer; otherwise an ordinary `nnx.Param`."""

"""Local linear attention's config (the op: tests/pallas_kernels/test_local_linear_attention.py;
the mixer's decode, packing and training: the shared harness, tests/mixers/test_mixers.py)."""

import pytest

from seqmix.configuration import ConfigError, build
from seqmix.mixers.local_linear_attention import LocalLinearAttentionConfig


def test_config_refuses_a_window_and_a_non_positive_ridge():
    with pytest.raises(ConfigError, match="mixer.sliding_window"):
        build(LocalLinearAttentionConfig, {"sliding_window": 8}, "mixer").validate("mixer")
    with pytest.raises(ConfigError, match="mixer.ridge"):
        build(LocalLinearAttentionConfig, {"ridge": 0.0}, "mixer").validate("mixer")

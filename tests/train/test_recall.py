"""The MQAR task: every scored token is a key seen once in the row's opening pairs, and its
target is that pair's value."""

import numpy as np
import pytest

from seqmix.train.data.recall import mqar_batch


@pytest.mark.parametrize("pairs, length", [(1, 4), (8, 128), (16, 70)])
def test_every_scored_key_recalls_its_pair(pairs, length):
    inputs, targets, scored = mqar_batch(np.random.default_rng(0), 64, length, pairs, vocab_size=64)
    assert inputs.shape == targets.shape == scored.shape == (64, length)
    assert np.all(scored.sum(axis=1) == pairs)
    for row_inputs, row_targets, row_scored in zip(inputs, targets, scored):
        keys, values = row_inputs[0:2 * pairs:2], row_inputs[1:2 * pairs:2]
        assert len(set(keys)) == pairs and np.all((keys >= 1) & (keys < 32)) and np.all(values >= 32)
        pair_of = dict(zip(keys.tolist(), values.tolist()))
        queried = np.flatnonzero(row_scored)
        assert np.all(queried >= 2 * pairs) and sorted(row_inputs[queried]) == sorted(keys)
        for at in queried:
            assert row_targets[at] == pair_of[row_inputs[at]] == row_inputs[at + 1]
        # Outside the pairs and the recurring keys with their values, the row is padding.
        rest = np.ones(length, bool)
        rest[:2 * pairs], rest[queried], rest[queried + 1] = False, False, False
        assert np.all(row_inputs[rest] == 0)


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="seq_len 31 cannot hold 8 pairs"):
        mqar_batch(np.random.default_rng(0), 2, 31, 8, vocab_size=64)
    with pytest.raises(ValueError, match="num_pairs must be in"):
        mqar_batch(np.random.default_rng(0), 2, 256, 40, vocab_size=64)

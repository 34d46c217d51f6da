"""fairseq_plugins.repairs.last_batch: fairseq-fixed's batch_by_size keeps every sentence once the plugins load."""

import numpy as np
import pytest

import fairseq_plugins  # noqa: F401  (installs the fix)
from fairseq.data import data_utils


@pytest.mark.parametrize("num_sentences", [1, 7, 8, 50, 203])
@pytest.mark.parametrize("bsz_mult", [1, 8])
def test_every_index_lands_in_exactly_one_batch(num_sentences, bsz_mult):
    rng = np.random.default_rng(num_sentences)
    lengths = rng.integers(3, 40, size=num_sentences)
    indices = np.argsort(lengths, kind="mergesort")
    batches = data_utils.batch_by_size(indices, lambda i: lengths[i], max_tokens=200,
                                       required_batch_size_multiple=bsz_mult)
    flat = np.concatenate([np.asarray(b) for b in batches])
    assert sorted(flat.tolist()) == list(range(num_sentences))
    # fairseq's own batches are unchanged; at most the dropped tail is added after them
    original = data_utils.batch_by_size.__wrapped__(indices, lambda i: lengths[i], max_tokens=200,
                                                    required_batch_size_multiple=bsz_mult)
    assert len(batches) - len(original) in (0, 1)
    for ours, theirs in zip(batches, original):
        assert np.array_equal(ours, theirs)


def test_the_fix_is_installed_once():
    from fairseq_plugins import batching  # the old name of the repair
    from fairseq_plugins.repairs import last_batch

    wrapped = data_utils.batch_by_size
    last_batch.install()
    batching.install()
    assert data_utils.batch_by_size is wrapped

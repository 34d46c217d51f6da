"""Adversarial inputs to reinmax's public API: each bad argument is a TypeError or ValueError that names it
(never a bare AttributeError / RuntimeError / IndexError from inside torch, or a silently accepted value), and
shape-only (``meta``) logits go through the estimators instead of failing in a data check."""

import pytest
import torch

from reinmax import (ESTIMATORS, BinaryTreeLSTMCell, DiscreteBottleneck, LatentTreeLSTM, ReinMaxFunction,
                     RoutedFeedForward, TreeClassifier, estimate)
from torch_helpers import raises_naming as _raises


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_meta_logits_give_meta_outputs_of_the_right_shape(name):
    """A meta tensor holds no values: the data checks have nothing to read (was a RuntimeError from .item())."""
    logits = torch.empty(5, 3, 4, device="meta", requires_grad=True)
    y_hard, y_soft = estimate(name, logits, 1.0, dim=1)
    assert y_hard.is_meta and y_soft.is_meta
    assert y_hard.shape == y_soft.shape == logits.shape


@pytest.mark.parametrize("args,exc,name", [
    ((None, 1.0, -1, None), TypeError, "logits"),
    ((torch.ones(3, 4, dtype=torch.int64), 1.0, -1, None), TypeError, "logits"),
    ((torch.tensor(1.0), 1.0, -1, None), ValueError, "logits"),
    (("randn", None, -1, None), TypeError, "tau"),
    (("randn", "1.0", -1, None), TypeError, "tau"),
    (("randn", 0.0, -1, None), ValueError, "tau"),
    (("randn", 1.0, 2, None), ValueError, "dim"),
    (("randn", 1.0, -1, "seed"), TypeError, "generator"),
], ids=str)
def test_reinmax_function_apply_checks_its_arguments(args, exc, name):
    """``ReinMaxFunction.apply`` is public: a bad tau used to pass forward silently and fail only in backward."""
    args = tuple(torch.randn(3, 4) if a == "randn" else a for a in args)
    _raises(exc, name, ReinMaxFunction.apply, *args)


def test_reinmax_function_apply_valid_call_is_the_sample_and_softmax():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y_hard, y_soft, log_probs, index = ReinMaxFunction.apply(logits, 1.3, -1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y_soft, torch.exp(logits - logits.logsumexp(-1, keepdim=True)))
    assert torch.equal(y_hard, torch.zeros_like(y_hard).scatter_(-1, index, 1.0))


@pytest.fixture
def tree():
    return LatentTreeLSTM(4, 4)


@pytest.mark.parametrize("x,lengths,kwargs,exc,name", [
    ([[[0.0] * 4] * 3] * 2, [3, 2], {}, TypeError, "x"),
    (torch.ones(2, 3, 4, dtype=torch.int64), [3, 2], {}, TypeError, "x"),
    (torch.ones(2, 3, 4, dtype=torch.float64), [3, 2], {}, TypeError, "x"),
    (torch.ones(2, 3, 4, device="meta"), [3, 2], {}, ValueError, "x"),
    ("ok", None, {}, TypeError, "lengths"),
    ("ok", torch.tensor([3, 2], dtype=torch.complex64), {}, ValueError, "lengths"),
    ("ok", torch.tensor([3, 2], device="meta"), {}, ValueError, "lengths"),
    ("ok", [3, 2], dict(return_merges="yes"), TypeError, "return_merges"),
], ids=str)
def test_latent_tree_inputs(tree, x, lengths, kwargs, exc, name):
    x = torch.randn(2, 3, 4) if isinstance(x, str) else x
    _raises(exc, name, tree, x, lengths, **kwargs)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(padding_idx=True), TypeError, "padding_idx"),
    (dict(padding_idx=float("nan")), TypeError, "padding_idx"),
    (dict(padding_idx=10), ValueError, "padding_idx"),
])
def test_tree_classifier_padding_idx(kwargs, exc, name):
    _raises(exc, name, TreeClassifier, 10, 3, 4, 4, 4, **kwargs)


@pytest.mark.parametrize("tokens,exc", [
    ([[1, 2, 3]], TypeError), (torch.tensor([[1.0, 2.0, 3.0]]), TypeError), (torch.tensor([1, 2, 3]), ValueError),
    (torch.tensor([[1, 2, 10]]), ValueError), (torch.tensor([[1, -1, 2]]), ValueError),
], ids=str)
def test_tree_classifier_tokens(tokens, exc):
    model = TreeClassifier(10, 3, 4, 4, 4, padding_idx=0)
    _raises(exc, "tokens", model, tokens, torch.tensor([3]))


def test_tree_lstm_cell_arguments():
    _raises(TypeError, "hidden_dim", BinaryTreeLSTMCell, True)
    _raises(ValueError, "hidden_dim", BinaryTreeLSTMCell, -1)
    cell = BinaryTreeLSTMCell(4)
    h = torch.randn(3, 4)
    _raises(ValueError, "hr", cell, h, h, torch.randn(3, 5), h)
    _raises(ValueError, "cl", cell, h, torch.randn(2, 4), h, h)
    _raises(TypeError, "cr", cell, h, h, h, torch.ones(3, 4, dtype=torch.int64))
    _raises(ValueError, "hl", cell, torch.randn(3, 4, device="meta"), h, h, h)


def test_discrete_bottleneck_arguments():
    _raises(TypeError, "shared_codebook", DiscreteBottleneck, 8, 4, 3, shared_codebook="no")
    vq = DiscreteBottleneck(8, 4, 3, 2)
    _raises(ValueError, "hidden", vq, torch.randn(5, 9))
    _raises(TypeError, "hidden", vq, torch.ones(5, 8, dtype=torch.int64))
    _raises(TypeError, "hidden", vq, torch.ones(5, 8, dtype=torch.float64))
    _raises(ValueError, "hidden", vq, torch.ones(5, 8, device="meta"))


def test_routed_feed_forward_arguments():
    layer = RoutedFeedForward(8, 16, 4, capacity_factor=1.5)
    _raises(TypeError, "num_tokens", layer.capacity, True)
    _raises(TypeError, "num_tokens", layer.capacity, float("inf"))
    _raises(ValueError, "num_tokens", layer.capacity, -1)
    assert layer.capacity(8) == 3  # ceil(1.5 * 8 / 4)
    _raises(ValueError, "x", layer, torch.randn(2, 3, 8, device="meta"))

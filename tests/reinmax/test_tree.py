"""The merge-choice tree encoder: shapes, masks on unequal lengths, estimators, gradients."""

import pytest
import torch

from reinmax import ESTIMATORS
from reinmax.tree import BinaryTreeLSTMCell, LatentTreeLSTM, TreeClassifier

torch.set_num_threads(1)  # the test machine is a shared 2-core CPU

ESTIMATOR_NAMES = sorted(ESTIMATORS)


@pytest.fixture
def batch():
    lengths = torch.tensor([9, 5, 1, 2, 9])
    return torch.randn(5, 9, 6), lengths


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_padding_does_not_change_eval_output(batch, estimator):
    x, lengths = batch
    enc = LatentTreeLSTM(6, 12, estimator=estimator, tau=1.1).eval()
    with torch.no_grad():
        roots, merges = enc(x, lengths, return_merges=True)
        # garbage in the padding must not matter either
        x_noisy = x.clone()
        for b, n in enumerate(lengths.tolist()):
            x_noisy[b, n:] = 1e3 * torch.randn_like(x_noisy[b, n:])
        assert torch.allclose(enc(x_noisy, lengths), roots, atol=1e-6)
        for b, n in enumerate(lengths.tolist()):
            alone, alone_merges = enc(x[b:b + 1, :n], lengths[b:b + 1], return_merges=True)
            assert torch.allclose(alone[0], roots[b], atol=1e-6)
            assert torch.equal(alone_merges[0], merges[b, :n - 1])
            assert (merges[b, n - 1:] == -1).all()
    assert roots.shape == (5, 12) and merges.shape == (5, 8)


def test_merges_are_valid_choices(batch):
    x, lengths = batch
    enc = LatentTreeLSTM(6, 12).train()
    _, merges = enc(x, lengths, return_merges=True)
    for b, n in enumerate(lengths.tolist()):
        for step in range(n - 1):  # n - step nodes left: pair index in [0, n - step - 2]
            assert 0 <= merges[b, step] <= n - step - 2


def test_root_equals_manual_composition_for_forced_tree():
    # with two tokens there is one choice; with three, eval picks the argmax of the query scores
    enc = LatentTreeLSTM(4, 8).eval()
    x = torch.randn(1, 3, 4)
    h, c = enc.leaf(x).chunk(2, dim=-1)
    with torch.no_grad():
        left = enc.cell(h[:, 0], c[:, 0], h[:, 1], c[:, 1])
        right = enc.cell(h[:, 1], c[:, 1], h[:, 2], c[:, 2])
        scores = torch.stack([(left[0] * enc.query).sum(-1), (right[0] * enc.query).sum(-1)], -1)
        if scores.argmax() == 0:
            want = enc.cell(left[0], left[1], h[:, 2], c[:, 2])[0]
        else:
            want = enc.cell(h[:, 0], c[:, 0], right[0], right[1])[0]
        assert torch.allclose(enc(x, torch.tensor([3])), want, atol=1e-6)
        assert torch.allclose(enc(x[:, :2], torch.tensor([2])), left[0], atol=1e-6)
        # a single token: the root is its leaf state
        assert torch.allclose(enc(x[:, :1], torch.tensor([1])), h[:, 0], atol=1e-6)


def test_tree_lstm_cell_formula():
    cell = BinaryTreeLSTMCell(3)
    hl, cl, hr, cr = (torch.randn(2, 3) for _ in range(4))
    z = torch.cat([hl, hr], -1) @ cell.linear.weight.T + cell.linear.bias
    i, fl, fr, u, o = z.split(3, -1)
    c = cl * torch.sigmoid(fl) + cr * torch.sigmoid(fr) + torch.tanh(u) * torch.sigmoid(i)
    h, c2 = cell(hl, cl, hr, cr)
    assert torch.allclose(c2, c) and torch.allclose(h, torch.sigmoid(o) * torch.tanh(c))


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_training_gradients_reach_query_and_are_finite(batch, estimator):
    x, lengths = batch
    enc = LatentTreeLSTM(6, 12, estimator=estimator, tau=1.1).train()
    x = x.requires_grad_(True)
    enc(x, lengths).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert enc.query.grad is not None and torch.isfinite(enc.query.grad).all()
    assert enc.query.grad.abs().sum() > 0  # the choice passes gradient to the scores
    # padding positions receive no gradient
    for b, n in enumerate(lengths.tolist()):
        assert (x.grad[b, n:] == 0).all()


def test_training_samples_eval_is_greedy(batch):
    x, lengths = batch
    enc = LatentTreeLSTM(6, 12, estimator="reinmax", tau=1.0)
    with torch.no_grad():
        enc.query.mul_(0)  # all scores equal: sampling gives different trees, greedy always pair 0
        enc.train()
        sampled = {tuple(enc(x, lengths, return_merges=True)[1][0].tolist()) for _ in range(10)}
        enc.eval()
        greedy = enc(x, lengths, return_merges=True)[1][0]
    assert len(sampled) > 1
    assert (greedy == 0).all()


def test_classifier_shapes_and_learning():
    torch.manual_seed(0)
    model = TreeClassifier(vocab_size=8, num_classes=3, embed_dim=8, hidden_dim=8, mlp_dim=8, padding_idx=0,
                           estimator="straight_through", tau=1.0)
    tokens = torch.randint(1, 8, (6, 5))
    lengths = torch.tensor([5, 4, 3, 2, 1, 5])
    for b, n in enumerate(lengths.tolist()):
        tokens[b, n:] = 0
    target = torch.randint(0, 3, (6,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(tokens, lengths), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(tokens, lengths).shape == (6, 3)
    assert loss.item() < first


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="nope"), "estimator must be one of"),
    (dict(tau=0.0), "tau must be"),
    (dict(tau=float("nan")), "tau must be"),
    (dict(hidden_dim=0), "hidden_dim"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentTreeLSTM(**{"input_dim": 4, "hidden_dim": 4, **kwargs})


def test_bad_inputs():
    enc = LatentTreeLSTM(4, 4)
    with pytest.raises(ValueError, match="x must be"):
        enc(torch.randn(2, 3), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        enc(torch.randn(2, 3, 4), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        enc(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lengths must be a"):
        enc(torch.randn(2, 3, 4), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("seed", range(3))
def test_incremental_eval_path_matches_full_loop(seed):
    # eval under no_grad composes only the two new pairs per step; with autograd on it runs the full loop
    torch.manual_seed(seed)
    enc = LatentTreeLSTM(5, 7).eval()
    x = torch.randn(6, 11, 5)
    lengths = torch.tensor([11, 1, 2, 3, 7, 10])
    with torch.no_grad():
        fast, fast_merges = enc(x, lengths, return_merges=True)
    full, full_merges = enc(x, lengths, return_merges=True)
    assert torch.equal(fast_merges, full_merges)
    assert torch.allclose(fast, full, atol=1e-6)

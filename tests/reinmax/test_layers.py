"""CategoricalLayer and DiscreteBottleneck."""

import pytest
import torch

from reinmax import ESTIMATORS, CategoricalLayer, DiscreteBottleneck


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_categorical_layer_train_and_eval(name):
    layer = CategoricalLayer(name, tau=1.2, return_probs=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    codes, probs = layer(x)
    assert torch.equal(codes.detach().sum(-1), torch.ones(5, 3))
    (codes * torch.randn(5, 3, 4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(probs, torch.softmax(x, -1))
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    assert torch.equal(a, b) and torch.equal(a.argmax(-1), x.argmax(-1))


def test_categorical_layer_arguments():
    with pytest.raises(ValueError, match="estimator must be one of"):
        CategoricalLayer("nope")
    with pytest.raises(ValueError, match="tau"):
        CategoricalLayer(tau=-1.0)
    assert isinstance(CategoricalLayer()(torch.randn(2, 3)), torch.Tensor)
    layer = CategoricalLayer(dim=0)
    assert torch.equal(layer(torch.randn(4, 2)).sum(0), torch.ones(2))


@pytest.mark.parametrize("shared", [True, False])
def test_discrete_bottleneck_picks_codebook_rows(shared):
    vq = DiscreteBottleneck(12, num_codes=5, code_dim=3, num_latents=4, tau=1.3, shared_codebook=shared,
                            return_probs=True)
    h = torch.randn(7, 12)
    out, probs = vq(h)
    assert out.shape == (7, 4, 3) and probs.shape == (7, 4, 5)
    out.sum().backward()
    assert vq.codebook.grad is not None and vq.to_logits.weight.grad.abs().sum() > 0
    vq.eval()
    with torch.no_grad():
        out = vq(h)[0]
        idx = vq.to_logits(h).view(7, 4, 5).argmax(-1)
        book = vq.codebook if shared else vq.codebook.unsqueeze(0).expand(7, 4, 5, 3)
        expected = book[idx] if shared else torch.gather(book, 2, idx[..., None, None].expand(7, 4, 1, 3)).squeeze(2)
    torch.testing.assert_close(out, expected)


def test_discrete_bottleneck_learns_a_copy_task():
    """End to end: a bottleneck with 8 codes learns to pass a 4-way symbol through (ReinMax gradients)."""
    torch.manual_seed(0)
    vq = DiscreteBottleneck(4, num_codes=8, code_dim=8, num_latents=1, tau=1.0)
    head = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(list(vq.parameters()) + list(head.parameters()), lr=0.1)
    for _ in range(100):
        y = torch.randint(0, 4, (64,))
        loss = torch.nn.functional.cross_entropy(head(vq(torch.eye(4)[y]).squeeze(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    y = torch.arange(4)
    assert (head(vq(torch.eye(4)[y]).squeeze(1)).argmax(-1) == y).all()


def test_discrete_bottleneck_bad_sizes():
    with pytest.raises(ValueError, match="num_codes"):
        DiscreteBottleneck(4, num_codes=0, code_dim=2)

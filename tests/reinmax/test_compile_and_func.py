"""reinmax under torch.compile(fullgraph=True) and torch.func: the same contract as in eager mode.

``fullgraph=True`` fails on any graph break (a host read such as ``bool(tensor)`` is one), so these
tests prove the estimators and layers trace without one. Most use the ``aot_eager`` backend (Dynamo
and AOTAutograd trace forward and backward; eager kernels run them, with the eager random stream,
so a compiled call and an eager call seeded alike draw the same sample); one uses inductor.
"""

import pytest
import torch

import reinmax
from reinmax import CategoricalLayer, DiscreteBottleneck, LatentTreeLSTM
from torch_helpers import saved_bytes

NAMES = sorted(reinmax.ESTIMATORS)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def loss_of(name, tau=1.3):
    def loss(x):
        y_hard, y_soft = reinmax.estimate(name, x, tau)
        w = torch.arange(x.shape[-1], dtype=x.dtype)
        return (y_hard * w).sum() + (y_soft * w.flip(0)).sum(), y_hard, y_soft
    return loss


def run(fn, x, seed=0):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    loss, y_hard, y_soft = fn(x)
    loss.backward()
    return y_hard.detach(), y_soft.detach(), x.grad


@pytest.mark.parametrize("name", NAMES)
def test_estimators_compile_fully_with_the_eager_contract(name):
    x = torch.randn(16, 6) * 2
    compiled = torch.compile(loss_of(name), fullgraph=True, backend="aot_eager")
    y_hard, y_soft, grad = run(compiled, x)
    assert torch.equal(y_hard.sum(-1), torch.ones(16)) and set(y_hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y_soft, torch.softmax(x, -1))
    e_hard, _, e_grad = run(loss_of(name), x)  # the same seed: the same sample
    assert torch.equal(e_hard, y_hard)
    torch.testing.assert_close(grad, e_grad)


def test_reinmax_compiles_with_inductor():
    x = torch.randn(32, 8)
    y_hard, y_soft, grad = run(torch.compile(loss_of("reinmax"), fullgraph=True), x)
    assert torch.equal(y_hard.sum(-1), torch.ones(32))
    torch.testing.assert_close(y_soft, torch.softmax(x, -1))
    _, _, expected = run(lambda t: _with_sample(t, y_hard), x)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def _with_sample(x, sample):
    """The ReinMax gradient of loss_of('reinmax') for a given sample, from the formula (float64)."""
    pi0 = torch.softmax(x.double(), -1)
    pi1 = (torch.softmax(x.double() / 1.3, -1) + sample.double()) / 2
    w = torch.arange(x.shape[-1], dtype=torch.float64)
    g, h = w.expand_as(pi0), w.flip(0).expand_as(pi0)

    def J(p, v):
        return p * (v - (p * v).sum(-1, keepdim=True))
    surrogate = (2 * J(pi1, g) - 0.5 * J(pi0, g) + J(pi0, h)).float()
    return (x * surrogate.detach()).sum(), sample, torch.softmax(x, -1)


@pytest.mark.parametrize("training", [True, False])
def test_layers_compile_fully(training):
    torch.manual_seed(0)
    cat = CategoricalLayer("reinmax", 1.3, return_probs=True).train(training)
    vq = DiscreteBottleneck(8, num_codes=4, code_dim=3, num_latents=2).train(training)
    x = torch.randn(5, 4)
    codes, probs = torch.compile(cat, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(codes.sum(-1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(x, -1))
    if not training:
        assert torch.equal(codes.argmax(-1), x.argmax(-1))
    h = torch.randn(5, 8)
    torch.testing.assert_close(torch.compile(vq, fullgraph=True, backend="aot_eager")(h).shape, vq(h).shape)


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_latent_tree_compiles_without_graph_breaks(mode):
    torch.manual_seed(0)
    enc = LatentTreeLSTM(4, 6, estimator="reinmax", tau=1.1).train(mode == "train")
    x, lengths = torch.randn(3, 7, 4), torch.tensor([7, 4, 1])
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
        torch.manual_seed(1)
        root = compiled(x, lengths)
        torch.manual_seed(1)
        torch.testing.assert_close(root, enc(x, lengths))


def test_data_checks_can_be_switched_off_globally():
    import stability_toolbox
    bad = torch.tensor([[float("nan"), 0.0]])
    with stability_toolbox.data_checks(False):
        y_hard, y_soft = reinmax.reinmax(bad, 1.0)  # no check, no sync: NaN in, NaN out
    assert torch.isnan(y_soft).all()
    with pytest.raises(ValueError):
        reinmax.reinmax(bad, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_grad_and_vmap(name):
    x = torch.randn(6)
    w = torch.arange(6.0)

    def f(t):
        y_hard, y_soft = reinmax.estimate(name, t, 1.3)
        return (y_hard * w).sum() + (y_soft * w).sum()
    torch.manual_seed(0)
    g = torch.func.grad(f)(x)
    torch.manual_seed(0)
    t = x.clone().requires_grad_()
    f(t).backward()
    torch.testing.assert_close(g, t.grad)  # same seed, same sample, same gradient
    batch = torch.func.vmap(lambda t: reinmax.estimate(name, t, 1.3)[0], randomness="different")(torch.zeros(400, 6))
    assert torch.equal(batch.sum(-1), torch.ones(400))
    assert len(set(batch.argmax(-1).tolist())) == 6  # "different": every row its own draw
    grads = torch.func.vmap(torch.func.grad(f), randomness="different")(torch.randn(5, 6))
    assert grads.shape == (5, 6) and torch.isfinite(grads).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_is_float32_exact(dtype):
    """Small categories keep their gradient: the backward runs in float32 from float32 probabilities."""
    x = torch.tensor([[8.0, 0.0, -6.0, -9.0]]).repeat(64, 1)
    g = torch.randn(64, 4).to(dtype).float()  # exactly representable in both precisions
    half = x.to(dtype).requires_grad_()
    y_hard, _ = reinmax.reinmax(half, 1.3, generator=torch.Generator().manual_seed(0))
    (y_hard * g.to(dtype)).sum().backward()
    full = x.clone().requires_grad_()
    y_full, _ = reinmax.reinmax(full, 1.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y_full, y_hard.float())
    (y_full * g).sum().backward()
    torch.testing.assert_close(half.grad.float(), full.grad.to(dtype).float(), rtol=0, atol=0)
    assert (half.grad[:, 3] != 0).float().mean() > 0.9  # pi0 ~ 4e-8: 0 in a float16 softmax, kept here


def test_half_precision_saves_4_bytes_per_element():
    x = torch.randn(256, 64, dtype=torch.float16, requires_grad=True)
    assert saved_bytes(lambda: reinmax.reinmax(x, 1.3)) == 256 * 64 * 4 + 256 * 8  # < 0.1.0's 12 B/element


@pytest.mark.parametrize("name", NAMES)
def test_cpu_autocast_output_dtype_is_the_logits_dtype(name):
    lin = torch.nn.Linear(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(torch.randn(4, 8))
        y_hard, y_soft = reinmax.estimate(name, logits, 1.3)
    assert logits.dtype == torch.bfloat16 and y_hard.dtype == torch.bfloat16 and y_soft.dtype == torch.bfloat16

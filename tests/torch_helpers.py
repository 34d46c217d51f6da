"""Small helpers shared by tests (``tests/`` is on sys.path, see conftest.py).

`saved_bytes` lives in `benchmarks.memory` (the benchmarks measure with it too); tests may import from
``benchmarks``, never the other way round. `optimizer_snapshot` / `assert_optimizer_unchanged`: the check that a
refused call changed nothing, for any optimizer.

The independent side of the numerical tests, written once: `softmax_jacobian` / `softmax_jvp` (``diag(p) - p p^T``),
`reinmax_gradient` (REFERENCE section 2's closed form), `chi_square` (Pearson's statistic of draws against
probabilities), `assert_within_ulp` (agreement to a few units in the last place of a dtype), and for the
mixture-of-experts tests `expert_outputs` (each expert run on its own, never through the layer's dispatch) and
`sparsemixer_probs` (SparseMixer's masked softmax in the authors' quotient form); for the sign optimizers
`sign_rule_step` (one step of AddSign / PowerSign as the paper writes it, in NumPy) and `step_alike` (two
optimizers stepped on the same gradients); `saved_and_loaded` (an object back from ``torch.save`` /
``torch.load(weights_only=True)``); `raises_naming` (a refusal of the given type whose message names the argument); `feed_grads` (stability-monitor updates with gradients of a chosen RMS); for the
monitor's probe, `norm_inputs` (every LayerNorm's input, read with the test's own hooks) and `output_change` (the
relative change of a residual sum's first rows, in float64).
"""

import copy
import io

import numpy as np
import torch

from benchmarks.memory import saved_bytes

__all__ = ["saved_bytes", "optimizer_snapshot", "assert_optimizer_unchanged", "softmax_jacobian", "softmax_jvp",
           "reinmax_gradient", "chi_square", "assert_within_ulp", "expert_outputs", "sparsemixer_probs",
           "sign_rule_step", "step_alike", "saved_and_loaded", "raises_naming"]


def optimizer_snapshot(opt, params):
    """Copies of ``params``, of every state tensor of ``opt`` and of its param groups' hyper-parameters."""
    return {"params": [p.detach().clone() for p in params],
            "state": {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                      for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def assert_optimizer_unchanged(snapshot, opt, params):
    """Assert that ``params`` and ``opt`` (state tensors, which parameters have state, hyper-parameters) are as
    ``snapshot`` (`optimizer_snapshot`) recorded them."""
    for p, before in zip(params, snapshot["params"]):
        assert torch.equal(p.detach(), before)
    assert {id(p) for p in opt.state} == set(snapshot["state"])
    for p, s in opt.state.items():
        assert set(s) == set(snapshot["state"][id(p)])
        for k, v in s.items():
            before = snapshot["state"][id(p)][k]
            assert torch.equal(v, before) if torch.is_tensor(v) else v == before, k
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == snapshot["groups"]


def softmax_jacobian(p):
    """``diag(p) - p p^T`` over the last dim of ``p`` (batched): d softmax / d logits at probabilities ``p``."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def softmax_jvp(p, v):
    """``J(p) v`` over the last dim, written out as a matrix product (`softmax_jacobian`)."""
    return (softmax_jacobian(p) @ v.unsqueeze(-1)).squeeze(-1)


def reinmax_gradient(theta, D, g, h, tau, dim=-1):
    """ReinMax's gradient, REFERENCE section 2: ``2 J(pi1) g - 0.5 J(pi0) g + J(pi0) h`` with ``pi0 = softmax(theta)``,
    ``pi1 = (softmax(theta / tau) + D) / 2``, in float64, along ``dim`` (``D`` the one-hot sample, ``g`` / ``h`` the
    gradients at the sample and at ``pi0``)."""
    theta, D, g, h = (t.double().movedim(dim, -1) for t in (theta, D, g, h))
    pi0 = torch.softmax(theta, -1)
    pi1 = (torch.softmax(theta / tau, -1) + D) / 2
    return (2 * softmax_jvp(pi1, g) - 0.5 * softmax_jvp(pi0, g) + softmax_jvp(pi0, h)).movedim(-1, dim)


def chi_square(counts, probs):
    """Pearson's statistic ``sum (n_i - N p_i)^2 / (N p_i)`` of the category ``counts`` against ``probs`` (a float)."""
    counts, probs = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(probs, dtype=torch.float64)
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def assert_within_ulp(a, b, dtype, ulps=1, floor=1e-3):
    """``|a - b| <= ulps * eps(dtype) * max(|a|, |b|, floor)`` elementwise: ``ulps`` units in the last place of
    ``dtype`` at the larger magnitude, and at ``floor`` for the values below it."""
    diff = (a.double() - b.double()).abs()
    bound = ulps * torch.finfo(dtype).eps * torch.maximum(a.double().abs(), b.double().abs()).clamp(min=floor)
    assert (diff <= bound).all(), f"max diff {diff.max().item():.3g}, bound {bound[diff > bound][:3].tolist()}"


def expert_outputs(layer, tokens, dtype=None):
    """``(..., E, d)``: every expert of a `reinmax.RoutedFeedForward` ``layer`` on every token of ``tokens``
    ``(..., d)``, one expert at a time as a plain ``F.linear -> relu -> F.linear``. With ``dtype``: computed from
    detached copies in that dtype (no gradient); without, in the layer's dtype, differentiable."""
    weights = (layer.fc1_weight, layer.fc1_bias, layer.fc2_weight, layer.fc2_bias)
    if dtype is not None:
        weights = tuple(t.detach().to(dtype) for t in weights)
        tokens = tokens.detach().to(dtype)
    w1, b1, w2, b2 = weights
    linear = torch.nn.functional.linear
    return torch.stack([linear(torch.relu(linear(tokens, w1[e], b1[e])), w2[e], b2[e])
                        for e in range(layer.num_experts)], -2)


def sparsemixer_probs(logits, eps):
    """SparseMixer's ``pi'`` over the last dim: the softmax with probability 0 for the experts whose
    ``(max - l) / max(|l|, max) > 2 eps`` (the authors' quotient form; REFERENCE section 6)."""
    top = logits.max(-1, keepdim=True).values
    ratio = (top - logits) / logits.abs().clamp(min=top)
    return torch.softmax(logits.masked_fill(ratio > 2 * eps, float("-inf")), -1)


def sign_rule_step(rule, w, m, g, *, lr, beta, alpha, decay, weight_decay=0.0, maximize=False):
    """One step of ``rule`` ("addsign" or "powersign") as Bello et al. (2017) write it (REFERENCE section 3), in
    float64 NumPy: ``m <- beta m + (1 - beta) g`` first (``g`` negated when maximizing), the decoupled weight decay
    ``w <- w - lr weight_decay w``, then with ``s = sign(g) sign(m)`` and ``d = decay``: AddSign
    ``w <- w - lr (alpha + d s) g``, PowerSign ``w <- w - lr alpha ** (d s) g``. Returns ``(w, m)``."""
    w, m, g = (np.asarray(x, dtype=np.float64) for x in (w, m, g))
    g = -g if maximize else g
    m = beta * m + (1.0 - beta) * g
    s = np.sign(g) * np.sign(m)
    w = w - lr * weight_decay * w
    if rule == "addsign":
        w = w - lr * (alpha + decay * s) * g
    else:
        w = w - lr * alpha ** (decay * s) * g
    return w, m


def step_alike(params_a, step_a, params_b, step_b, steps=4):
    """``steps`` times: the same random gradient (``torch.randn_like``, the global generator) on ``params_a[i]`` and
    ``params_b[i]``, then ``step_a()`` and ``step_b()`` (two optimizers, or an eager and a compiled step)."""
    for _ in range(steps):
        for p, q in zip(params_a, params_b):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        step_a()
        step_b()


def saved_and_loaded(obj):
    """``obj`` as a checkpoint gives it back: ``torch.save`` to memory, then ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def raises_naming(exc, name, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` (or a subclass) whose message names ``name`` (the refused argument)."""
    import pytest

    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), str(info.value)


def feed_grads(mon, model, steps, rms):
    """Updates ``steps`` of the stability monitor ``mon``: every gradient entry of ``model`` set to ``rms(t)`` (so
    each layer's RMS is ``rms(t)``), then ``begin_step``, ``capture_grads``, ``end_step``."""
    for t in steps:
        for p in model.parameters():
            p.grad = torch.full_like(p, rms(t))
        mon.begin_step()
        mon.capture_grads()
        mon.end_step()


def norm_inputs(model, x):
    """``{name: input}`` of every ``nn.LayerNorm`` of ``model`` on ``model(x)`` in eval mode without autograd and
    without torch.nn's fused transformer path (whose LayerNorms no hook sees), read with the test's own hooks: the
    residual sums a full probe pass records. The training flags and the fast-path switch are put back."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].clone()))
               for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    modes = [(m, m.training) for m in model.modules()]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, mode in modes:
            m.training = mode
        for h in handles:
            h.remove()
    return seen


def output_change(was, now, rows):
    """``||now - was||^2 / ||was||^2`` over the first ``rows`` feature vectors of two residual sums, in float64."""
    was, now = was.reshape(-1, was.shape[-1])[:rows].double(), now.reshape(-1, now.shape[-1])[:rows].double()
    return float((now - was).pow(2).sum() / was.pow(2).sum())

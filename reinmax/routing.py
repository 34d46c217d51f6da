r"""Top-1 expert routing: which expert a token goes to, and the gradient of that discrete choice.

A router turns logits ``theta`` of shape ``(N, E)`` (N tokens, E experts) into the chosen expert
``D`` per token and the multiplier of that expert's output, so that a mixture-of-experts layer
outputs ``gate * f_D(x)``. The routers differ in the gradient ``theta`` gets through the choice
(``pi = softmax(theta)``, ``g = dL/dy`` at the layer output, ``f_i`` expert ``i``'s output):

============================  ==============  ===============================  =======================================
router                        ``D``           forward value                    gradient to ``theta`` (one token)
============================  ==============  ===============================  =======================================
``switch`` (Fedus et al.)     argmax pi       ``pi_D f_D``                     ``(g.f_D) pi_D (e_D - pi)``
``straight_through``          ``D ~ pi``      ``f_D``                          ``(g.f_D) p_D (e_D - p) / tau``, ``p = softmax(theta / tau)``
``gumbel_softmax``            argmax(theta+G) ``f_D``                          ``(g.f_D) s_D (e_D - s) / tau``, ``s = softmax((theta + G) / tau)``
``sparsemixer`` (Liu et al.)  ``D ~ pi'``     ``c pi'_D f_D``, c in {1, 1/2}   ``2 (g.f_D) pi'_D (e_D - pi')``
``reinmax`` (dense)           ``D ~ pi``      ``f_D``                          ReinMax: ``2 J(pi1) G - J(pi) G / 2``, ``G_i = g.f_i``
============================  ==============  ===============================  =======================================

The first four are *sparse*: their gradient needs the chosen expert's output only, so a layer
computes one expert per token. ``reinmax`` needs every expert's output ``f_i`` (it is the exact
ReinMax estimator of [`reinmax.reinmax`][reinmax.reinmax] on the one-hot choice), so a layer computes all E
experts per token: the reference, for small E.

SparseMixer (Liu, Gao and Chen 2023, "Sparse Backpropagation for MoE Training"): the gradient of
``E_D[L(pi_D f_D)] = sum_i pi_i L(pi_i f_i)`` has a term ``sum_i L(pi_i f_i) grad pi_i``, which
needs every expert. Writing ``L(pi_i f_i) - L(0)`` as ``g.(pi_i f_i)`` (Euler) or as
``g(pi_i f_i / 2).(pi_i f_i)`` (mid-point, exact for a quadratic ``L``) turns it into an
expectation over ``D`` that the sampled expert alone estimates; with the other term it gives
``2 (g.f_D) grad pi_D``. The mid-point is taken for half of the tokens whose ``D`` is not the
argmax (the forward value is halved there, ``c = 1/2``), the Euler step for the rest. Before
sampling, experts whose logit is far below the maximum, ``max - theta_i > 2 eps max(|theta_i|,
max)``, are masked out (``pi'``: the softmax over the rest), which keeps the sampled expert
among the plausible ones (``jitter_eps``, default 0.1 as in the authors' code).

In evaluation (``training=False``) every router takes ``D = argmax theta`` with the training
forward value at that choice: ``pi_D`` for ``switch``, ``pi'_D`` (the *masked* softmax, as in
training, where the argmax always has ``c = 1``) for ``sparsemixer``, 1 otherwise. For
``sparsemixer`` the mask is therefore computed before the train/eval branch, as in the authors'
code; an unmasked eval gate would scale every routed FFN differently at validation than in
training. SparseMixer's balance loss uses the masked softmax too (`Routing.probs`).

The authors' router also multiplies the gate by a learnable per-dimension scale ``omega``
(``(d,)``, initialized to 1, shared by the experts). It is not added here: ``omega_j`` times
every expert's output ``j`` is the same function as every expert's ``fc2`` row ``j`` (weight and
bias) scaled by ``omega_j``, so it adds no expressiveness, it only reparametrizes the
optimization; at its initialization the two layers are identical (checked against an
independent re-implementation of the reference in ``tests/reinmax/test_moe_adversarial.py``).
Leaving it out keeps every router's layer the same function class and parameters.

Temperature. The tempered softmaxes (``softmax(theta / tau)``) are computed from the shifted logits
``(theta - max theta) / tau``: no ``inf - inf`` when ``theta / tau`` overflows. The routers that use
``tau`` refuse one below `ROUTER_MIN_TAU` (1e-30), where their gradient at tied logits
(``1 / (4 tau)``) overflows float32; every accepted ``tau`` gives finite gates and gradients.

Examples:
    >>> logits = torch.randn(6, 4, requires_grad=True)
    >>> r = route_tokens(logits, "sparsemixer")
    >>> r.index.shape, r.gate.shape, r.weights
    (torch.Size([6]), torch.Size([6]), None)
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from toolbox_core import validation

from ._checks import check_generator, check_probabilities, check_tau, one_hot
from .baselines import _uniform_open
from .reinmax_function import reinmax
from .sampling import draw

__all__ = ["ROUTERS", "SPARSE_ROUTERS", "ROUTER_MIN_TAU", "TAU_ROUTERS", "Routing", "route_tokens", "check_router",
           "check_router_tau", "balance_loss", "expert_counts"]

#: the routers, sparse ones (one expert computed per token) first.
ROUTERS = ("sparsemixer", "switch", "straight_through", "gumbel_softmax", "reinmax")
#: the routers whose gradient needs only the chosen expert's output.
SPARSE_ROUTERS = ("sparsemixer", "switch", "straight_through", "gumbel_softmax")
#: the routers whose gradient has a temperature ``tau``.
TAU_ROUTERS = ("straight_through", "gumbel_softmax", "reinmax")
#: the smallest ``tau`` of `TAU_ROUTERS`. Below it ``softmax(theta / tau)`` is one-hot to float precision
#: except at exact ties, where the estimators' gradient (``1 / (4 tau)`` for two tied experts) overflows float32,
#: and [`reinmax.reinmax`][reinmax.reinmax]'s ``log pi / tau`` overflows float32 (all ``-inf``: NaN). ``switch`` and
#: ``sparsemixer`` do not use ``tau`` and accept any finite ``tau > 0``.
ROUTER_MIN_TAU = 1e-30


class Routing(NamedTuple):
    """The routing of N tokens among E experts.

    Attributes:
        index: ``(N,)`` int64, the chosen expert of each token.
        gate: ``(N,)`` the multiplier of the chosen expert's output; carries the router's gradient
            (sparse routers). ``None`` for ``reinmax``.
        weights: ``(N, E)`` one-hot choice carrying ReinMax's gradient (``reinmax``; the layer
            output is ``sum_i weights_i f_i``); ``None`` for the sparse routers.
        probs: ``(N, E)`` the router's probabilities in float32 (float64 for float64), for the balance
            loss: ``softmax(logits)``; for ``sparsemixer`` the masked softmax ``pi'`` (0 at masked experts).
    """

    index: Tensor
    gate: Optional[Tensor]
    weights: Optional[Tensor]
    probs: Tensor


def check_router(router) -> str:
    """``router`` if it is one of `ROUTERS`; TypeError/ValueError naming them otherwise."""
    return validation.as_choice("router", router, ROUTERS)


def check_router_tau(router: str, tau) -> float:
    """``tau`` as a float: finite and > 0, and >= `ROUTER_MIN_TAU` for the `TAU_ROUTERS`."""
    tau = check_tau(tau)
    if router in TAU_ROUTERS and tau < ROUTER_MIN_TAU:
        raise ValueError(f"tau must be a finite real number >= {ROUTER_MIN_TAU:g} with router={router!r} "
                         f"(its gradient overflows float32 below it), got {tau!r}")
    return tau


def _check_token_matrix(name: str, t) -> None:
    """TypeError/ValueError naming ``name`` unless ``t`` is a floating (tokens, experts) tensor, experts >= 1."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor of shape (tokens, experts), got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (tokens, experts) with at least one expert, "
                         f"got shape {tuple(t.shape)}")


def _straight_gate(p: Tensor, index: Tensor) -> Tensor:
    """Value 1, gradient that of ``p[index]``: ``1 + p_D - sg(p_D)`` (exactly 1: ``x - x == 0``)."""
    p_d = p.gather(1, index.unsqueeze(1)).squeeze(1)
    return 1.0 + (p_d - p_d.detach())


def _jitter_mask(work: Tensor, eps: float) -> Tensor:
    """True where SparseMixer masks an expert out: ``max - theta_i > 2 eps max(|theta_i|, max)``."""
    top = work.amax(1, keepdim=True)
    # a product, not the authors' quotient: no 0/0 when the logits are 0 (the argmax is never masked)
    return (top - work) > 2 * eps * torch.maximum(work.abs(), top)


def _tempered_softmax(work: Tensor, tau: float) -> Tensor:
    """``softmax(work / tau)`` along dim 1, finite for every ``tau >= ROUTER_MIN_TAU``.

    The logits are shifted by their maximum first (``<= 0``, so ``/ tau`` can only overflow to
    ``-inf``, whose ``exp`` is 0: never the ``inf - inf`` of an overflowing ``work / tau``).
    """
    if tau == 1.0:
        return torch.softmax(work, 1)
    return torch.softmax((work - work.detach().amax(1, keepdim=True)) / tau, 1)


def route_tokens(logits: Tensor, router: str, tau: float = 1.0, *, training: bool = True,
                 jitter_eps: float = 0.1, generator: Optional[torch.Generator] = None) -> Routing:
    r"""Choose one expert per token with ``router`` (see the module docstring for each router).

    Args:
        logits: ``(N, E)`` router logits (any floating dtype; routed in float32, float64 for float64).
        router: one of `ROUTERS`.
        tau: temperature of ``straight_through``, ``gumbel_softmax`` and ``reinmax`` (their gradient);
            ``switch`` and ``sparsemixer`` do not use it. A finite number > 0 (at least
            `ROUTER_MIN_TAU` for the routers that use it).
        training: sample (or, for ``switch``, take the argmax) with the router's gradient; False:
            the argmax, deterministic.
        jitter_eps: ``sparsemixer``'s masking threshold, a finite number >= 0.
        generator: optional ``torch.Generator`` for the sampling.

    Returns:
        a [`Routing`][reinmax.Routing].

    Examples:
        >>> r = route_tokens(torch.randn(5, 3), "switch")
        >>> r.gate.shape  # pi_D, the argmax's probability
        torch.Size([5])
    """
    _check_token_matrix("logits", logits)
    router = check_router(router)
    tau = check_router_tau(router, tau)
    training = validation.as_bool("training", training)
    jitter_eps = validation.as_real("jitter_eps", jitter_eps, low=0.0)
    check_generator(generator, logits)

    work = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if router == "sparsemixer":
        # the mask comes before the train/eval branch: the eval gate is the masked softmax at the
        # argmax, the value training gives there, and the balance loss uses the masked softmax
        with torch.no_grad():
            masked = _jitter_mask(work, jitter_eps)
        probs = torch.softmax(work.masked_fill(masked, float("-inf")), 1)
    else:
        probs = torch.softmax(work, 1)
    check_probabilities(probs.detach().sum(1))
    if not training or router == "switch":
        index = work.detach().argmax(1)
        if router in ("switch", "sparsemixer"):
            gate = probs.gather(1, index.unsqueeze(1)).squeeze(1)
        else:
            gate = torch.ones_like(probs[:, 0])
        if router == "reinmax":
            return Routing(index, None, one_hot(index.unsqueeze(1), work, 1).to(logits.dtype), probs)
        return Routing(index, gate.to(logits.dtype), None, probs)

    if router == "reinmax":
        y_hard, _ = reinmax(work, tau, dim=1, generator=generator)
        index = y_hard.detach().argmax(1)
        return Routing(index, None, y_hard.to(logits.dtype), probs)
    if router == "straight_through":
        index = draw(probs.detach(), 1, generator).squeeze(1)
        p = _tempered_softmax(work, tau)
        return Routing(index, _straight_gate(p, index).to(logits.dtype), None, probs)
    if router == "gumbel_softmax":
        gumbels = _uniform_open(work.shape, work, generator).log().neg().log().neg()
        perturbed = work + gumbels
        index = perturbed.detach().argmax(1)
        s = _tempered_softmax(perturbed, tau)
        return Routing(index, _straight_gate(s, index).to(logits.dtype), None, probs)

    # sparsemixer: D ~ pi' (one uniform per token, inverse CDF), then one uniform per token for the
    # mid-point coin (mid-point, forward scale 1/2, where it is < 1/2 and D is not the argmax)
    pi = probs
    index = draw(pi.detach(), 1, generator).squeeze(1)
    pi_d = pi.gather(1, index.unsqueeze(1)).squeeze(1)
    coin = torch.rand(index.shape, generator=generator, dtype=work.dtype, device=work.device)
    first_order = (index == work.detach().argmax(1)) | (coin >= 0.5)
    scale = torch.where(first_order, 1.0, 0.5).to(work.dtype)
    # value c * pi_D; gradient 2 * grad pi_D (the Euler/mid-point estimate plus the direct term)
    gate = scale * pi_d.detach() + 2.0 * (pi_d - pi_d.detach())
    return Routing(index, gate.to(logits.dtype), None, probs)


def _check_index(index, experts: int, name: str = "index", tokens: Optional[int] = None) -> None:
    """``index``: an integer tensor of shape ``(tokens,)`` with values in ``[0, experts)`` (a data check)."""
    if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor of expert numbers, got "
                        f"{index.dtype if isinstance(index, Tensor) else type(index).__name__}")
    if index.dim() != 1 or (tokens is not None and index.shape[0] != tokens):
        want = "(tokens,)" if tokens is None else f"(tokens={tokens},)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(index.shape)}")
    validation.check_data(lambda: ((index < 0) | (index >= experts)).any(),
                          f"{name} must hold expert numbers in [0, {experts - 1}] (experts={experts})")


def balance_loss(probs: Tensor, index: Tensor) -> Tensor:
    r"""Switch Transformer's load-balancing loss ``E * sum_i f_i P_i`` (1 when perfectly balanced).

    ``f_i``: the fraction of the tokens routed to expert ``i`` (no gradient); ``P_i``: the mean
    router probability of expert ``i`` (``probs[:, i].mean()``). Minimized (= 1) by a uniform
    routing; it reaches ``E`` when every token goes to one expert with probability 1.

    Args:
        probs: ``(N, E)`` floating router probabilities (E >= 1).
        index: ``(N,)`` integer tensor, the chosen experts, each in ``[0, E)`` (the range is a data
            check: see [`toolbox_core.validation.set_data_checks`][toolbox_core.validation.set_data_checks]), on ``probs``' device.

    Returns:
        a 0-d tensor of ``probs``' dtype (0 for N = 0).

    Raises:
        TypeError: ``probs`` not a floating tensor, ``index`` not an integer tensor.
        ValueError: a shape other than ``(N, E)`` / ``(N,)``, another device, an expert out of range.

    Examples:
        >>> balance_loss(torch.full((4, 2), 0.5), torch.tensor([0, 1, 0, 1]))
        tensor(1.)
    """
    _check_token_matrix("probs", probs)
    _check_index(index, probs.shape[1], tokens=probs.shape[0])
    if index.device != probs.device:
        raise ValueError(f"index must be on probs' device ({probs.device}), got {index.device}")
    return _balance_loss(probs, index.long())


def _balance_loss(probs: Tensor, index: Tensor) -> Tensor:
    """[`balance_loss`][reinmax.balance_loss] without argument checks."""
    experts = probs.shape[1]
    tokens = max(probs.shape[0], 1)
    return experts * torch.sum((_expert_counts(index, experts, probs.dtype) / tokens) * probs.sum(0) / tokens)


def expert_counts(index: Tensor, experts: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(E,)`` tokens per expert, as ``dtype``. (``torch.bincount`` would read the maximum on the host.)

    Args:
        index: ``(N,)`` integer tensor of experts in ``[0, experts)`` (the range is a data check).
        experts: E >= 1.
        dtype: a floating or integer ``torch.dtype`` of the counts.
    """
    experts = validation.as_int("experts", experts, minimum=1)
    if not isinstance(dtype, torch.dtype) or dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"dtype must be a real torch.dtype, got {dtype!r}")
    _check_index(index, experts)
    return _expert_counts(index.long(), experts, dtype)


def _expert_counts(index: Tensor, experts: int, dtype: torch.dtype) -> Tensor:
    """`expert_counts` without argument checks."""
    return torch.zeros(experts, dtype=dtype, device=index.device).index_add_(0, index, torch.ones_like(index, dtype=dtype))

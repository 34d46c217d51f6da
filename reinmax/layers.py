"""Layers that put a discrete choice inside a network, with any estimator of `ESTIMATORS`."""

import math
from typing import Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from ._checks import check_logits, check_probabilities, check_tau, one_hot, work_dtype
from .registry import check_estimator_name, check_estimator_options, estimate


def argmax_choice(logits: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Evaluation mode of a discrete layer: ``(one_hot(argmax logits), softmax(logits))``.

    Data-checked like the estimators: NaN/+inf logits or a slice of all ``-inf`` is a ValueError,
    not a one-hot of an arbitrary category.
    """
    probs = torch.softmax(logits, dim, dtype=work_dtype(logits.dtype))
    check_probabilities(probs.detach().sum(dim))
    idx = logits.detach().argmax(dim, keepdim=True)
    codes = one_hot(idx, logits, dim)
    return codes, probs.to(logits.dtype)


class CategoricalLayer(nn.Module):
    r"""Logits to one-hot codes: a sample in training (gradient by ``estimator``), the argmax in eval.

    Args:
        estimator: a name in `reinmax.ESTIMATORS` (default ``"reinmax"``).
        tau: temperature of the estimator, a finite number > 0.
        dim: the category dimension.
        return_probs: also return ``softmax(logits)`` (for a KL term, say).
        **options: passed to the estimator (``gap=``, ``k=``).

    Shape:
        input ``(*, C, *)``; output the same shape, one-hot along ``dim``.

    Examples:
        >>> layer = CategoricalLayer("reinmax", tau=1.3)
        >>> codes = layer(torch.randn(16, 8, 4))   # 16 x 8 one-hot vectors of size 4
    """

    def __init__(self, estimator: str = "reinmax", tau: float = 1.0, dim: int = -1,
                 return_probs: bool = False, **options):
        super().__init__()
        self.estimator = check_estimator_name(estimator, "estimator")
        self.tau = check_tau(tau)
        self.dim = validation.as_int("dim", dim)
        self.return_probs = validation.as_bool("return_probs", return_probs)
        self.options = check_estimator_options(self.estimator, self.tau, options)

    def forward(self, logits: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if self.training:
            codes, probs = estimate(self.estimator, logits, self.tau, dim=self.dim, **self.options)
        else:
            codes, probs = argmax_choice(logits, check_logits(logits, self.dim))
        return (codes, probs) if self.return_probs else codes

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, tau={self.tau}, dim={self.dim}"


class DiscreteBottleneck(nn.Module):
    r"""Hidden states to ``num_latents`` choices among ``num_codes`` learned code-book embeddings.

    ``logits = Linear(hidden)`` reshaped to ``(*, num_latents, num_codes)``; one-hot codes from a
    [`CategoricalLayer`][reinmax.CategoricalLayer]; output ``codes @ codebook``, i.e. the chosen embeddings. With
    ``shared_codebook=False`` every latent has its own code-book.

    Args:
        in_features: size of the hidden state.
        num_codes: categories per latent (``C``).
        code_dim: size of each embedding.
        num_latents: independent choices per input (``L``).
        estimator, tau, **options: as for [`CategoricalLayer`][reinmax.CategoricalLayer].
        shared_codebook: one code-book for all latents (default) or one per latent.
        return_probs: also return ``softmax(logits)`` of shape ``(*, L, C)``.

    Shape:
        input ``(*, in_features)``; output ``(*, num_latents, code_dim)``.

    Examples:
        >>> vq = DiscreteBottleneck(32, num_codes=8, code_dim=16, num_latents=4)
        >>> vq(torch.randn(10, 32)).shape
        torch.Size([10, 4, 16])
    """

    def __init__(self, in_features: int, num_codes: int, code_dim: int, num_latents: int = 1,
                 estimator: str = "reinmax", tau: float = 1.0, shared_codebook: bool = True,
                 return_probs: bool = False, **options):
        super().__init__()
        in_features, num_codes, code_dim, num_latents = (
            validation.as_int(name, value, minimum=1) for name, value in (
                ("in_features", in_features), ("num_codes", num_codes),
                ("code_dim", code_dim), ("num_latents", num_latents)))
        shared_codebook = validation.as_bool("shared_codebook", shared_codebook)
        self.num_codes, self.code_dim, self.num_latents = num_codes, code_dim, num_latents
        self.to_logits = nn.Linear(in_features, num_latents * num_codes)
        shape = (num_codes, code_dim) if shared_codebook else (num_latents, num_codes, code_dim)
        self.codebook = nn.Parameter(torch.randn(shape) / math.sqrt(code_dim))
        self.choose = CategoricalLayer(estimator, tau, dim=-1, return_probs=True, **options)
        self.return_probs = validation.as_bool("return_probs", return_probs)

    def forward(self, hidden: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        weight = self.to_logits.weight
        validation.check_tensor("hidden", hidden, last_dim=weight.shape[1], shape=f"(*, in_features={weight.shape[1]})")
        validation.check_device("hidden", hidden, weight.device, "the module's parameters")
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise TypeError(f"hidden must have the module's dtype {weight.dtype} (or run under torch.autocast), "
                            f"got {hidden.dtype}")
        logits = self.to_logits(hidden).unflatten(-1, (self.num_latents, self.num_codes))
        codes, probs = self.choose(logits)
        if self.codebook.dim() == 2:
            out = codes @ self.codebook
        else:
            out = torch.einsum("...lc,lcd->...ld", codes, self.codebook)
        return (out, probs) if self.return_probs else out

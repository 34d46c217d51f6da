"""Folding omega away: rewrite a trained Admin network into a plain Post-LN network.

A Post-LN sublayer computes ``LN_i(x * omega_i + f_i(x))`` where ``x = LN_{i-1}(...)`` (or the
embedding for the first sublayer). Multiply the preceding LayerNorm's gamma and beta by omega
([`fold_into_norm_`][admin_torch.fold_into_norm_]), so that it emits ``omega * x``, and divide the input columns of the
sublayer's linear maps that read ``x`` by omega ([`fold_into_linears_`][admin_torch.fold_into_linears_]: fc1; q, k and v
of self-attention; only q of cross-attention, whose k and v read the encoder output), so that
``f_i`` is unchanged. The shortcut then carries ``omega * x`` with a plain ``x + f(x)``. The
first sublayer reads the embedding, which absorbs the factor instead ([`fold_into_embedding_`][admin_torch.fold_into_embedding_]).
Vector omegas (``as_parameter``) fold per feature the same way. omega must be non-zero.
"""

import copy
from typing import Iterable, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from .reference_stack import AddResidual, ResidualStack
from .residual import OmegaResidual

__all__ = ["fold_into_norm_", "fold_into_linears_", "fold_into_embedding_", "fold_reference_stack"]

OmegaLike = Union[float, Tensor, OmegaResidual]


def _omega_tensor(omega: OmegaLike, dim: int, arg: str = "omega") -> Tensor:
    """omega as a float64 vector of size ``dim`` (scalars broadcast)."""
    if isinstance(omega, OmegaResidual):
        omega = omega.omega
    if isinstance(omega, bool):
        raise TypeError(f"{arg} must be a number, a tensor of 1 or {dim} elements, or an OmegaResidual, got bool")
    if not isinstance(omega, Tensor):
        t = torch.full((dim,), validation.as_real(arg, omega), dtype=torch.float64)
    elif isinstance(omega, Tensor):
        t = omega.detach().to(dtype=torch.float64, device="cpu").reshape(-1)
        if t.numel() == 1:
            t = t.expand(dim).clone()
        elif t.numel() != dim:
            raise ValueError(f"{arg} must have 1 or {dim} elements (the feature size), got {t.numel()}")
    if not torch.isfinite(t).all() or (t == 0).any():
        raise ValueError(f"{arg} must be finite and non-zero to fold, got {t.tolist() if dim <= 8 else t}")
    return t


@torch.no_grad()
def fold_into_norm_(norm: nn.LayerNorm, omega: OmegaLike) -> None:
    """Multiply a LayerNorm's weight (gamma) and bias (beta) by omega in place, per feature.

    The norm must have an elementwise affine weight.

    Examples:
        >>> ln = nn.LayerNorm(4); fold_into_norm_(ln, 2.0); ln.weight.data
        tensor([2., 2., 2., 2.])
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(norm, nn.Module) or not isinstance(weight, Tensor):
        raise TypeError(f"norm must be a LayerNorm with an elementwise affine weight, got {type(norm).__name__}")
    w = _omega_tensor(omega, weight.numel())
    weight.mul_(w.to(weight).view_as(weight))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, Tensor):
        bias.mul_(w.to(bias).view_as(bias))


@torch.no_grad()
def fold_into_linears_(linears: Iterable[Union[nn.Linear, Tensor]], omega: OmegaLike) -> None:
    """Divide the input columns of each linear map by omega in place (``W[:, d] /= omega[d]``),
    so that ``linear(omega * x) == old_linear(x)``. Biases are unchanged. An entry may be a 2-d
    weight tensor (or a view of one, such as the query rows of a packed ``in_proj_weight``)."""
    if isinstance(linears, (nn.Module, Tensor)):
        linears = [linears]
    for lin in linears:
        weight = lin if isinstance(lin, Tensor) else getattr(lin, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(f"linears must hold nn.Linear modules (2-d weight), got {type(lin).__name__}")
        w = _omega_tensor(omega, weight.shape[1])
        weight.div_(w.to(weight).view(1, -1))


@torch.no_grad()
def fold_into_embedding_(embedding: Union[nn.Embedding, nn.Linear, Tensor], omega: OmegaLike) -> None:
    """Multiply what an embedding produces by omega per feature, in place: the table of an
    ``nn.Embedding`` (or its ``(num, dim)`` weight, or any tensor whose last dimension is the features,
    such as XLNet's ``mask_emb``), or the output rows and bias of an ``nn.Linear``
    (an input projection). Note that a table shared with an output projection scales that too,
    and a non-learned (sinusoidal) positional embedding has to be scaled where it is added."""
    if isinstance(embedding, nn.Linear):
        w = _omega_tensor(omega, embedding.out_features)
        embedding.weight.mul_(w.to(embedding.weight).view(-1, 1))
        if embedding.bias is not None:
            embedding.bias.mul_(w.to(embedding.bias))
        return
    weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(f"embedding must be an nn.Embedding, an nn.Linear or a weight tensor (2-d or more) whose "
                        f"last dimension is the features, got {type(embedding).__name__}")
    w = _omega_tensor(omega, weight.shape[-1])
    weight.mul_(w.to(weight).view(*[1] * (weight.dim() - 1), -1))


def fold_reference_stack(model: ResidualStack) -> ResidualStack:
    """A plain Post-LN copy of an Admin [`ResidualStack`][admin_torch.ResidualStack]
    (``make_stack('admin', ...)``) computing the same outputs; ``model`` is not modified.

    Each omega goes into the LayerNorm before its sublayer (the input LayerNorm for the first
    sublayer) and out of the sublayer's input linears; the residuals become ``x + f_x``.

    Examples:
        >>> from admin_torch import make_stack
        >>> admin = make_stack('admin', 6, 32, seed=0)
        >>> plain = fold_reference_stack(admin)
        >>> x = torch.randn(2, 5, 32)
        >>> (admin(x) - plain(x)).abs().max() < 1e-5
        tensor(True)
    """
    if not isinstance(model, ResidualStack) or model.kind != "admin":
        raise TypeError(
            "model must be an admin ResidualStack (make_stack('admin', ...)); for fairseq models use the "
            "fold_into_* building blocks (see fairseq_plugins)"
        )
    folded = copy.deepcopy(model)
    prev_norms = [folded.input_norm] + list(folded.norms)[:-1]
    for i, (f, res) in enumerate(zip(folded.sublayers, folded.residuals)):
        if not isinstance(res, OmegaResidual):
            raise TypeError(f"residual {i} is a {type(res).__name__}, not an OmegaResidual")
        fold_into_norm_(prev_norms[i], res)
        fold_into_linears_(f.input_linears(), res)
        folded.residuals[i] = AddResidual()
    folded.kind = "post_ln"
    return folded

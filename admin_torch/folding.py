"""Folding omega away: rewrite a trained Admin network into a plain Post-LN network.

A Post-LN sublayer computes ``LN_i(x * omega_i + f_i(x))`` where ``x = LN_{i-1}(...)`` (or the
embedding for the first sublayer). Multiply the preceding LayerNorm's gamma and beta by omega
([`fold_into_norm_`][admin_torch.fold_into_norm_]), so that it emits ``omega * x``, and divide the input columns of the
sublayer's linear maps that read ``x`` by omega ([`fold_into_linears_`][admin_torch.fold_into_linears_]: fc1; q, k and v
of self-attention; only q of cross-attention, whose k and v read the encoder output), so that
``f_i`` is unchanged. The shortcut then carries ``omega * x`` with a plain ``x + f(x)``. The
first sublayer reads the embedding, which absorbs the factor instead ([`fold_into_embedding_`][admin_torch.fold_into_embedding_]).
Vector omegas (``as_parameter``) fold per feature the same way. omega must be non-zero.

Three levels, each built on the one before:

* one module: [`fold_into_norm_`][admin_torch.fold_into_norm_], [`fold_into_linears_`][admin_torch.fold_into_linears_],
  [`fold_into_embedding_`][admin_torch.fold_into_embedding_];
* one stack of layers described by [`LayerKind`][admin_torch.LayerKind]: `fold_stack_` (fairseq's fold uses it too);
* a whole converted model: `fold_model`, the pure-torch core of [`fold`][admin_torch.fold], which finds the stacks
  (`admin_torch.stacks`), checks that every one folds exactly, folds a deep copy and gives its layers back their
  stock classes (`fold_reference_stack` for the reference stacks of [`make_stack`][admin_torch.make_stack]).
"""

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from . import layers as admin_layers
from .adapter import Adapter
from .architectures import SHARED_LAYER_FOLD, LayerKind, kind_key, layer_kind
from .hooks import check_removable, remove_hooks
from .reference_stack import AddResidual, ResidualStack
from .residual import OmegaResidual
from .stacks import find_stacks, is_converted, omegas_of, resolve

__all__ = ["fold_into_norm_", "fold_into_linears_", "fold_into_embedding_", "fold_reference_stack", "fold_stack_",
           "fold_model", "SHARED_FOLD_OUTPUTS"]

OmegaLike = Union[float, Tensor, OmegaResidual]
#: the ``embedding=`` argument of [`fold`][admin_torch.fold]: module(s), or a dict ``{stack name: module(s)}``
Embedding = Union[nn.Module, Sequence[nn.Module], Dict[str, Union[nn.Module, Sequence[nn.Module]]]]


def _omega_tensor(omega: OmegaLike, dim: int, arg: str = "omega") -> Tensor:
    """omega as a float64 vector of size ``dim`` (scalars broadcast)."""
    if isinstance(omega, OmegaResidual):
        omega = omega.omega
    if isinstance(omega, bool):
        raise TypeError(f"{arg} must be a number, a tensor of 1 or {dim} elements, or an OmegaResidual, got bool")
    if not isinstance(omega, Tensor):
        t = torch.full((dim,), validation.as_real(arg, omega), dtype=torch.float64)
    elif isinstance(omega, Tensor):
        # a complex tensor would lose its imaginary part in the cast, a bool one read as 0 / 1: not omegas
        if omega.is_complex() or omega.dtype == torch.bool:
            raise TypeError(f"{arg} must be a real (floating or integer) tensor, got dtype {omega.dtype}")
        if omega.is_meta:
            raise ValueError(f"{arg} must hold values to fold, got a tensor on the meta device")
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


# ---------------------------------------------------------------- one stack

@torch.no_grad()
def fold_stack_(entries: Sequence[Tuple[nn.Module, LayerKind, Sequence]], first: Sequence[nn.Module],
                first_is_norm: bool, model: Optional[nn.Module] = None) -> List[nn.Module]:
    """Move every omega of one stack into what produces its sublayer's input, in place.

    The algorithm behind [`fold`][admin_torch.fold], for any stack described by [`LayerKind`][admin_torch.LayerKind]
    (fairseq's layers use it too: `fairseq_plugins.fold_checkpoint`). Each omega multiplies the LayerNorm (or, for
    the stack's first sublayer, the input LayerNorm or the embedding modules) that produces its sublayer's input
    ``x``, and divides the input columns of the linear maps that read ``x``.

    Args:
        entries: ``(layer, kind, omegas)`` per layer in stack order: ``layer`` holds the LayerNorms and
            linear maps named by ``kind`` (changed in place), ``omegas`` one per sublayer (numbers,
            tensors or [`OmegaResidual`][admin_torch.OmegaResidual] modules, possibly of another copy of the model).
        first: what produces the first layer's input: ``[LayerNorm, *embeddings added after it]`` when
            ``first_is_norm``, else the ``nn.Embedding`` / ``nn.Linear`` modules whose outputs sum to it.
        first_is_norm: whether ``first`` starts with the stack's input LayerNorm.
        model: the model holding ``first``; an embedding weight shared with other modules of it (a
            tied output projection) is untied before it is scaled.

    Returns:
        The embedding modules whose shared weight was untied (empty when none).
    """
    prev_last = None
    untied = []
    for layer, kind, omegas in entries:
        if len(omegas) != len(kind.sublayers):
            raise ValueError(f"{type(layer).__name__}: {len(omegas)} omegas for {len(kind.sublayers)} sublayers")
        for sub, omega in zip(kind.sublayers, omegas):
            fold_into_linears_(_readers(layer, sub.readers), omega)
            if sub.source is not None:
                fold_into_norm_(resolve(layer, sub.source), omega)
            elif prev_last is not None:
                fold_into_norm_(prev_last, omega)
            else:
                if first_is_norm:
                    fold_into_norm_(first[0], omega)
                for emb in first[1 if first_is_norm else 0:]:  # embeddings added to (or making) the input
                    if model is not None and _untie(emb, model):
                        untied.append(emb)
                    fold_into_embedding_(emb, omega)
        prev_last = resolve(layer, kind.last_norm)
    return untied


def _readers(layer: nn.Module, paths: Iterable[str]) -> List[Union[nn.Module, Tensor]]:
    out = []
    for path in paths:
        if path.endswith("[input_first]"):  # (in_features, ...) weight: its transposed 2-d view
            weight = resolve(layer, path[:-len("[input_first]")])
            out.append(weight.view(weight.shape[0], -1).t())
        elif path.endswith("[q]"):
            mha = resolve(layer, path[:-len(".in_proj_weight[q]")])
            out.append(mha.in_proj_weight[: mha.embed_dim] if mha.in_proj_weight is not None else mha.q_proj_weight)
        elif path.endswith("in_proj_weight"):
            mha = resolve(layer, path[:-len(".in_proj_weight")])
            out += [mha.in_proj_weight] if mha.in_proj_weight is not None else \
                [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        else:
            out.append(resolve(layer, path))
    return out


def _untie(module: nn.Module, model: nn.Module) -> bool:
    """Give ``module`` its own weight when other modules of ``model`` share it (a tied output projection);
    True when it did."""
    done = False
    for attr in ("weight", "bias"):
        t = getattr(module, attr, None)
        if not isinstance(t, Tensor):
            continue
        users = [n for n, p in model.named_parameters(remove_duplicate=False) if p is t]
        if len(users) > 1:
            setattr(module, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            done = True
    return done


# ---------------------------------------------------------------- a whole model

@torch.no_grad()
def fold_model(model: nn.Module, *, embedding: Optional[Embedding] = None, adapters: Sequence[Adapter] = ()
               ) -> nn.Module:
    """The core of [`fold`][admin_torch.fold]: the same, with ``adapters`` in place of
    `admin_torch.api.ADAPTERS` (none: pure torch).

    Every check runs first, and a refused call copies and changes nothing; then the deep copy is folded and
    each adapter's [`after_fold`][admin_torch.adapter.Adapter.after_fold] runs on it, in order (not for a
    [`ResidualStack`][admin_torch.ResidualStack], folded by `fold_reference_stack`).

    Args:
        model: as for [`fold`][admin_torch.fold].
        embedding: as for [`fold`][admin_torch.fold].
        adapters: the framework adapters whose after-fold step runs on the folded copy.

    Returns:
        The folded deep copy of ``model``.
    """
    if isinstance(model, ResidualStack):
        if embedding is not None:
            raise ValueError("embedding= is not used for a ResidualStack (its input LayerNorm takes the first omega)")
        return fold_reference_stack(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    applications: Dict[int, int] = {}
    full = [(prefix, sk, [(n, m, k) for n, m, k in layers if is_converted(m)])
            for prefix, sk, layers in find_stacks(model, applications)]
    full = [entry for entry in full if entry[2]]
    if not full:
        raise ValueError("model has no Admin layer to fold (apply admin_torch.convert first)")
    # every check first: a refused call leaves nothing changed (and copies nothing)
    names = {id(m): n for n, m in model.named_modules()}
    stack_names = {prefix[:-1] for prefix, _, _ in full}
    if isinstance(embedding, dict):
        wanted = sorted(p[:-1] for p, sk, _ in full if sk is None or sk.input_norm is None)
        unknown = [k for k in embedding if k not in stack_names]
        if unknown:
            raise ValueError(f"embedding: {unknown[0]!r} is not a stack of model; the stacks that read an "
                             f"embedding are {wanted}")
    plans = []
    division = set()  # stacks whose layers are shared across depth: omega divides the branch outputs
    for prefix, sk, layers in full:
        stack = prefix[:-1]
        shared_depth = any(applications.get(id(layer), 1) > 1 for _, layer, _ in layers)
        for name, layer, kind in layers:
            check_removable(name, layer)
            if kind.fold_blocker is not None:
                raise ValueError(f"{name}: cannot fold exactly: {kind.fold_blocker}")
            if len(omegas_of(layer)) != len(kind.sublayers):
                raise ValueError(f"{name}: {len(omegas_of(layer))} omegas for {len(kind.sublayers)} sublayers; "
                                 "convert and fold must see the same model (convert the whole model)")
            if shared_depth:
                reason = _shared_fold_blocker(layer, kind, applications.get(id(layer), 1))
                if reason is not None:
                    raise ValueError(f"{name}: cannot fold exactly: {reason}")
        if shared_depth:
            division.add(stack)
            plans.append((stack, None, [], [(n, m) for n, m, _ in layers], [k for _, _, k in layers]))
            continue
        first, input_norm = None, None
        linear = resolve(model, prefix + sk.input_linear) if sk is not None and sk.input_linear else None
        if linear is not None:
            first = [(names[id(linear)], linear)]
        elif sk is not None and sk.input_norm:
            input_norm = prefix + sk.input_norm
            first = [(prefix + p, resolve(model, prefix + p)) for p in sk.inputs]
        else:
            first = _embedding_for(stack, embedding, names)
            if first is None and sk is not None and sk.inputs:
                first = [(prefix + p, resolve(model, prefix + p)) for p in sk.inputs]
            if first is None:
                raise ValueError(
                    f"stack {stack or '(the model)'!r}: its first layer reads an input no LayerNorm of the model "
                    "produces; pass embedding= (the nn.Embedding / nn.Linear module(s) producing it, or a dict "
                    "{stack name: module(s)})")
        if sk is not None and sk.fold_check is not None:
            owner = resolve(model, stack) if stack else model
            reason = sk.fold_check(owner, lambda layer: [_omega_tensor(o, resolve(layer, sub.norm).normalized_shape[0])
                                                          for o, sub in zip(omegas_of(layer), layer_kind(layer).sublayers)])
            if reason is not None:
                raise ValueError(f"stack {stack or '(the model)'!r}: cannot fold exactly: {reason}")
        plans.append((stack, input_norm, first, [(n, m) for n, m, _ in layers], [k for _, _, k in layers]))
    shared = _check_shared_embeddings([p[:4] for p in plans])
    folded = copy.deepcopy(model)
    scaled = set()  # a module feeding several stacks (with equal omegas) is scaled once
    untied = []
    for stack, input_norm, first, layers, kinds in plans:
        if stack in division:
            for name in dict.fromkeys(n for n, _ in layers):  # each shared layer once
                layer = resolve(folded, name)
                _fold_into_outputs_(layer, omegas_of(layer))
            continue
        first_modules = [resolve(folded, n) if n else folded for n, m in first if id(m) not in scaled]
        scaled.update(id(m) for _, m in first if id(m) in shared)
        if input_norm is not None:
            first_modules = [resolve(folded, input_norm)] + first_modules
        stack_layers = [resolve(folded, n) for n, _ in layers]
        entries = [(layer, kind, omegas_of(layer)) for layer, kind in zip(stack_layers, kinds)]
        untied += fold_stack_(entries, first_modules, input_norm is not None, model=folded) or []
    for _, _, _, layers, _ in plans:
        for name in dict.fromkeys(n for n, _ in layers):
            _strip(resolve(folded, name))
    for adapter in adapters:
        adapter.after_fold(folded, untied=bool(untied))
    return folded


def _embedding_for(stack: str, embedding: Optional[Embedding], names: Dict[int, str]
                   ) -> Optional[List[Tuple[str, nn.Module]]]:
    """``[(name, module)]`` of ``model`` producing the input of ``stack``, from the ``embedding=`` argument
    (``names``: id -> name of every submodule of ``model``); a module listed twice counts once."""
    if embedding is None:
        return None
    if isinstance(embedding, dict):
        embedding = embedding.get(stack)
        if embedding is None:
            return None
    modules = [embedding] if isinstance(embedding, nn.Module) else list(embedding)
    if not modules:
        raise ValueError(f"embedding: an empty list for stack {stack or '(the model)'!r}; give the nn.Embedding / "
                         "nn.Linear module(s) whose outputs sum to its input")
    out: List[Tuple[str, nn.Module]] = []
    for m in modules:
        if not isinstance(m, (nn.Embedding, nn.Linear)):
            raise TypeError(f"embedding must be an nn.Embedding or nn.Linear of model (or a list, or a dict "
                            f"stack name -> those), got {type(m).__name__}")
        if id(m) not in names:
            raise ValueError("embedding: a module given is not a submodule of model")
        if all(m is not seen for _, seen in out):
            out.append((names[id(m)], m))
    return out


def _embedding_dim(module: Union[nn.Module, Tensor]) -> int:
    if isinstance(module, Tensor):  # a parameter whose last dimension is the features (XLNet's mask_emb)
        return module.shape[-1]
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def _check_shared_embeddings(plans) -> set:
    """The ids of embedding modules that feed several stacks; ValueError unless the first omegas of
    those stacks are equal.

    A module called for two stacks (one ``nn.Embedding`` of a shared vocabulary feeding the encoder
    and the decoder) emits one output: it can carry one factor, so it is scaled once, which is exact
    only when every stack it feeds has the same first omega.
    """
    feeds: Dict[int, List[Tuple[str, str, Tensor]]] = {}
    for stack, _, first, layers in plans:
        if first is None:
            continue
        omega = omegas_of(layers[0][1])[0]
        for name, m in first:
            feeds.setdefault(id(m), []).append((name, stack, _omega_tensor(omega, _embedding_dim(m))))
    shared = set()
    for key, uses in feeds.items():
        if len(uses) < 2:
            continue
        shared.add(key)
        name, stack, omega = uses[0]
        for _, other, other_omega in uses[1:]:
            if not torch.equal(omega, other_omega):
                def show(t):
                    return f"{t[0].item():.6g}" if bool((t == t[0]).all()) else f"a vector of {t.numel()}"
                raise ValueError(
                    f"embedding: {name or '(the model)'!r} feeds stacks {stack or '(the model)'!r} (omega "
                    f"{show(omega)}) and {other or '(the model)'!r} (omega {show(other_omega)}); a module called "
                    "for both emits one output, which cannot take two different factors, so no stock model "
                    "computes the same function. Give each stack its own module (modules sharing one weight "
                    "are fine: fold unties the weight), or equal omegas (e.g. output_change_scale='O(n)')")
    return shared


#: a layer shared across depth (ALBERT's ``num_hidden_groups < num_hidden_layers``) folds by dividing, per residual,
#: the output projection(s) that end its branch ``f`` by that residual's omega: with one number ``w`` per residual,
#: ``LN(w x + f(x)) = LN(x + f(x) / w)`` up to the LayerNorm's eps (its input is scaled by ``1/w``, so eps acts as
#: ``eps * w^2``: each output differs by at most ``|gamma * n| * eps * |1 - 1/w^2| / (2 Var)`` for ``w >= 1``
#: (Admin's omegas; twice that for ``w < 1``), ``n`` the normalised value and ``Var`` the variance of the LayerNorm's
#: input: with ALBERT's eps 1e-12, far below float32 rounding). Per layer kind: one tuple of
#: module paths per sublayer, in the order of the kind's sublayers.
SHARED_FOLD_OUTPUTS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "transformers.models.albert.modeling_albert.AlbertLayer": (("attention.dense",), ("ffn_output",)),
}


def _shared_fold_blocker(layer: nn.Module, kind: LayerKind, times: int) -> Optional[str]:
    """Why a layer of a stack whose layers are shared across depth cannot be folded (None: it can)."""
    outputs = SHARED_FOLD_OUTPUTS.get(kind_key(type(layer)))
    if outputs is None or len(outputs) != len(kind.sublayers):
        return SHARED_LAYER_FOLD.format(times=times)
    for i, (omega, sub) in enumerate(zip(omegas_of(layer), kind.sublayers)):
        t = _omega_tensor(omega, resolve(layer, sub.norm).normalized_shape[0], arg=f"omega of {sub.norm}")
        if not bool((t == t[0]).all()):
            return (f"its layers are shared across depth (one layer applied {times} times per forward) and the omega "
                    f"of {sub.norm} is a vector whose entries differ (trained as_parameter=True omegas): a LayerNorm "
                    "is invariant to one scale, not to a scale per feature, so no stock model computes the Admin "
                    "function. Keep the Admin form (save_pretrained writes it), or train with scalar omegas "
                    "(as_parameter=False), which fold")
    return None


@torch.no_grad()
def _fold_into_outputs_(layer: nn.Module, omegas: Sequence[OmegaResidual]) -> None:
    """Divide the output projection(s) of each sublayer of ``layer`` by its (uniform) omega (see
    `SHARED_FOLD_OUTPUTS`)."""
    for paths, omega in zip(SHARED_FOLD_OUTPUTS[kind_key(type(layer))], omegas):
        w = float(omega.omega.detach().reshape(-1)[0])
        for path in paths:
            linear = resolve(layer, path)
            linear.weight.div_(w)
            if linear.bias is not None:
                linear.bias.div_(w)


def _strip(layer: nn.Module) -> None:
    """Back to the stock class: no omegas, no hooks."""
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        names, stock = admin_layers.ENCODER_RESIDUALS, nn.TransformerEncoderLayer
    elif isinstance(layer, admin_layers.TransformerDecoderLayer):
        names, stock = admin_layers.DECODER_RESIDUALS, nn.TransformerDecoderLayer
    else:
        remove_hooks(layer)
        del layer.admin_omegas
        return
    for name in names:
        delattr(layer, name)
    layer.__class__ = stock

"""Admin for models built elsewhere: [`convert`][admin_torch.convert] a model's Post-LN layers in place, [`fold`][admin_torch.fold] it back.

Supported (`admin_torch.architectures` describes each): torch.nn's ``TransformerEncoderLayer`` and
``TransformerDecoderLayer``, and HuggingFace's BERT, RoBERTa, BART and Marian layers. ``convert``
counts N per stack (2 per encoder layer, 3 per decoder layer; a stack is the layer list of an
``nn.TransformerEncoder``, a ``BertModel``, a ``BartEncoder``..., or the layers of one kind under one
parent) and gives every residual ``norm(x + f(x))`` the form ``norm(omega * x + f(x))``.

``fold`` returns a deep copy whose modules are the stock classes again, computing the same
function with no Admin left: each omega moves into whatever produces its sublayer's input (a LayerNorm,
or the stack's embedding) and out of the linear maps that read it.

Examples:
    >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64), 6,
    ...                                   enable_nested_tensor=False)
    >>> enc = convert(enc)           # 6 layers -> N = 12, omega = calculate_init(12)
    >>> type(enc.layers[0]).__name__
    'TransformerEncoderLayer'
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 32), enc)   # ... trained, then:
    >>> plain = fold(model, embedding=model[0])   # the first layer reads the embedding's output
    >>> tokens = torch.randint(0, 100, (2, 7))
    >>> torch.allclose(plain.eval()(tokens), model.eval()(tokens), atol=1e-5)
    True
"""

import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from toolbox_core import validation

from . import layers as admin_layers
from .architectures import (LAYER_KINDS, PRE_LN_MODEL_TYPES, SHARED_LAYER_FOLD, UNSUPPORTED_MODEL_TYPES, LayerKind,
                            StackKind, kind_key, layer_kind, stack_kind)
from .folding import _omega_tensor, fold_into_embedding_, fold_into_linears_, fold_into_norm_, fold_reference_stack
from .reference_stack import ResidualStack
from .residual import OUTPUT_CHANGE_SCALES, OmegaResidual, as_module

__all__ = ["convert", "fold", "fold_stack_", "admin_stacks"]

Embedding = Union[nn.Module, Sequence[nn.Module], Dict[str, Union[nn.Module, Sequence[nn.Module]]]]


# ---------------------------------------------------------------- finding the stacks

def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _stacks_full(model: nn.Module, applications: Optional[Dict[int, int]] = None):
    """``[(stack name, StackKind or None, [(layer name, layer, LayerKind)])]`` of every supported layer.

    ``applications``, when given, receives ``id(layer) -> times one forward applies it`` for layers of a
    stack with a ``sequence`` (ALBERT's shared layers); every other layer is applied once.

    A decoder layer whose cross-attention runs only with encoder states (BART's) is described without it
    when ``model`` holds no encoder stack (``BartForCausalLM``): then N and [`fold`][admin_torch.fold] follow the
    sublayers that run.
    """
    names = {id(m): n for n, m in model.named_modules()}
    seen = set()
    stacks = []
    for name, module in model.named_modules():
        kind = stack_kind(module)
        if kind is None:
            continue
        try:
            layer_list = kind.sequence(module) if kind.sequence is not None else _get(module, kind.layers)
        except AttributeError:
            continue
        if kind.sequence is not None:
            unique = {id(m): m for m in layer_list}  # in first-application order
            if applications is not None:
                for m in layer_list:
                    applications[id(m)] = applications.get(id(m), 0) + 1
            layer_list = list(unique.values())
        layers = [(names[id(m)], m, layer_kind(m)) for m in layer_list if id(m) not in seen]
        layers = [entry for entry in layers if entry[2] is not None]
        if layers:
            prefix = f"{name}." if name else ""
            stacks.append((prefix, kind, layers))
            seen.update(id(m) for _, m, _ in layers)
    # supported layers outside any known stack: one stack per parent and layer type
    loose: Dict[Tuple[str, str], list] = {}
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        kind = layer_kind(module)
        if kind is not None:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            loose.setdefault((parent, kind_key(type(module))), []).append((name, module, kind))
    stacks += [(parent + "." if parent else "", None, layers) for (parent, _), layers in loose.items()]
    if not any(k.role == "encoder" for _, _, layers in stacks for _, _, k in layers):
        stacks = [(p, sk, [(n, m, k.without_cross or k) for n, m, k in layers]) for p, sk, layers in stacks]
    return stacks


def _stacks(model: nn.Module) -> List[Tuple[str, Optional[str], List[Tuple[str, nn.Module]]]]:
    """``[(stack name, input norm path or None, [(layer name, layer)])]`` of every supported layer."""
    return [(prefix[:-1], prefix + sk.input_norm if sk is not None and sk.input_norm else None,
             [(n, m) for n, m, _ in layers]) for prefix, sk, layers in _stacks_full(model)]


def admin_stacks(model: nn.Module):
    """The stacks of converted layers: ``[(stack name, input norm path or None, [(layer name, layer)])]``."""
    return [(s, norm, [(n, m) for n, m in layers if _is_converted(m)]) for s, norm, layers in _stacks(model)
            if any(_is_converted(m) for _, m in layers)]


def _is_converted(layer: nn.Module) -> bool:
    return isinstance(layer, (admin_layers.TransformerEncoderLayer, admin_layers.TransformerDecoderLayer)) \
        or isinstance(getattr(layer, "admin_omegas", None), nn.ModuleList)


def _omegas_of(layer: nn.Module) -> List[OmegaResidual]:
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        return [getattr(layer, n) for n in admin_layers.ENCODER_RESIDUALS]
    if isinstance(layer, admin_layers.TransformerDecoderLayer):
        return [getattr(layer, n) for n in admin_layers.DECODER_RESIDUALS]
    return list(layer.admin_omegas)


# ---------------------------------------------------------------- the hooks (HuggingFace layers)

class _Slot:
    """Holds ``x`` of the current sublayer of one layer call, from its capture to the LayerNorm that uses it.

    A copy (``copy.deepcopy``, pickling) starts empty: a slot can hold a non-leaf tensor when a
    checkpointed recomputation stopped early, and such a tensor can be neither copied nor pickled.
    """

    __slots__ = ("x",)

    def __init__(self):
        self.x: Optional[Tensor] = None

    def __deepcopy__(self, memo):
        return _Slot()

    def __getstate__(self):
        return None

    def __setstate__(self, state):
        self.x = None


def _first_input(args, kwargs):
    if args:
        return args[0]
    for key in ("hidden_states", "query", "x", "input"):
        if key in kwargs:
            return kwargs[key]
    return None


class _CaptureInput:
    """Forward pre-hook of the submodule that first reads the sublayer input (``self_attn``): that input is x.

    ``arg_indices`` other than ``(0,)``: several streams through one LayerNorm (XLNet's h and g); the slot
    then holds a list, taken in that order by the norm's calls. It runs inside the layer's forward, so
    gradient checkpointing, which replays ``forward`` (transformers 5.x), replays it too."""

    def __init__(self, slot: _Slot, arg_indices: Tuple[int, ...] = (0,)):
        self.slot, self.arg_indices = slot, tuple(arg_indices)

    def __call__(self, module, args, kwargs):
        if self.arg_indices == (0,):
            self.slot.x = _first_input(args, kwargs)
            return
        xs = [args[i] if i < len(args) else (_first_input(args, kwargs) if i == 0 else None)
              for i in self.arg_indices]
        self.slot.x = [x for x in xs if x is not None]


class _CaptureOutput:
    """Forward hook of a sublayer's LayerNorm: its output is x of the next sublayer (whichever runs)."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, output):
        self.slot.x = output


class _Admin:
    """Forward pre-hook of a sublayer's LayerNorm: its input ``s = x + f(x)`` becomes ``omega * x + f(x)``."""

    def __init__(self, slot: _Slot, omega: OmegaResidual):
        self.slot, self.omega = slot, omega

    def __call__(self, module, args):
        x = self.slot.x
        if isinstance(x, list):  # one x per stream, in the order the norm is called
            x = x.pop(0) if x else None
            if not self.slot.x:
                self.slot.x = None
        else:
            self.slot.x = None  # not kept alive beyond the sublayer
        if x is None:
            # never a silently different function: this norm ran without its sublayer's input captured
            raise RuntimeError(f"admin_torch: a converted {type(module).__name__} ran outside its layer's forward "
                               "(no residual input captured); call the layer, not its LayerNorm")
        s = args[0]
        return (self.omega(x, s - x),) + tuple(args[1:])


class _CaptureResidualArg:
    """Forward pre-hook of a module called as ``module(f_x, x)`` (``BertSelfOutput``, ``BertOutput``):
    its second argument (or ``input_tensor=``) is x. The module computes ``LayerNorm(... + x)`` inside
    its own call, so capture and use never straddle a checkpoint boundary."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot.x = args[1] if len(args) >= 2 else kwargs.get("input_tensor")


class _ClearSlots:
    """Empties every slot of a layer: a forward pre-hook on entry, and a forward hook with
    ``always_call=True`` on exit, which runs when the forward raised too. A failed forward (a wrong
    input shape, an out-of-memory error) leaves no captured tensor behind: none is kept alive, none
    leaks into the next forward, and ``copy.deepcopy`` / [`fold`][admin_torch.fold] work (a non-leaf tensor
    cannot be deep-copied)."""

    def __init__(self, slots: Sequence[_Slot]):
        self.slots = tuple(slots)

    def __call__(self, module, args, *output):
        for slot in self.slots:
            slot.x = None


#: where a converted hooks-mechanism layer keeps the RemovableHandle of every hook convert installed
_HANDLES = "_admin_hook_handles"


def _install_hooks(layer: nn.Module, kind: LayerKind, omegas: Sequence[OmegaResidual]) -> None:
    # one slot per layer: the sublayers run in order, each capture is consumed by the next norm
    slot = _Slot()
    clear = _ClearSlots([slot])
    handles = [layer.register_forward_pre_hook(clear, prepend=True),
               layer.register_forward_hook(clear, always_call=True)]
    for sub, omega in zip(kind.sublayers, omegas):
        norm = _get(layer, sub.norm)
        if sub.residual_arg is not None:
            handles.append(_get(layer, sub.residual_arg).register_forward_pre_hook(
                _CaptureResidualArg(slot), with_kwargs=True))
        elif sub.capture is not None or sub.source is None:
            target = _get(layer, sub.capture) if sub.capture is not None else layer
            handles.append(target.register_forward_pre_hook(_CaptureInput(slot, sub.capture_args), with_kwargs=True))
        handles.append(norm.register_forward_pre_hook(_Admin(slot, omega)))
        # x of a later sublayer that reads this norm's output without a residual argument or a capture:
        # whichever sublayer runs next takes it (a decoder layer skipping its cross-attention stays exact)
        if sub.norm != kind.last_norm and any(o.residual_arg is None and o.capture is None and o.source is not None
                                              for o in kind.sublayers):
            handles.append(norm.register_forward_hook(_CaptureOutput(slot)))
    # a plain attribute: deep-copied and pickled with the model, each handle then refers to the
    # hook dictionaries of its own copy
    setattr(layer, _HANDLES, handles)


def _check_removable(name: str, layer: nn.Module) -> None:
    """ValueError unless the hooks of a converted hooks-mechanism ``layer`` can be removed."""
    if isinstance(getattr(layer, "admin_omegas", None), nn.ModuleList) and \
            not isinstance(getattr(layer, _HANDLES, None), list):
        raise ValueError(f"{name}: converted layer without its hook handles (converted by an older version of "
                         "admin_torch?); convert a stock copy of the model again")


def _remove_hooks(layer: nn.Module) -> None:
    for handle in getattr(layer, _HANDLES, ()):
        handle.remove()
    if hasattr(layer, _HANDLES):
        delattr(layer, _HANDLES)


# ---------------------------------------------------------------- convert

def _check_post_ln(name: str, layer: nn.Module) -> None:
    if getattr(layer, "norm_first", False):
        raise ValueError(f"{name} is a Pre-LN layer (norm_first=True); Admin is for Post-LN layers only")


def _pre_ln_message(model: nn.Module) -> Optional[str]:
    """The refusal for a HuggingFace model of a Pre-LN family (by ``config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return (f"{type(model).__name__} (model_type {model_type!r}) is not supported by admin_torch.convert: "
                f"{UNSUPPORTED_MODEL_TYPES[model_type]}. Nothing was changed.")
    if model_type in PRE_LN_MODEL_TYPES:
        return (f"{type(model).__name__} (model_type {model_type!r}) is a Pre-LN model (x + f(LN(x))); Admin "
                "rescales Post-LN residuals LN(omega * x + f(x)) only, so it does not apply. Nothing was changed.")
    return None



def convert(model: nn.Module, *, output_change_scale: str = "default", as_parameter: bool = False,
            qk_norm: bool = False) -> nn.Module:
    """Turn every supported Post-LN layer of ``model`` into its Admin form, in place; returns ``model``.

    Every residual ``LN(x + f(x))`` becomes ``LN(omega * x + f(x))`` with ``omega = calculate_init(N)``,
    N counted per stack (2 per encoder layer, 3 per decoder layer with cross-attention). Admin is an
    *initialization* for training from scratch: converting a pretrained checkpoint changes the function
    it computes (omega != 1) -- it is not a fine-tuning recipe.

    Args:
        model: any module holding supported layers: torch.nn's encoder/decoder layers; HuggingFace BERT
            and every BERT-like family recognised by structure (RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA,
            ERNIE, RoFormer, BigBird, Longformer, Data2VecText, DeBERTa-v2, BERT decoders with
            cross-attention), BART (incl. ``BartForCausalLM``), Marian, BlenderbotSmall, LED,
            DistilBERT, MPNet, ALBERT (a layer shared across depth keeps one omega per residual, used at
            every application; N counts applications), FSMT (fold refused), XLNet (both attention streams,
            mems), Funnel (encoder and decoder one stack; ``block_repeats`` count as applications);
            anything described in `admin_torch.LAYER_KINDS`.
        output_change_scale: ``'O(n)'``, ``'O(logn)'``, ``'default'`` or ``'O(1)'`` ([`calculate_init`][admin_torch.calculate_init]).
        as_parameter: trainable omega vectors of the hidden size.
        qk_norm: also give every attention module qk-layernorm ([`admin_torch.add_qk_norm`][admin_torch.add_qk_norm]: torch.nn's
            ``MultiheadAttention``; a model with no such module is refused, e.g. HuggingFace families).
            Pre-LN models, which ``convert`` refuses, take [`admin_torch.add_qk_norm`][admin_torch.add_qk_norm] directly.

    A HuggingFace model also gets its settings recorded in ``model.config.admin_torch`` and a
    ``save_pretrained`` that folds on save, or saves the Admin form where no stock model computes its function
    (see `admin_torch.hf_io`).

    Raises:
        ValueError: ``model`` is of a Pre-LN family or has a Pre-LN layer; it is of a family in
            `admin_torch.architectures.UNSUPPORTED_MODEL_TYPES`; it has no supported layer that
            is not converted yet; its config says it was saved from an Admin model (load it with
            [`admin_torch.from_pretrained`][admin_torch.from_pretrained]). Nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    validation.as_choice("output_change_scale", output_change_scale, OUTPUT_CHANGE_SCALES)
    as_parameter = validation.as_bool("as_parameter", as_parameter)
    qk_norm = validation.as_bool("qk_norm", qk_norm)
    message = _pre_ln_message(model)
    if message is not None:
        raise ValueError(message)
    plan = []
    applications: Dict[int, int] = {}
    for _, _, layers in _stacks_full(model, applications):
        todo = [(n, m, k) for n, m, k in layers if not _is_converted(m)]
        for name, layer, _ in todo:
            _check_post_ln(name, layer)
        # N counts residuals along the depth: a layer shared across depth (ALBERT) counts once per application
        n_res = sum(len(k.sublayers) * applications.get(id(m), 1) for _, m, k in layers)
        plan += [(layer, kind, n_res) for _, layer, kind in todo]
    if not plan:
        raise ValueError("model has no supported Post-LN layer to convert (torch.nn TransformerEncoderLayer/"
                         "TransformerDecoderLayer, HuggingFace BERT-like, BART, Marian, BlenderbotSmall, LED, "
                         "FSMT, DistilBERT, MPNet, ALBERT, XLNet, Funnel; describe others in "
                         "admin_torch.LAYER_KINDS), or all are converted")
    from . import hf_io  # noqa: the HuggingFace glue (no transformers import unless it is a HF model)
    hf_io.check_convertible(model)
    if qk_norm:
        from .qk_norm import _plan as qk_norm_plan
        qk_norm_plan(model)  # refuses (nothing changed) where qk-layernorm cannot be added
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # its nested-tensor fast path bypasses the layers' residuals
    for layer, kind, n_res in plan:  # every check passed: now change the model
        ref = next(layer.parameters())
        hidden = _get(layer, kind.sublayers[0].norm).normalized_shape[0]
        omegas = [as_module(n_res, output_change_scale, as_parameter, hidden).to(device=ref.device)
                  for _ in kind.sublayers]
        if kind.mechanism == "subclass":
            layer.__class__ = getattr(admin_layers, kind.admin_class)
            names = admin_layers.ENCODER_RESIDUALS if len(omegas) == 2 else admin_layers.DECODER_RESIDUALS
            for name, omega in zip(names, omegas):
                setattr(layer, name, omega)
        else:
            layer.admin_omegas = nn.ModuleList(omegas)
            _install_hooks(layer, kind, omegas)
    if qk_norm:
        from .qk_norm import add_qk_norm
        add_qk_norm(model)
    hf_io.after_convert(model, output_change_scale=output_change_scale, as_parameter=as_parameter)
    return model


# ---------------------------------------------------------------- fold

def _readers(layer: nn.Module, paths: Iterable[str]) -> List[Union[nn.Module, Tensor]]:
    out = []
    for path in paths:
        if path.endswith("[input_first]"):  # (in_features, ...) weight: its transposed 2-d view
            weight = _get(layer, path[:-len("[input_first]")])
            out.append(weight.view(weight.shape[0], -1).t())
        elif path.endswith("[q]"):
            mha = _get(layer, path[:-len(".in_proj_weight[q]")])
            out.append(mha.in_proj_weight[: mha.embed_dim] if mha.in_proj_weight is not None else mha.q_proj_weight)
        elif path.endswith("in_proj_weight"):
            mha = _get(layer, path[:-len(".in_proj_weight")])
            out += [mha.in_proj_weight] if mha.in_proj_weight is not None else \
                [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        else:
            out.append(_get(layer, path))
    return out


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
        omega = _omegas_of(layers[0][1])[0]
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


@torch.no_grad()
def fold(model: nn.Module, *, embedding: Optional[Embedding] = None) -> nn.Module:
    """A deep copy of a converted ``model`` with Admin folded away: stock classes, the same outputs.

    An Admin [`ResidualStack`][admin_torch.ResidualStack] (``make_stack('admin', ...)``) is folded as before
    ([`admin_torch.fold_reference_stack`][admin_torch.fold_reference_stack]).

    Args:
        model: a model [`convert`][admin_torch.convert] was applied to, or a model built from
            [`TransformerEncoderLayer`][admin_torch.TransformerEncoderLayer] / [`TransformerDecoderLayer`][admin_torch.TransformerDecoderLayer]
            (``model`` is not modified).
        embedding: where a stack's first sublayer reads an input that no LayerNorm of the model
            produces (torch.nn stacks, Marian), the ``nn.Embedding`` / ``nn.Linear`` module(s) whose
            outputs sum to that input -- one module, a list (token and position embeddings), or a dict
            ``{stack name: module(s)}`` for a model with several such stacks. A shared (tied) weight is
            untied in the copy. One module feeding several stacks (a shared vocabulary: the same
            ``nn.Embedding`` called for the encoder and the decoder) is scaled once, which is exact when
            those stacks' first omegas are equal, and refused otherwise.

    Raises:
        ValueError: nothing converted in ``model``; an input that needs ``embedding=`` and has none; an
            ``embedding=`` dict key that is not a stack, or an empty list; one embedding module feeding
            stacks whose first omegas differ; a layer whose hooks cannot be removed; a layer whose kind
            cannot be folded exactly (``LayerKind.fold_blocker``: DeBERTa-v2 with ``share_att_key``, FSMT);
            a layer applied several times per forward whose kind has no output projections to divide
            (Funnel's repeated blocks), or whose omegas differ per feature (ALBERT with shared layers and
            trained ``as_parameter`` vectors; with one number per omega it folds, see
            `SHARED_FOLD_OUTPUTS`). Nothing is copied
            or changed then.
    """
    if isinstance(model, ResidualStack):
        if embedding is not None:
            raise ValueError("embedding= is not used for a ResidualStack (its input LayerNorm takes the first omega)")
        return fold_reference_stack(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    applications: Dict[int, int] = {}
    full = [(prefix, sk, [(n, m, k) for n, m, k in layers if _is_converted(m)])
            for prefix, sk, layers in _stacks_full(model, applications)]
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
            _check_removable(name, layer)
            if kind.fold_blocker is not None:
                raise ValueError(f"{name}: cannot fold exactly: {kind.fold_blocker}")
            if len(_omegas_of(layer)) != len(kind.sublayers):
                raise ValueError(f"{name}: {len(_omegas_of(layer))} omegas for {len(kind.sublayers)} sublayers; "
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
        linear = _get(model, prefix + sk.input_linear) if sk is not None and sk.input_linear else None
        if linear is not None:
            first = [(names[id(linear)], linear)]
        elif sk is not None and sk.input_norm:
            input_norm = prefix + sk.input_norm
            first = [(prefix + p, _get(model, prefix + p)) for p in sk.inputs]
        else:
            first = _embedding_for(stack, embedding, names)
            if first is None and sk is not None and sk.inputs:
                first = [(prefix + p, _get(model, prefix + p)) for p in sk.inputs]
            if first is None:
                raise ValueError(
                    f"stack {stack or '(the model)'!r}: its first layer reads an input no LayerNorm of the model "
                    "produces; pass embedding= (the nn.Embedding / nn.Linear module(s) producing it, or a dict "
                    "{stack name: module(s)})")
        if sk is not None and sk.fold_check is not None:
            owner = _get(model, stack) if stack else model
            reason = sk.fold_check(owner, lambda layer: [_omega_tensor(o, _get(layer, sub.norm).normalized_shape[0])
                                                          for o, sub in zip(_omegas_of(layer), layer_kind(layer).sublayers)])
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
                layer = _get(folded, name)
                _fold_into_outputs_(layer, _omegas_of(layer))
            continue
        first_modules = [_get(folded, n) if n else folded for n, m in first if id(m) not in scaled]
        scaled.update(id(m) for _, m in first if id(m) in shared)
        if input_norm is not None:
            first_modules = [_get(folded, input_norm)] + first_modules
        stack_layers = [_get(folded, n) for n, _ in layers]
        entries = [(layer, kind, _omegas_of(layer)) for layer, kind in zip(stack_layers, kinds)]
        untied += fold_stack_(entries, first_modules, input_norm is not None, model=folded) or []
    for _, _, _, layers, _ in plans:
        for name in dict.fromkeys(n for n, _ in layers):
            _strip(_get(folded, name))
    from . import hf_io
    hf_io.after_fold(folded, untied=bool(untied))
    return folded


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
    for i, (omega, sub) in enumerate(zip(_omegas_of(layer), kind.sublayers)):
        t = _omega_tensor(omega, _get(layer, sub.norm).normalized_shape[0], arg=f"omega of {sub.norm}")
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
            linear = _get(layer, path)
            linear.weight.div_(w)
            if linear.bias is not None:
                linear.bias.div_(w)


@torch.no_grad()
def fold_stack_(entries: Sequence[Tuple[nn.Module, LayerKind, Sequence]], first: Sequence[nn.Module],
                first_is_norm: bool, model: Optional[nn.Module] = None) -> None:
    """Move every omega of one stack into what produces its sublayer's input, in place.

    The algorithm behind [`fold`][admin_torch.fold], for any stack described by [`LayerKind`][admin_torch.LayerKind] (fairseq's layers
    use it too). Each omega multiplies the LayerNorm (or, for the stack's first sublayer, the input
    LayerNorm or the embedding modules) that produces its sublayer's input ``x``, and divides the input
    columns of the linear maps that read ``x``.

    Args:
        entries: ``(layer, kind, omegas)`` per layer in stack order: ``layer`` holds the LayerNorms and
            linear maps named by ``kind`` (changed in place), ``omegas`` one per sublayer (numbers,
            tensors or [`OmegaResidual`][admin_torch.OmegaResidual] modules, possibly of another copy of the model).
        first: what produces the first layer's input: ``[LayerNorm, *embeddings added after it]`` when
            ``first_is_norm``, else the ``nn.Embedding`` / ``nn.Linear`` modules whose outputs sum to it.

    Returns the embedding modules whose shared weight was untied (empty when none).
        model: the model holding ``first``; an embedding weight shared with other modules of it (a
            tied output projection) is untied before it is scaled.
    """
    prev_last = None
    untied = []
    for layer, kind, omegas in entries:
        if len(omegas) != len(kind.sublayers):
            raise ValueError(f"{type(layer).__name__}: {len(omegas)} omegas for {len(kind.sublayers)} sublayers")
        for sub, omega in zip(kind.sublayers, omegas):
            fold_into_linears_(_readers(layer, sub.readers), omega)
            if sub.source is not None:
                fold_into_norm_(_get(layer, sub.source), omega)
            elif prev_last is not None:
                fold_into_norm_(prev_last, omega)
            else:
                if first_is_norm:
                    fold_into_norm_(first[0], omega)
                for emb in first[1 if first_is_norm else 0:]:  # embeddings added to (or making) the input
                    if model is not None and _untie(emb, model):
                        untied.append(emb)
                    fold_into_embedding_(emb, omega)
        prev_last = _get(layer, kind.last_norm)
    return untied


def _strip(layer: nn.Module) -> None:
    """Back to the stock class: no omegas, no hooks."""
    if isinstance(layer, admin_layers.TransformerEncoderLayer):
        names, stock = admin_layers.ENCODER_RESIDUALS, nn.TransformerEncoderLayer
    elif isinstance(layer, admin_layers.TransformerDecoderLayer):
        names, stock = admin_layers.DECODER_RESIDUALS, nn.TransformerDecoderLayer
    else:
        _remove_hooks(layer)
        del layer.admin_omegas
        return
    for name in names:
        delattr(layer, name)
    layer.__class__ = stock

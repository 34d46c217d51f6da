"""The forward hooks that give a layer Admin residuals without copying its forward code: the ``"hooks"``
mechanism of `admin_torch.architectures` (HuggingFace's layers, whose forwards are long).

Per sublayer ``norm(x + f(x))`` of a layer, a hook captures ``x`` into the layer's slot (the first input of a
submodule, or the output of the LayerNorm that ran before), and a forward pre-hook of ``norm`` turns its input
``s = x + f(x)`` into ``omega * x + f(x) = s + (omega - 1) x``: the same function as the drop-in layers of
`admin_torch.layers`. Where the sum is made inside one module called as ``module(f_x, x)`` (``residual_arg``:
HuggingFace's ``BertSelfOutput``, ``BertOutput``), one hook does it: a pre-hook of that module gives it
``omega * x`` in place of ``x``, so the module's own sum is ``f(x) + omega * x`` (no slot, no hook on the norm or
the layer: every other module of the layer keeps PyTorch's hook-free call path). Admin needs no hook at all where
`admin_torch.fused_sums` can prove the sums of the layer's (or the output module's) own forward: that forward is
then rewritten to make them, and `capture_sums` installs it instead. Capture and use happen inside
the layer's forward, so gradient checkpointing, which replays that forward, replays them too; a forward that
raises leaves no captured tensor behind.

Examples:
    >>> from admin_torch.architectures import LayerKind, Sublayer
    >>> from admin_torch.residual import as_module
    >>> class Block(nn.Module):   # LN(x + fc(x)): a Post-LN layer with one sublayer
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
    ...     def forward(self, x):
    ...         return self.norm(x + self.fc(x))
    >>> block, x, omega = Block(), torch.randn(2, 8), as_module(6)
    >>> install_hooks(block, LayerKind((Sublayer("norm", ("fc",), capture="fc"),), "norm", "hooks"), [omega])
    >>> y = block(x)
    >>> remove_hooks(block)   # a stock Block again
    >>> torch.allclose(y, block.norm(omega(x, block.fc(x))))
    True
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import fused_sums
from .architectures import LayerKind
from .fused_sums import _MissingResidualInput
from .residual import OmegaResidual
from .stacks import resolve

__all__ = ["capture_sums", "install_hooks", "remove_hooks", "check_removable", "HANDLES"]


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


def _take(slot: _Slot):
    """The captured x of the sublayer whose norm runs now, removed from ``slot`` (not kept alive beyond it)."""
    x = slot.x
    if isinstance(x, list):  # one x per stream, in the order the norm is called
        x = x.pop(0) if x else None
        if not slot.x:
            slot.x = None
    else:
        slot.x = None
    return x


class _AtNorm:
    """Forward pre-hook of a sublayer's LayerNorm: hands ``(x, s)`` to ``at_sum``, ``s = x + f(x)`` being the
    norm's input; a tensor ``at_sum`` returns replaces ``s`` (Admin), None leaves it (the monitor).
    ``strict``: a norm that runs with no x captured raises instead of being skipped."""

    def __init__(self, slot: _Slot, at_sum: Callable[[Tensor, Tensor], Optional[Tensor]], strict: bool):
        self.slot, self.at_sum, self.strict = slot, at_sum, strict

    def __call__(self, module, args):
        x = _take(self.slot)
        if x is None:
            if not self.strict:
                return None
            # never a silently different function: this norm ran without its sublayer's input captured
            raise RuntimeError(f"admin_torch: a converted {type(module).__name__} ran outside its layer's forward "
                               "(no residual input captured); call the layer, not its LayerNorm")
        out = self.at_sum(x, args[0])
        return None if out is None else (out,) + tuple(args[1:])


class _OmegaSum:
    """Admin's use of a sum: ``s = x + f(x)`` becomes ``omega * x + f(x)``, as ``s + (omega - 1) x`` (one fused
    operation: [`OmegaResidual.rescale_sum`][admin_torch.OmegaResidual.rescale_sum]); or, where the sum is yet to
    be made (``residual_arg``), ``x`` becomes ``omega * x`` (``scaled_input``)."""

    def __init__(self, omega: OmegaResidual):
        self.omega = omega

    def __call__(self, x: Tensor, s: Tensor) -> Tensor:
        return self.omega.rescale_sum(x, s)

    def scaled_input(self, x: Tensor) -> Optional[Tensor]:
        return self.omega.scaled_input(x)

    def scale(self, x: Tensor) -> Tensor:
        """``omega * x`` even while a hook watches omega (compiled code, which calls no hook added later)."""
        return self.omega._scale(x)

    def notify(self, reader: "_ScaleResidualArg") -> None:
        """Have ``reader`` switch to its captured reading when a hook is put on omega."""
        readers = getattr(self.omega, "_scaled_readers", None)
        if readers is None:
            readers = self.omega._scaled_readers = []
        readers.append(reader)


class _Admin:
    """The norm hook of models converted before `capture_sums` existed (``_AtNorm`` + ``_OmegaSum`` now): kept
    so that such models, pickled whole, still load and run."""

    def __init__(self, slot: _Slot, omega: OmegaResidual):
        self.slot, self.omega = slot, omega

    def __call__(self, module, args):
        return _AtNorm(self.slot, _OmegaSum(self.omega), strict=True)(module, args)


class _CaptureResidualArg:
    """Forward pre-hook of a module called as ``module(f_x, x)`` (``BertSelfOutput``, ``BertOutput``):
    its second argument (or ``input_tensor=``) is x. The module computes ``LayerNorm(... + x)`` inside
    its own call, so capture and use never straddle a checkpoint boundary."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot.x = _residual_arg(args, kwargs)


def _residual_arg(args, kwargs):
    """x of a module called as ``module(f_x, x)`` or ``module(f_x, input_tensor=x)``; None if it has none."""
    return args[1] if len(args) >= 2 else kwargs.get("input_tensor")


class _ScaleResidualArg:
    """The one hook of a ``residual_arg`` sublayer when its ``at_sum`` can act before the sum (``scaled_input``:
    Admin): a forward pre-hook (with kwargs) of the module called as ``module(f_x, x)`` that computes
    ``norm(f_x + x)`` in its own call; it passes ``at_sum.scaled_input(x)`` (``omega * x``) in place of ``x``, so
    the module's sum is ``f_x + omega * x``, the Admin sum. Nothing is held between calls: exact under gradient
    checkpointing and ``torch.compile``, nothing left behind by a failed forward.

    While ``scaled_input`` returns None (a hook on the omega module must see its call ``omega(x, f_x)``: the
    stability monitor's, profiling's), the sublayer is read as a captured one instead: ``x`` goes into this hook's
    own slot, a pre-hook of ``norm`` (``_AtNorm``) applies ``at_sum(x, s)``, and an exit hook of the module (always
    called, a failed forward included) empties the slot. Those two hooks are added on the first such call and
    removed on the first call that scales again; their handles go into ``handles`` (the layer's list, so that
    `remove_hooks` finds them) while they are installed. A hook put on the omega module itself switches at once
    (``at_sum.notify``), outside any forward pass: a layer compiled while it is watched (``fullgraph=True``) then
    traces the captured reading. Traced code switches nothing: it keeps the reading installed when it was traced
    (a hook added after compiling is not called by the compiled code, as for any module)."""

    def __init__(self, norm: nn.Module, at_sum, strict: bool, handles: List[RemovableHandle],
                 module: Optional[nn.Module] = None):
        self.norm, self.at_sum, self.strict, self.handles, self.module = norm, at_sum, strict, handles, module
        self.slot = _Slot()
        self.observed: Optional[List[RemovableHandle]] = None  # the two hooks of the captured reading, if installed
        if module is not None and callable(getattr(at_sum, "notify", None)):
            at_sum.notify(self)

    def __call__(self, module, args, kwargs):
        x = _residual_arg(args, kwargs)
        if x is None:  # never a silently different function
            raise _MissingResidualInput(f"admin_torch: converted {type(module).__name__} called without its residual "
                                       "input: input_tensor (the second argument, or input_tensor=) is required, "
                                       "a tensor")
        if torch.compiler.is_compiling():  # no hook is added or removed in traced code: the installed reading
            scaled = None if self.observed is not None else \
                (self.at_sum.scale(x) if callable(getattr(self.at_sum, "scale", None)) else self.at_sum.scaled_input(x))
        else:
            scaled = self.at_sum.scaled_input(x)
        if scaled is not None:
            if self.observed is not None:
                self._read_scaled()
            if len(args) >= 2:
                return (args[0], scaled) + tuple(args[2:]), kwargs
            return args, {**kwargs, "input_tensor": scaled}
        if self.observed is None:
            self._read_captured(module)
        self.slot.x = x
        return None

    def read_captured(self) -> None:
        """Switch to the captured reading now (a hook was put on the omega module); nothing if it is on."""
        if self.observed is None and self.module is not None:
            self._read_captured(self.module)

    def _read_captured(self, module: nn.Module) -> None:
        # registered from this module's pre-hook: its exit hook is one the call now running will run (PyTorch
        # reads the module's forward hooks after its forward, and again when the forward raised)
        self.observed = [self.norm.register_forward_pre_hook(_AtNorm(self.slot, self.at_sum, self.strict),
                                                             prepend=True),
                         module.register_forward_hook(_ClearSlots([self.slot]), always_call=True)]
        self.handles.extend(self.observed)

    def _read_scaled(self) -> None:
        for handle in self.observed:
            handle.remove()
            if handle in self.handles:
                self.handles.remove(handle)
        self.observed = None
        self.slot.x = None


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
HANDLES = "_admin_hook_handles"


def capture_sums(layer: nn.Module, kind: LayerKind, at_sums: Sequence[Callable[[Tensor, Tensor], Optional[Tensor]]],
                 *, strict: bool = True, handles: Optional[List[RemovableHandle]] = None) -> List[RemovableHandle]:
    """The one reader of a Post-LN layer's residual sums: for sublayer ``i`` of ``kind`` (``norm(x + f(x))``),
    ``at_sums[i](x, s)`` runs just before ``norm`` with ``x`` the sublayer's input stream (captured as the
    `Sublayer` description says) and ``s = x + f(x)`` the norm's input, both ``(..., d)``; a tensor it returns
    replaces ``s``. Admin (`install_hooks`) and the stability monitor (`stability_toolbox.sites`) both read
    layers through it, so they see the same sublayers.

    An ``at_sum`` that only rescales x (``at_sum(x, s) = s + (c - 1) x``) may say so with a method
    ``scaled_input(x)`` returning ``c x`` (or None for a call it must see as ``at_sum(x, s)``): on a sublayer
    described with ``residual_arg``, whose module makes the sum itself, ``c x`` is then passed to that module in
    place of ``x``, one hook in all (Admin's `_OmegaSum`). An ``at_sum`` with an ``omega`` (an
    `OmegaResidual`: Admin's) has its sum made by the forward that makes the sum wherever `admin_torch.fused_sums`
    proves it (`_install_fused`: no hook; its handle, with ``remove()``, goes into ``handles`` too).

    Args:
        layer: a module described by ``kind``.
        kind: its `LayerKind`.
        at_sums: one callable per sublayer, in ``kind.sublayers`` order.
        strict: a norm that runs without its x captured (called outside its layer) raises RuntimeError;
            False: it is skipped.
        handles: a list the hook handles are appended to as they are installed (a failure part-way leaves
            none the caller cannot remove); a new list by default.

    Returns:
        ``handles``, with the handles of every hook installed.

    Examples:
        >>> from admin_torch.architectures import LAYER_KINDS
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> kind = LAYER_KINDS["torch.nn.modules.transformer.TransformerEncoderLayer"]
        >>> seen = []
        >>> hs = capture_sums(layer, kind, [lambda x, s, i=i: seen.append((i, tuple(x.shape))) for i in range(2)])
        >>> _ = layer(torch.randn(3, 5, 8))
        >>> seen
        [(0, (3, 5, 8)), (1, (3, 5, 8))]
        >>> for h in hs:
        ...     h.remove()
    """
    if len(at_sums) != len(kind.sublayers):
        raise ValueError(f"at_sums: one callable per sublayer ({len(kind.sublayers)}), got {len(at_sums)}")
    handles = [] if handles is None else handles
    fused = _install_fused(layer, kind, at_sums, handles)
    # a residual_arg sublayer whose at_sum acts before the sum: one hook on its module, nothing captured
    scaled = [not done and sub.residual_arg is not None and callable(getattr(at_sum, "scaled_input", None))
              for sub, at_sum, done in zip(kind.sublayers, at_sums, fused)]
    # one slot per layer for the others: the sublayers run in order, each capture is consumed by the next norm
    slot = _Slot()
    if not all(a or b for a, b in zip(scaled, fused)):
        clear = _ClearSlots([slot])
        handles.append(layer.register_forward_pre_hook(clear, prepend=True))
        handles.append(layer.register_forward_hook(clear, always_call=True))
    reads_norm_output = any(o.residual_arg is None and o.capture is None and o.source is not None
                            for o, done in zip(kind.sublayers, fused) if not done)
    for sub, at_sum, before_sum, done in zip(kind.sublayers, at_sums, scaled, fused):
        if done:
            continue
        norm = resolve(layer, sub.norm)
        if before_sum:
            module = resolve(layer, sub.residual_arg)
            handles.append(module.register_forward_pre_hook(_ScaleResidualArg(norm, at_sum, strict, handles, module),
                                                            with_kwargs=True))
        elif sub.residual_arg is not None:
            handles.append(resolve(layer, sub.residual_arg).register_forward_pre_hook(
                _CaptureResidualArg(slot), with_kwargs=True))
        elif sub.capture is not None or sub.source is None:
            target = resolve(layer, sub.capture) if sub.capture is not None else layer
            handles.append(target.register_forward_pre_hook(_CaptureInput(slot, sub.capture_args), with_kwargs=True))
        if not before_sum:
            handles.append(norm.register_forward_pre_hook(_AtNorm(slot, at_sum, strict)))
        # x of a later sublayer that reads this norm's output without a residual argument or a capture:
        # whichever sublayer runs next takes it (a decoder layer skipping its cross-attention stays exact)
        if sub.norm != kind.last_norm and reads_norm_output:
            handles.append(norm.register_forward_hook(_CaptureOutput(slot)))
    return handles


def _install_fused(layer: nn.Module, kind: LayerKind, at_sums, handles: List) -> List[bool]:
    """Admin's sums (an ``at_sum`` with an ``omega``: `_OmegaSum`) made in the code that makes the sum
    (`admin_torch.fused_sums`) where it can be proved to be that sum: in each output module (``residual_arg``), and in
    the layer's own forward for all its other sublayers at once. Which sublayers are done, per sublayer."""
    omegas = [getattr(at_sum, "omega", None) for at_sum in at_sums]
    done = [False] * len(kind.sublayers)
    for i, (sub, omega) in enumerate(zip(kind.sublayers, omegas)):
        if isinstance(omega, OmegaResidual) and sub.residual_arg is not None \
                and sub.norm.startswith(sub.residual_arg + "."):
            handle = fused_sums.install(resolve(layer, sub.residual_arg), [sub.norm[len(sub.residual_arg) + 1:]],
                                        [omega], stream_args=(1,))
            if handle is not None:
                handles.append(handle)
                done[i] = True
    own = [i for i, sub in enumerate(kind.sublayers) if sub.residual_arg is None]
    if own and all(isinstance(omegas[i], OmegaResidual) and kind.sublayers[i].capture_args == (0,) for i in own):
        handle = fused_sums.install(layer, [kind.sublayers[i].norm for i in own], [omegas[i] for i in own],
                                    stream_args=(0,))
        if handle is not None:
            handles.append(handle)
            for i in own:
                done[i] = True
    return done


def install_hooks(layer: nn.Module, kind: LayerKind, omegas: Sequence[OmegaResidual]) -> None:
    """Give a hooks-mechanism ``layer`` of ``kind`` its Admin residuals, one omega per sublayer, in place
    (`capture_sums` with ``s -> omega * x + f(x)``).

    Its handles are kept in ``layer._admin_hook_handles`` (`remove_hooks` removes them).
    """
    handles = capture_sums(layer, kind, [_OmegaSum(omega) for omega in omegas])
    # a plain attribute: deep-copied and pickled with the model, each handle then refers to the
    # hook dictionaries of its own copy
    setattr(layer, HANDLES, handles)


def check_removable(name: str, layer: nn.Module) -> None:
    """ValueError unless the hooks of a converted hooks-mechanism ``layer`` can be removed."""
    if isinstance(getattr(layer, "admin_omegas", None), nn.ModuleList) and \
            not isinstance(getattr(layer, HANDLES, None), list):
        raise ValueError(f"{name}: converted layer without its hook handles (converted by an older version of "
                         "admin_torch?); convert a stock copy of the model again")


def remove_hooks(layer: nn.Module) -> None:
    """Remove every hook `install_hooks` gave ``layer`` (nothing where there is none)."""
    for handle in getattr(layer, HANDLES, ()):
        handle.remove()
    if hasattr(layer, HANDLES):
        delattr(layer, HANDLES)
    for omega in getattr(layer, "admin_omegas", ()):  # the residual_arg readers a hook on omega would switch
        omega.__dict__.pop("_scaled_readers", None)

"""Admin's rescaled residual connection ``x * omega + f(x)`` and its closed-form initialization.

A drop-in superset of the public admin-torch 0.1.0 API ([`calculate_init`][admin_torch.calculate_init],
[`OmegaResidual`][admin_torch.OmegaResidual], [`as_module`][admin_torch.as_module], [`as_buffer`][admin_torch.as_buffer], [`as_parameter`][admin_torch.as_parameter]): same
argument names, order, defaults and numbers, with input validation (ValueError / TypeError
instead of AssertionError / ZeroDivisionError) and omega that follows the activation dtype.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from toolbox_core import validation

__all__ = [
    "OUTPUT_CHANGE_SCALES",
    "calculate_init",
    "OmegaResidual",
    "as_module",
    "as_buffer",
    "as_parameter",
]

#: the accepted values of ``output_change_scale`` ('default' is 'O(logn)').
OUTPUT_CHANGE_SCALES = ("O(n)", "O(logn)", "default", "O(1)")


def _check_num_res_layers(num_res_layers) -> int:
    # admin-torch 0.1.0 accepts any number here; an integral float (12.0) keeps working
    n = validation.as_int("num_res_layers", num_res_layers, minimum=1, integral_float=True)
    validation.as_real("num_res_layers", n)  # an integer beyond float range: ValueError, not OverflowError
    return n


def _check_scale(output_change_scale) -> str:
    return validation.as_choice("output_change_scale", output_change_scale, OUTPUT_CHANGE_SCALES)


def _check_init_value(init_value) -> float:
    return validation.as_real("init_value", init_value)


def calculate_init(num_res_layers: int, output_change_scale: str = "O(logn)") -> float:
    r"""The closed-form Admin initialization of omega for a stack of ``num_res_layers`` sublayers.

    * ``'O(logn)'`` / ``'default'``: $\omega = \sqrt{(N + 1) / \ln(N + 1) - 1}$
    * ``'O(1)'``: $\omega = \sqrt{N}$
    * ``'O(n)'``: $\omega = 1$ (plain Post-LN)

    Args:
        num_res_layers: N, the number of residual sublayers (2 per encoder layer, 3 per decoder
            layer), an integer >= 1.
        output_change_scale: how the output change grows with depth, one of
            ``'O(n)'``, ``'O(logn)'``, ``'default'``, ``'O(1)'``.

    Returns:
        omega as a python float.

    Examples:
        >>> round(calculate_init(12), 3), round(calculate_init(12, 'O(1)'), 3)
        (2.017, 3.464)
    """
    n = _check_num_res_layers(num_res_layers)
    scale = _check_scale(output_change_scale)
    if scale in ("O(logn)", "default"):
        omega_sq = (n + 1) / math.log(n + 1) - 1
    elif scale == "O(n)":
        omega_sq = 1.0
    else:
        omega_sq = float(n)
    return omega_sq ** 0.5


class OmegaResidual(nn.Module):
    r"""Residual connection with a rescaled shortcut: ``forward(x, f_x) = x * omega + f_x``.

    omega is a 1-element buffer (not trained, in ``state_dict``), or, with ``as_parameter=True``,
    a trainable vector of size ``embed_dim`` broadcast over the last dimension of ``x``.
    omega is cast to ``x``'s dtype in the forward pass, so the output dtype is the one of the
    plain residual ``x + f_x`` under ``.half()``, ``.bfloat16()`` and autocast.

    Args:
        init_value: the initial omega (see [`calculate_init`][admin_torch.calculate_init]).
        as_parameter: make omega a trainable vector of size ``embed_dim``.
        embed_dim: the size of the last dimension of ``x``; required when ``as_parameter``.

    Shape:
        ``x``, ``f_x``: ``(*, embed_dim)``; output: the broadcast shape of both.

    Examples:
        >>> res = OmegaResidual(2.0)
        >>> res(torch.ones(3), torch.zeros(3))
        tensor([2., 2., 2.])
    """

    def __init__(self, init_value: float, as_parameter: bool = False, embed_dim: Optional[int] = None):
        super().__init__()
        value = _check_init_value(init_value)
        as_parameter = validation.as_bool("as_parameter", as_parameter)
        if as_parameter and embed_dim is None:
            raise ValueError("embed_dim is required (an integer >= 1) when as_parameter=True, got None")
        dim = None if embed_dim is None else validation.as_int("embed_dim", embed_dim, minimum=1)
        self.as_parameter = as_parameter
        if as_parameter:
            self.omega = nn.Parameter(torch.full((dim,), value))
        else:
            self.register_buffer("omega", torch.tensor([value]))
        # set by admin_torch.profiling while a profiling pass runs; None otherwise.
        self._profile_hook = None

    def forward(self, x: Tensor, f_x: Tensor) -> Tensor:
        """``x * omega + f_x``. omega always multiplies (no ``omega == 1`` shortcut), so an omega
        loaded from a state_dict or set by profiling is always used.

        Raises:
            TypeError: ``x`` or ``f_x`` is not a tensor.
            ValueError: either is not on omega's device, their shapes do not broadcast, or (a vector omega) the
                last dimension of ``x`` is not ``embed_dim``.
        """
        check_operands(x, "f_x", f_x, self.omega.device, "omega")
        if self._profile_hook is not None:
            self._profile_hook(self, x, f_x)
        if x.is_nested and not self.as_parameter:
            # torch.nn.TransformerEncoder's inference fast path (a padding mask, torch.no_grad): nested tensors
            # multiply by a number, not by a dense 1-element tensor
            return x * (self._omega_minus_one() + 1.0) + f_x
        return x * self._omega_for(x) + f_x

    # 0.1.0 names of the two forward variants, kept for code that calls them directly.
    def forward_omega(self, x: Tensor, f_x: Tensor) -> Tensor:
        check_operands(x, "f_x", f_x, self.omega.device, "omega")
        return x * self._omega_for(x) + f_x

    def _omega_for(self, x: Tensor) -> Tensor:
        """omega, checked against ``x`` and in the dtype it multiplies ``x`` in."""
        omega = self.omega
        if self.as_parameter and (x.dim() == 0 or x.shape[-1] != omega.shape[0]):
            raise ValueError(f"x must have last dimension embed_dim={omega.shape[0]} (the size of the vector omega), "
                             f"got shape {tuple(x.shape)}")
        # floating x: omega in x's dtype (the dtype of the plain x + f_x, also under autocast);
        # integer x: type promotion (x * omega is floating: omega is never truncated to an integer)
        if x.is_floating_point() and omega.dtype != x.dtype:
            omega = omega.to(dtype=x.dtype)
        return omega

    def rescale_sum(self, x: Tensor, s: Tensor) -> Tensor:
        """``x * omega + f_x`` from the plain residual sum ``s = x + f_x`` that a Post-LN layer computed already
        (what `admin_torch.hooks` has at the LayerNorm): ``s + (omega - 1) * x``, one operation forward and one
        multiply backward where ``self(x, s - x)`` takes three each way; equal to it up to rounding.

        A 1-element omega (a buffer) takes one fused multiply-add with ``omega - 1`` kept as a 0-d tensor on its
        device, made again once per change of omega (its version counter, kept on the host, tells: no device
        synchronization); in half precision it is read as a number instead (on CUDA that read waits for the
        device once per change of omega), so that ``omega - 1`` is applied in float32, not rounded to ``x``'s
        dtype. A vector omega (``as_parameter``), or a step being compiled, takes one fused multiply-add too. A hook
        on this module (the stability monitor's, or profiling's) is called as ever: the module is then called as
        ``self(x, s - x)``, so the hook reads ``(x, f_x)``.

        Shape: ``x``, ``s``: ``(*, embed_dim)``; output: the broadcast shape of both.

        Examples:
            >>> res = OmegaResidual(2.0)
            >>> res.rescale_sum(torch.ones(3), torch.full((3,), 1.5))   # x = 1, f_x = 0.5: 2 * 1 + 0.5
            tensor([2.5000, 2.5000, 2.5000])
        """
        w = self._cached_rescale_weight(x, s)
        if w is not None:  # the common case, decided with no op and no module attribute lookup
            return torch.addcmul(s, x, w)
        check_operands(x, "s", s, self.omega.device, "omega")
        if self._profile_hook is not None or _has_hooks(self) or not x.is_floating_point():
            return self(x, s - x)
        if self.as_parameter or torch.compiler.is_compiling():
            return torch.addcmul(s, x, self._omega_for(x) - 1)
        if x.dtype in (torch.float32, torch.float64):
            # omega - 1 as a cached 0-d tensor: backward multiplies by it directly, where a Python alpha is wrapped
            # into a new tensor at every call (about 3 ops less per sublayer); the same numbers
            return torch.addcmul(s, x, self._omega_minus_one_tensor())
        # half precisions: alpha stays a number applied in float32 (a 0-d tensor would be rounded to x's dtype)
        return torch.add(s, x, alpha=self._omega_minus_one())

    def _cached_rescale_weight(self, x: Tensor, s: Tensor) -> Optional[Tensor]:
        """The cached 0-d ``omega - 1`` (`_omega_minus_one_tensor`) when `rescale_sum` may use it as it is: ``x`` and
        ``s`` plain float32/float64 tensors of one dtype and shape on omega's device, a 1-element omega unchanged
        since the cache was made, no hook or profiling on this module, not compiling. Else None: the checked path
        decides (and raises what it raises). It runs on every residual sum of a converted HuggingFace layer: right
        after other ops each Python step costs several times its warm cost, and the checked path's checks, two
        lookups of the buffer through ``nn.Module.__getattr__`` and the cache test took about 20 us a call there
        (BART, 60 sums a step: ~1.2% of the step)."""
        cached = self.__dict__.get("_omega_minus_one_tensor_cache")
        if (cached is None or type(x) is not Tensor or type(s) is not Tensor or x.dtype is not s.dtype
                or x.dtype not in _CACHED_DTYPES or x.shape != s.shape or self.as_parameter
                or self._profile_hook is not None or _has_hooks(self) or torch.compiler.is_compiling()):
            return None
        omega = self._buffers.get("omega")
        if omega is not cached[0] or omega._version != cached[1] or omega.data_ptr() != cached[2]:
            return None
        w = cached[3]
        # s too: a 0-d s on another device would reach addcmul, torch's RuntimeError for check_operands' ValueError
        return w if x.device == w.device and s.device == w.device else None

    def add_scaled(self, f_x: Tensor, x: Tensor) -> Tensor:
        """``f_x + x * omega``: this module's function (``self(x, f_x)``) in one operation where ``x`` and ``f_x`` are
        plain floating tensors of one dtype, shape and device (omega's), so that a caller making the sum itself
        (`admin_torch.fused_sums`' rewritten forwards) pays the fewest operations over the plain ``f_x + x``: on CPU
        (float32, float64), ``x * omega + f_x`` with a cached 0-d omega, one multiply more forward and one backward;
        in half precision on CPU ``torch.add(f_x, x, alpha=omega)``, omega read as a number once per change and
        applied in float32; on an accelerator, ``torch.addcmul`` with the cached 0-d omega (one kernel, never a
        device synchronization); a vector omega (``as_parameter``), ``torch.addcmul`` with it (its gradient too).
        Otherwise (other dtypes or shapes, nested tensors, compiling), or while a hook watches this module (the
        stability monitor's, profiling's, which must see the call ``(x, f_x)``), it calls ``self(x, f_x)``: the
        same checks and errors, the same numbers up to rounding.

        Shape: ``x``, ``f_x``: ``(*, embed_dim)``, equal shapes for the one-operation path; output: their
        broadcast shape.

        Examples:
            >>> res = OmegaResidual(2.0)
            >>> res.add_scaled(torch.full((3,), 0.5), torch.ones(3))   # 0.5 + 1 * 2
            tensor([2.5000, 2.5000, 2.5000])
        """
        fast = self.__dict__.get("_add_scaled_fast")
        if fast is not None and not torch.compiler.is_compiling():  # the common case on CPU, in few steps: it runs
            omega, version, address, w = fast                          # once per sum per step
            if (type(x) is Tensor and type(f_x) is Tensor and x.is_cpu and f_x.is_cpu and not x.is_nested
                    and not f_x.is_nested and x.dtype in _CACHED_DTYPES and f_x.dtype is x.dtype
                    and x.shape == f_x.shape and omega._version == version and omega.data_ptr() == address
                    and self._buffers.get("omega") is omega and self._profile_hook is None and not _has_hooks(self)
                    and not omega.requires_grad):
                return x * w + f_x
        return self._add_scaled_checked(f_x, x)

    def _add_scaled_checked(self, f_x: Tensor, x: Tensor) -> Tensor:
        """`add_scaled` with every check; it keeps what its CPU float path needs for the next call."""
        omega = self._parameters.get("omega") if self.as_parameter else self._buffers.get("omega")
        if (type(x) is not Tensor or type(f_x) is not Tensor or omega is None or x.dtype is not f_x.dtype
                or not x.is_floating_point() or x.is_nested or f_x.is_nested or x.shape != f_x.shape
                or x.device != omega.device or f_x.device != omega.device or self._profile_hook is not None
                or _has_hooks(self) or torch.compiler.is_compiling() or omega.is_inference()):
            if type(x) is Tensor and type(f_x) is Tensor and not (x.is_nested or f_x.is_nested) \
                    and x.shape != f_x.shape:
                try:
                    torch.broadcast_shapes(x.shape, f_x.shape)
                except RuntimeError:  # the caller's own sum x + f_x raises a RuntimeError: this one is both
                    raise _SumShapeError(f"x and f_x must have shapes that broadcast (the residual sum), got "
                                         f"{tuple(x.shape)} and {tuple(f_x.shape)}") from None
            return self(x, f_x)
        if self.as_parameter:  # a trainable vector: its gradient comes from the same operation
            if x.dim() == 0 or x.shape[-1] != omega.shape[0] or x.dtype is not omega.dtype:
                return self(x, f_x)
            return torch.addcmul(f_x, x, omega)
        if omega.requires_grad:  # a 1-element omega made trainable: a number or a cached copy would drop its gradient
            return self(x, f_x)
        if x.device.type != "cpu":  # one kernel, omega a cached 0-d tensor: no device synchronization
            return torch.addcmul(f_x, x, self._omega_minus_one_tensor_cached()[4])
        if x.dtype in _CACHED_DTYPES:
            # small CPU steps are paid per operation: a multiply and an add forward, one multiply backward, two
            # operations more than the plain sum per step where addcmul or alpha= take five (their backward wraps a
            # number into a tensor)
            cached = self._omega_minus_one_tensor_cached()
            self._add_scaled_fast = (omega, cached[1], cached[2], cached[4])
            return x * cached[4] + f_x
        return torch.add(f_x, x, alpha=self._omega_numbers()[1])  # half precisions: omega applied in float32

    def scaled_input(self, x: Tensor) -> Optional[Tensor]:
        """``x * omega``, for a caller whose own code then adds ``f_x`` (what `admin_torch.hooks` gives a module
        called as ``module(f_x, x)`` in place of ``x``): with that sum, exactly ``self(x, f_x)``, the same two
        operations. None where this module's call must be seen: a hook on it (the stability monitor's, or
        profiling's, which reads ``(x, f_x)`` and may set omega first); the caller then calls ``self(x, f_x)``.

        Shape: ``x``: ``(*, embed_dim)``; output: the broadcast shape of ``x`` and omega.

        Examples:
            >>> res = OmegaResidual(2.0)
            >>> x, f_x = torch.ones(3), torch.full((3,), 0.5)
            >>> torch.equal(f_x + res.scaled_input(x), res(x, f_x))
            True

        Raises:
            TypeError: ``x`` is not a tensor (checked first, whether or not a hook watches this module).
            ValueError: ``x`` is not on omega's device, or (a vector omega) its last dimension is not ``embed_dim``.
        """
        scaled = self._scale(x)  # checked first, watched or not
        if self._profile_hook is not None or _has_hooks(self):
            return None
        return scaled

    def _scale(self, x: Tensor) -> Tensor:
        """``x * omega`` (`scaled_input` without the test for hooks), ``x`` checked."""
        if not isinstance(x, Tensor):  # was a bare AttributeError from x.is_floating_point()
            raise TypeError(f"x must be a torch.Tensor of shape (*, embed_dim), got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x must be a real (floating or integer) tensor, got dtype {x.dtype}")
        # torch's own error for a mismatch is a RuntimeError deep inside the multiply (a host-side check: no sync)
        validation.check_device("x", x, self.omega.device, "omega")
        return x * self._omega_for(x)  # checks the last dimension against a vector omega

    def register_forward_hook(self, *args, **kwargs):
        handle = super().register_forward_hook(*args, **kwargs)
        self._watched()
        return handle

    def register_forward_pre_hook(self, *args, **kwargs):
        handle = super().register_forward_pre_hook(*args, **kwargs)
        self._watched()
        return handle

    def _watched(self) -> None:
        # a hook on this module must see its call omega(x, f_x): the sublayers that scale x instead
        # (admin_torch.hooks' residual_arg readers) switch to their captured reading now, outside any forward pass,
        # so also before the layer is compiled (traced code cannot add hooks)
        for reader in getattr(self, "_scaled_readers", ()):
            reader.read_captured()

    def _omega_minus_one(self) -> float:
        """``omega - 1`` as a number (`_omega_numbers`)."""
        return self._omega_numbers()[0]

    def _omega_numbers(self) -> Tuple[float, float]:
        """``(omega - 1, omega)`` as numbers, for a 1-element omega: read again only when omega changed (another
        tensor, other memory, or an in-place write: ``set_omega_``, ``load_state_dict``, ``.to()``; a write through
        ``.data`` moves no version counter and is not seen: write omega with ``set_omega_``)."""
        omega = self.omega
        if omega.is_inference():  # made under torch.inference_mode: no version counter to key a cache on, read it
            value = float(omega.detach())
            return value - 1.0, value
        key = (omega, omega._version, omega.data_ptr())
        cached = getattr(self, "_omega_minus_one_cache", None)  # absent in modules pickled by older versions
        if cached is None or len(cached) < 5 or cached[0] is not key[0] or cached[1:3] != key[1:]:
            value = float(omega.detach())
            cached = key + (value - 1.0, value)
            self._omega_minus_one_cache = cached
        return cached[3], cached[4]

    def _omega_minus_one_tensor_cached(self) -> tuple:
        """The cache entry of `_omega_minus_one_tensor`: ``(omega, version, address, omega - 1, omega)``, the last two
        0-d tensors on omega's device."""
        self._omega_minus_one_tensor()
        return self._omega_minus_one_tensor_cache

    def _omega_minus_one_tensor(self) -> Tensor:
        """``omega - 1`` as a 0-d tensor on omega's device, for a 1-element omega: made again only when omega
        changed (the test of `_omega_minus_one`, on the host: never a device synchronization). Made outside
        inference mode, so that a module first called under ``torch.inference_mode`` trains afterwards."""
        omega = self.omega
        if omega.is_inference():  # a module made under torch.inference_mode: no version counter, so no cache
            with torch.no_grad():
                return omega.detach().reshape(()) - 1
        key = (omega, omega._version, omega.data_ptr())
        cached = getattr(self, "_omega_minus_one_tensor_cache", None)
        # (a 4-tuple: pickled by a version without the 0-d omega)
        if cached is None or len(cached) < 5 or cached[0] is not key[0] or cached[1:3] != key[1:]:
            with torch.inference_mode(False), torch.no_grad():
                value = omega.detach().reshape(()).clone()
                cached = key + (value - 1, value)  # omega - 1 (rescale_sum), omega (add_scaled)
            self._omega_minus_one_tensor_cache = cached
        return cached[3]

    def forward_original(self, x: Tensor, f_x: Tensor) -> Tensor:
        check_operands(x, "f_x", f_x, self.omega.device, "omega")
        return x + f_x

    @torch.no_grad()
    def set_omega_(self, value) -> "OmegaResidual":
        """Fill omega with ``value`` (a finite number, or a finite tensor broadcastable to omega) in place.

        Raises ValueError (NaN, inf, or a shape that does not broadcast) before omega is touched.
        """
        if isinstance(value, Tensor) and value.numel() != 1:
            if value.is_complex() or (not value.is_floating_point() and not value.dtype.is_signed
                                      and value.dtype != torch.uint8):
                raise TypeError(f"value must be a real tensor, got dtype {value.dtype}")
            if value.is_meta:
                raise ValueError("value must hold values (a tensor on the meta device holds none)")
            try:
                value = torch.broadcast_to(value.to(self.omega.device, self.omega.dtype), self.omega.shape)
            except RuntimeError:
                raise ValueError(f"value of shape {tuple(value.shape)} does not broadcast to omega's shape "
                                 f"{tuple(self.omega.shape)}") from None
            if not bool(torch.isfinite(value).all()):
                raise ValueError("value must be finite (no NaN or inf)")
        else:
            value = torch.tensor(validation.as_real("value", value), dtype=self.omega.dtype,
                                 device=self.omega.device).expand_as(self.omega)
        self.omega.copy_(value)
        return self

    def extra_repr(self) -> str:
        if self.as_parameter:
            return f"embed_dim={self.omega.numel()}, as_parameter=True, omega~{self.omega.float().mean().item():.4g}"
        return f"omega={self.omega.float().item():.4g}"


class _SumShapeError(ValueError, RuntimeError):
    """Shapes of ``x`` and ``f_x`` that do not broadcast, met by `OmegaResidual.add_scaled`: this module's ValueError,
    also the RuntimeError of the sum ``f_x + x`` that the caller's own code made before it was rewritten."""


def check_operands(x, other_name: str, other, device: torch.device, what: str) -> None:
    """The operands of a residual connection: ``x`` and ``other`` (``f_x``, or the sum ``s``) tensors on
    ``device`` (that of ``what``) whose shapes broadcast; TypeError / ValueError naming the argument. Reads no
    data: shapes and devices only, on the host (nothing for ``torch.compile`` to break on). Called on every
    residual sum: the common case (two real tensors of one shape on ``device``) takes one test of each kind."""
    if not (isinstance(x, Tensor) and isinstance(other, Tensor)):  # was a bare AttributeError deep inside
        name, t = ("x", x) if not isinstance(x, Tensor) else (other_name, other)
        raise TypeError(f"{name} must be a torch.Tensor of shape (*, embed_dim), got {type(t).__name__}")
    if x.dtype in _NOT_REAL or other.dtype in _NOT_REAL:
        name, t = ("x", x) if x.dtype in _NOT_REAL else (other_name, other)
        raise TypeError(f"{name} must be a real (floating or integer) tensor, got dtype {t.dtype}")
    if x.device != device or other.device != device:
        validation.check_device("x", x, device, what)
        validation.check_device(other_name, other, device, what)
    if x.is_nested or other.is_nested:  # torch.nn.TransformerEncoder's fast path: no sizes to compare
        return
    if x.shape != other.shape:
        for a, b in zip(reversed(x.shape), reversed(other.shape)):
            if a != b and a != 1 and b != 1:
                raise ValueError(f"x and {other_name} must have shapes that broadcast (the residual sum), got "
                                 f"{tuple(x.shape)} and {tuple(other.shape)}")


#: the dtypes `OmegaResidual.rescale_sum` applies its cached 0-d ``omega - 1`` in (half precisions: a number)
_CACHED_DTYPES = (torch.float32, torch.float64)

#: dtypes that are no residual stream: a bool mask, or complex numbers (omega is real)
_NOT_REAL = (torch.bool, torch.complex32, torch.complex64, torch.complex128)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own or a global one (``nn.Module.__call__``'s own test of
    its fast path)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
                or _module_hooks._global_backward_pre_hooks)


def as_module(
    num_res_layers: int,
    output_change_scale: str = "default",
    as_parameter: bool = False,
    embed_dim: Optional[int] = None,
) -> OmegaResidual:
    """An [`OmegaResidual`][admin_torch.OmegaResidual] initialized with [`calculate_init`][admin_torch.calculate_init].

    Args:
        num_res_layers: the number of residual sublayers N (2 per encoder layer, 3 per decoder layer).
        output_change_scale: ``'O(n)'``, ``'O(logn)'``, ``'default'`` or ``'O(1)'``.
        as_parameter: make omega a trainable vector of size ``embed_dim``.
        embed_dim: the hidden size; required when ``as_parameter``.

    Examples:
        >>> res = as_module(2 * 6)          # one per sublayer of a 6-layer encoder
        >>> y = res(torch.randn(4, 8), torch.randn(4, 8))
    """
    omega_value = calculate_init(num_res_layers, output_change_scale)
    return OmegaResidual(omega_value, as_parameter=as_parameter, embed_dim=embed_dim)


def _check_new_name(network, arg: str, name) -> None:
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise TypeError(f"{arg} must be a non-empty string without '.', got {name!r}")
    if hasattr(network, name):
        raise ValueError(f"{arg}={name!r}: the network already has an attribute of that name")


def as_buffer(network: nn.Module, buffer_name: str, num_res_layers: int, output_change_scale: str = "default") -> None:
    """Register the closed-form omega as a 1-element float32 buffer ``network.<buffer_name>``.

    The network's forward then computes ``x * self.<buffer_name> + f_x`` itself.

    Examples:
        >>> layer = nn.Module()
        >>> as_buffer(layer, 'attn_omega', 12)
        >>> layer.attn_omega
        tensor([2.0170])
    """
    _check_new_name(network, "buffer_name", buffer_name)
    omega_value = calculate_init(num_res_layers, output_change_scale)
    network.register_buffer(buffer_name, torch.tensor([omega_value]))


def as_parameter(
    network: nn.Module,
    parameter_name: str,
    num_res_layers: int,
    embed_dim: int,
    output_change_scale: str = "default",
) -> None:
    """Register the closed-form omega as a trainable vector parameter ``network.<parameter_name>``
    of size ``embed_dim``.

    Examples:
        >>> layer = nn.Module()
        >>> as_parameter(layer, 'ffn_omega', 12, 8)
        >>> layer.ffn_omega.shape
        torch.Size([8])
    """
    _check_new_name(network, "parameter_name", parameter_name)
    dim = validation.as_int("embed_dim", embed_dim, minimum=1)
    omega_value = calculate_init(num_res_layers, output_change_scale)
    network.register_parameter(parameter_name, nn.Parameter(torch.full((dim,), omega_value)))

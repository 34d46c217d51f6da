"""The fused path of AddSign and PowerSign: one operator, one pass over memory.

``torch.ops.sign_optim.fused_sign_(params, grads, exp_avgs, state_steps, coefficients, beta, maximize,
found_inf=None)`` updates every parameter and its moving average in one pass (read ``p``, ``g``, ``m``, write ``p``,
``m``: 5 numbers per parameter, where fused Adam moves 7) and advances the step counters; with torch's
gradient-scaler flag ``found_inf`` set (a 1-element tensor on the parameters' device) it writes nothing, decided
in the kernel, as torch's fused optimizers skip. ``coefficients`` is a float64 CPU tensor of
shape ``(n, 4)`` or ``(1, 4)``: per parameter ``(1 - lr wd, -lr c0, -lr a, -lr b)``, the coefficient form of
`sign_optim.functional` with ``lr`` and the weight decay folded in (`kernel_coefficients`).

The operator is built like torch's own fused optimizers (``torch._fused_adam_``): it receives the tensor lists
and checks every argument natively before it touches any memory (device, layout, contiguity, dtype, shape,
storage, a finite coefficient table, ``beta`` in [0, 1)), so the kernel reads and writes only memory that is valid
at that call and no pointer outlives it. A refused call raises ValueError or TypeError and changes nothing.

Aliasing and autograd contract:

* No tensor the operator writes (``params``, ``exp_avgs``, ``state_steps``) may share memory with any other
  argument or with another written tensor: a parameter listed twice, a moving average that is its parameter, a
  gradient that is a view of a parameter are ValueErrors naming both (the kernels read through restrict pointers
  and run blocks in parallel; torch's in-place ops refuse partial overlaps too). Gradients may share memory with
  each other (they are only read).
* It is an in-place operator as torch's are: the version counter of every tensor it writes is bumped, so a
  backward through a graph that saved a parameter before the step raises torch's "modified by an inplace
  operation" error. It has no derivative: with grad mode on, a tensor that requires grad is refused (optimizers
  step under ``torch.no_grad()``); an inference tensor is written only inside ``torch.inference_mode()``.
* All tensors of one call are on one device; the step counters and the table are CPU tensors. A meta tensor
  among CPU tensors is refused (the dispatcher sends such a call to the Meta kernel, which checks the same
  metadata); a call whose tensors are all meta (or fake, under ``torch.compile``) changes nothing.

Kernels:

* **CPU**: C++ (``sign_optim/csrc/fused_sign.cpp``), built by ``setup.py`` when the package is installed beside
  torch; blocks of 16,384 elements on torch's intra-op threads (``torch.set_num_threads``: the file is built with
  OpenMP, as ``at::parallel_for`` requires; `parallel_probe` reports the threads used); the float32 loop is
  compiled for AVX-512, AVX2 and baseline x86-64 and picked when the library loads.
* **CUDA**: a multi-tensor Triton kernel (`sign_optim.triton_kernel`, one launch for many parameters),
  registered here for the operator's CUDA key; checked by the same native checks.
* **Meta / fake tensors**: a fake implementation, so ``torch.compile(opt.step)`` traces the step as one node.

float32 and float64 parameters keep their moving average in their dtype; float16 and bfloat16 parameters keep
it in float32 and are updated in float32, rounded once when stored. The result equals the single-tensor path's
to 1 ulp (the same operations in the same order; the moving average is ``torch.lerp``'s formula, which switches
at weight ``1 - beta = 0.5``, so ``beta = 0`` gives ``m = g`` exactly).

Example:
    >>> import torch
    >>> from sign_optim import fused
    >>> p, g, m, step = torch.ones(3), torch.tensor([1.0, -1.0, 2.0]), torch.zeros(3), torch.zeros(())
    >>> coefficients = fused.kernel_coefficients([(1.0, 1.0, 0.0)], lr=0.1, weight_decay=0.0)  # AddSign
    >>> if fused.available("cpu"):
    ...     fused.fused_sign_([p], [g], [m], [step], coefficients, beta=0.9, maximize=False)
    ...     print(p, float(step))
    tensor([0.8000, 1.2000, 0.6000]) 1.0
"""

import importlib
import importlib.util
from typing import List, Optional, Sequence, Union

import torch

from toolbox_core import validation

__all__ = ["available", "unavailable_reason", "fused_sign_", "kernel_coefficients", "state_dtype", "local_shard",
           "parallel_probe"]

_LOADED: Optional[bool] = None
_LOAD_ERROR: Optional[str] = None


def _load() -> bool:
    """Import the native library once (it registers the operators); False, with the reason kept, if it is
    absent or does not load."""
    global _LOADED, _LOAD_ERROR
    if _LOADED is None:
        try:
            importlib.import_module("sign_optim._C")
            _LOADED = True
        except ImportError as err:
            _LOADED = False
            _LOAD_ERROR = ("the native operators sign_optim._C are not built (reinstall beside torch with a C++ "
                           f"compiler: pip install --no-build-isolation -e . or make install): {err}")
        if _LOADED:
            _register_python_kernels()
    return _LOADED


def _register_python_kernels() -> None:
    """The operator's fake implementation (the Meta kernel: torch.compile) and its CUDA kernel (Triton, imported at
    first use). Both run the operator's native checks first: the fake one its metadata checks, so a meta tensor
    among CPU tensors (which the dispatcher routes here) is refused rather than silently doing nothing."""

    @torch.library.register_fake("sign_optim::fused_sign_")
    def _(params, grads, exp_avgs, state_steps, coefficients, beta, maximize, found_inf=None):
        device = _kernel_device(params, grads, exp_avgs)
        torch.ops.sign_optim.check_fused_inputs(params, grads, exp_avgs, state_steps, coefficients, beta, device, False)
        _check_found_inf(found_inf, device)
        return None

    @torch.library.impl("sign_optim::fused_sign_", "CUDA")
    def _(params, grads, exp_avgs, state_steps, coefficients, beta, maximize, found_inf=None):
        from .triton_kernel import fused_sign_triton  # Triton is imported only when CUDA parameters are fused

        torch.ops.sign_optim.check_fused_inputs(params, grads, exp_avgs, state_steps, coefficients, beta, "cuda")
        _check_found_inf(found_inf, "cuda")
        fused_sign_triton(params, grads, exp_avgs, coefficients, beta=beta, maximize=maximize, found_inf=found_inf)
        torch._foreach_add_(list(state_steps), 1.0)
        if found_inf is not None:
            # the counters are CPU tensors: taking a skip back costs one device-to-host copy of the flag (the
            # parameters and averages were decided in the kernel); device-resident counters would remove it
            skipped = (found_inf.reshape(()) != 0).to("cpu")
            for s in state_steps:
                s.sub_(skipped.to(s.dtype))


def _check_found_inf(found_inf: Optional[torch.Tensor], device: str) -> None:
    """The native kernel's check of torch's gradient-scaler flag, for the Python kernels (Meta, CUDA)."""
    if found_inf is not None and (found_inf.numel() != 1 or found_inf.device.type != device):
        raise ValueError("sign_optim fused step: found_inf must be a 1-element tensor on the parameters' device, got "
                         f"shape {tuple(found_inf.shape)} on {found_inf.device}")


def _kernel_device(*lists: List[torch.Tensor]) -> str:
    """The device type the Meta kernel checks the call against: the first tensor's (every other one must match)."""
    for tensors in lists:
        for t in tensors:
            return t.device.type
    return "cpu"


def unavailable_reason(device: Union[str, torch.device]) -> Optional[str]:
    """None when parameters on ``device`` have a fused kernel here, else why not (for error messages). ``device``
    a torch.device or its name (``"cpu"``, ``"cuda:0"``); TypeError/ValueError naming it otherwise."""
    device = validation.as_device("device", device)
    if not _load():
        return _LOAD_ERROR
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "the CUDA kernel needs Triton (pip install triton)"
    return f"no fused kernel for device type {device.type!r} (cpu and cuda have one)"


def available(device: Union[str, torch.device]) -> bool:
    """Whether parameters on ``device`` can take the fused path here."""
    return unavailable_reason(device) is None


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the moving average of a parameter of ``dtype`` (float32 for half precision)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kernel_coefficients(coefficients: Sequence[Sequence[float]], *, lr: float, weight_decay: float) -> torch.Tensor:
    """The operator's ``(n, 4)`` float64 table from per-parameter ``(c0, a, b)`` (`sign_optim.functional`):
    rows ``(1 - lr wd, -lr c0, -lr a, -lr b)``. One row serves every parameter."""
    return _kernel_table(coefficients, validation.as_real("lr", lr, low=0.0),
                         validation.as_real("weight_decay", weight_decay, low=0.0))


def _kernel_table(coefficients: Sequence[Sequence[float]], lr: float, weight_decay: float) -> torch.Tensor:
    """`kernel_coefficients` without its argument checks: what the optimizer builds each step (its group's
    ``lr`` and ``weight_decay`` were checked when they were set)."""
    keep = 1.0 - lr * weight_decay
    return torch.tensor([[keep, -lr * c0, -lr * a, -lr * b] for c0, a, b in coefficients], dtype=torch.float64)


def fused_sign_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                state_steps: List[torch.Tensor], coefficients: torch.Tensor, *, beta: float, maximize: bool,
                found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused step (in place) of ``params``, their moving averages ``exp_avgs`` and step counters
    ``state_steps`` (each advanced by 1), with the operator's ``coefficients`` (`kernel_coefficients`).
    Every tensor is checked natively first: a refused call raises ValueError/TypeError and changes nothing.
    ``found_inf`` (torch's gradient-scaler flag, a 1-element tensor on the parameters' device): non-zero skips the
    step inside the operator (nothing written, counters kept), with no Python read of the flag."""
    if not _load():
        raise RuntimeError(_LOAD_ERROR)
    if found_inf is None:  # (the 7-argument call: an operator built before the flag existed still serves it)
        torch.ops.sign_optim.fused_sign_(params, grads, exp_avgs, state_steps, coefficients, beta, maximize)
    else:
        torch.ops.sign_optim.fused_sign_(params, grads, exp_avgs, state_steps, coefficients, beta, maximize, found_inf)


def parallel_probe(blocks: int = 64) -> int:
    """How many distinct threads the CPU kernel's block scheduler runs ``blocks`` blocks of 16,384 elements on:
    ``torch.get_num_threads()`` for enough blocks when the operator is built with OpenMP, 1 when it is not (it
    would then ignore ``torch.set_num_threads``). RuntimeError when the operator is not built.

    Example:
        >>> import torch
        >>> from sign_optim import fused
        >>> fused.parallel_probe(64) == min(64, torch.get_num_threads()) if fused.available("cpu") else True
        True
    """
    blocks = validation.as_int("blocks", blocks, minimum=1, maximum=2**31 - 1)  # the operator's int
    if not _load():
        raise RuntimeError(_LOAD_ERROR)
    return int(torch.ops.sign_optim._parallel_probe(blocks))


def step_values(steps: List[torch.Tensor]) -> List[float]:
    """The values of 1-element float32/float64 CPU step counters, read in one native call (no sync)."""
    if not steps:
        return []
    if _load():
        return torch.ops.sign_optim.step_values(steps).tolist()
    return torch.stack([s.reshape(()).double() for s in steps]).tolist()


#: the tensor types whose memory the kernels may be handed (a subclass such as DTensor is unwrapped first)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def supported(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, step: torch.Tensor) -> bool:
    """Whether one parameter fits the kernels (the slow path's partition; the operator checks natively what it
    is handed): plain contiguous tensors of one shape on CPU or CUDA, a kernel dtype (not float64 on CUDA), the
    gradient of the parameter's dtype, the average in `state_dtype`, a 1-element float CPU counter."""
    for t in (p, g, m):
        if type(t) not in PLAIN_TENSORS or t.layout is not torch.strided or not t.is_contiguous():
            return False
    return (p.dtype in _KERNEL_DTYPES and g.dtype is p.dtype and m.dtype is state_dtype(p.dtype)
            and p.shape == g.shape == m.shape and p.device == g.device == m.device
            and p.device.type in ("cpu", "cuda") and (p.dtype is not torch.float64 or p.is_cpu)
            and type(step) in PLAIN_TENSORS and step.is_cpu and step.numel() == 1
            and step.dtype in (torch.float32, torch.float64))


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2, tensor parallel), else ``t``: the rule is elementwise, so updating each
    rank's shard in place is the update of the whole tensor. Partial placements (a pending reduction) and
    other tensor subclasses are returned as they are, and the kernels refuse them (`supported`)."""
    if type(t) in PLAIN_TENSORS or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and not any(pl.is_partial() for pl in t.placements):
        # the local tensor itself (what to_local() returns, without its autograd function: a step is no_grad)
        return t._local_tensor
    return t

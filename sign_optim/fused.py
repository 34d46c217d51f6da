"""The fused path of AddSign and PowerSign: one pass over memory per parameter.

The whole rule (moving average, sign agreement, internal decay, weight decay, maximize, update)
reads ``p``, ``g``, ``m`` and writes ``p``, ``m`` once: 5 numbers per parameter per step, the
physical limit (fused Adam moves 7). Two kernels:

* **CPU**: C with OpenMP (``sign_optim/_fused_kernel.c``), compiled by ``setup.py`` when the package
  is installed (about 2 s with gcc; no torch headers), loaded here with ctypes. GCC's
  ``target_clones`` builds the loop for AVX-512, AVX2 and baseline x86-64 and picks one when the
  library loads, so a build runs on any x86-64 machine at its best width. It uses
  ``torch.get_num_threads()`` threads.
* **CUDA**: a Triton kernel (:mod:`sign_optim.triton_kernel`), one launch per parameter, compiled
  on first use and cached on disk by Triton.

float32 and float64 parameters keep their moving average in their dtype; float16 and bfloat16
parameters keep it in float32 and are updated in float32, rounded once when stored. The result
equals the single-tensor path's to 1 ulp (the same operations in the same order; a compiler may
contract a multiply-add differently).

:func:`available` says whether a device has a fused kernel here; the optimizers use it by default
(``fused=None``).
"""

import ctypes
import importlib.util
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["available", "unavailable_reason", "supported", "PLAIN_TENSORS", "state_dtype", "cpu_step", "cpu_step_planned", "plan",
           "read_steps",
           "RULES", "FusedPlan", "local_shard", "float32_counters"]

#: rule name -> the kernel's rule code
RULES = {"addsign": 0, "powersign": 1}
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None


def _load() -> Optional[ctypes.CDLL]:
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    spec = importlib.util.find_spec("sign_optim._fused_kernel")
    if spec is None or not spec.origin:
        _LIB_ERROR = ("the C kernel sign_optim/_fused_kernel is not built (reinstall the package with a C compiler: "
                      "pip install -e . or make install)")
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as err:
        _LIB_ERROR = f"the C kernel {spec.origin} does not load: {err}"
        return None
    i64, dbl, ptrs = ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_void_p)
    lib.sign_fused_step.restype = ctypes.c_int
    lib.sign_fused_step.argtypes = [ctypes.c_int, ctypes.c_int, i64, ptrs, ptrs, ptrs, ctypes.POINTER(i64),
                                    ctypes.POINTER(dbl), ctypes.POINTER(dbl), dbl, dbl, dbl, dbl,
                                    ctypes.c_int, ctypes.c_int, ptrs]
    lib.sign_read_steps.restype = ctypes.c_int
    lib.sign_read_steps.argtypes = [i64, ptrs, ctypes.POINTER(dbl)]
    lib.sign_stream_copy.restype = ctypes.c_int
    lib.sign_stream_copy.argtypes = [i64, ptrs, ptrs, ptrs, ctypes.POINTER(i64), ctypes.c_int]
    _LIB = lib
    return lib


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when ``device`` has a fused kernel here, else why not (for error messages)."""
    if device.type == "cpu":
        return None if _load() is not None else _LIB_ERROR
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "the CUDA kernel needs Triton (pip install triton)"
        return None
    return f"no fused kernel for device type {device.type!r} (cpu and cuda have one)"


def available(device: torch.device) -> bool:
    """Whether parameters on ``device`` can take the fused path here."""
    return unavailable_reason(torch.device(device)) is None


_STATE_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                 torch.float16: torch.float32, torch.bfloat16: torch.float32}


#: the tensor types whose memory the kernels may be handed (a subclass, e.g. DTensor, has no such memory:
#: its data_ptr() is 0; the optimizer hands the kernels a DTensor's local shard instead)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _kernel_memory_reason(t: torch.Tensor) -> Optional[str]:
    """None when the kernels may read and write ``t``'s elements through ``t.data_ptr()``, else why not."""
    if type(t) not in PLAIN_TENSORS:
        return f"a {type(t).__name__} (a tensor subclass) has no plain memory to hand a kernel"
    if t.device.type not in ("cpu", "cuda"):
        return f"a tensor on {t.device.type} has no memory a kernel can read"
    if t.layout is not torch.strided or not t.is_contiguous():
        return "the kernels take contiguous strided tensors only"
    if t.numel() and not t.data_ptr():
        return "the tensor has no storage (data_ptr() is 0)"
    return None


def supported(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> bool:
    """Whether one parameter fits the kernels: plain contiguous tensors with memory on CPU or CUDA (not a
    subclass such as DTensor, not meta), a float dtype (not float64 on CUDA), the gradient of the same dtype,
    size and device, the moving average of the same size in :func:`state_dtype`."""
    return (_STATE_DTYPES.get(p.dtype) is m.dtype and g.dtype is p.dtype
            and p.numel() == g.numel() == m.numel() and p.device == g.device == m.device
            and (p.dtype is not torch.float64 or p.is_cpu)
            and not any(_kernel_memory_reason(t) for t in (p, g, m)))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the moving average of a parameter of ``dtype`` (float32 for half precision)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pointers(tensors: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _check_cpu_tensors(what: str, tensors: Sequence[torch.Tensor], dtype: torch.dtype,
                       numel: Optional[Sequence[int]] = None) -> None:
    """The boundary of the C kernel: ValueError unless every tensor is plain CPU memory of ``dtype`` (and, with
    ``numel``, of those sizes), so the kernel never touches memory it was not handed."""
    for i, t in enumerate(tensors):
        why = _kernel_memory_reason(t) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}, not a tensor"
        if why is None and not t.is_cpu:
            why = f"it is on {t.device}, the C kernel takes CPU tensors"
        if why is None and t.dtype is not dtype:
            why = f"its dtype is {t.dtype}, expected {dtype}"
        if why is None and numel is not None and t.numel() != numel[i]:
            why = f"it has {t.numel()} elements, expected {numel[i]}"
        if why is not None:
            raise ValueError(f"sign_optim fused kernel: {what}[{i}] refused: {why}")


def read_steps(steps: Sequence[torch.Tensor]) -> List[float]:
    """The values of 0-d float32 CPU step counters, read in one call (the C kernel is loaded)."""
    n = len(steps)
    _check_cpu_tensors("steps", steps, torch.float32, [1] * n)
    out = (ctypes.c_double * n)()
    _load().sign_read_steps(n, _pointers(steps), out)
    return list(out)


def cpu_step(rule: str, params: List[torch.Tensor], grads: List[torch.Tensor], avgs: List[torch.Tensor],
             coef_a: List[float], coef_b: List[float], *, lr: float, beta: float, alpha: float,
             weight_decay: float, maximize: bool, steps: Optional[List[torch.Tensor]] = None) -> None:
    """One fused step over CPU parameters of ONE dtype (the caller groups them and checks :func:`supported`).

    ``coef_a``/``coef_b`` per parameter: AddSign ``(d, 0)``; PowerSign ``(sinh(c), cosh(c) - 1)`` with
    ``c = d ln(alpha)``. ``steps``: the parameters' 0-d float32 CPU step counters, advanced by 1.
    """
    lib = _load()
    n = len(params)
    if n == 0:
        return
    if not len(grads) == len(avgs) == n or (steps is not None and len(steps) != n):
        raise ValueError("sign_optim fused kernel: params, grads, avgs (and steps) must have the same length")
    sizes = [p.numel() for p in params]
    _check_cpu_tensors("params", params, params[0].dtype)
    if params[0].dtype not in _DTYPES:
        raise ValueError(f"sign_optim fused kernel: dtype {params[0].dtype} refused, it takes {list(_DTYPES)}")
    _check_cpu_tensors("grads", grads, params[0].dtype, sizes)
    _check_cpu_tensors("avgs", avgs, state_dtype(params[0].dtype), sizes)
    if steps is not None:
        _check_cpu_tensors("steps", steps, torch.float32, [1] * n)
    numel = (ctypes.c_int64 * n)(*sizes)
    status = lib.sign_fused_step(
        RULES[rule], _DTYPES[params[0].dtype], n, _pointers(params), _pointers(grads), _pointers(avgs), numel,
        (ctypes.c_double * n)(*coef_a), (ctypes.c_double * n)(*coef_b), lr, beta, alpha, weight_decay,
        int(maximize), torch.get_num_threads(), _pointers(steps) if steps is not None else None)
    if status != 0:
        raise MemoryError("sign_optim fused kernel: out of memory for its block table")


class KernelPlan:
    """The ctypes arrays of one bucket of parameters (see :func:`plan`), reused from step to step."""

    def __init__(self, params, avgs, steps):
        n = len(params)
        self.n, self.torch_dtype = n, params[0].dtype
        self.dtype = _DTYPES[params[0].dtype]
        self.sizes = [p.numel() for p in params]
        self.params, self.avgs, self.steps = _pointers(params), _pointers(avgs), _pointers(steps)
        self.numel = (ctypes.c_int64 * n)(*self.sizes)


def plan(params: List[torch.Tensor], avgs: List[torch.Tensor], steps: List[torch.Tensor]) -> KernelPlan:
    """Pointers and sizes of CPU parameters of one dtype, their moving averages and their 0-d float32
    step counters, for :func:`cpu_step_planned`. The tensors are checked here (plain contiguous CPU memory
    of the right dtypes and sizes); the plan is valid only while they keep that memory: the caller
    compares their layout every step (``SignOptimizer`` does) and makes a new plan when it changed."""
    if not params or not len(avgs) == len(steps) == len(params):
        raise ValueError("sign_optim fused kernel: plan needs as many avgs and steps as params, at least one")
    if params[0].dtype not in _DTYPES:
        raise ValueError(f"sign_optim fused kernel: dtype {params[0].dtype} refused, it takes {list(_DTYPES)}")
    sizes = [p.numel() for p in params]
    _check_cpu_tensors("params", params, params[0].dtype)
    _check_cpu_tensors("avgs", avgs, state_dtype(params[0].dtype), sizes)
    _check_cpu_tensors("steps", steps, torch.float32, [1] * len(steps))
    return KernelPlan(params, avgs, steps)


def cpu_step_planned(rule: str, kernel: KernelPlan, grads: List[torch.Tensor], coef_a: List[float],
                     coef_b: List[float], *, lr: float, beta: float, alpha: float, weight_decay: float,
                     maximize: bool) -> None:
    """:func:`cpu_step` with the parameters' pointers prepared once (:func:`plan`); advances the counters.
    The gradients, new every step, are checked here (dtype, size, plain contiguous CPU memory)."""
    n = kernel.n
    if len(grads) != n or len(coef_a) != n or len(coef_b) != n:
        raise ValueError(f"sign_optim fused kernel: the plan has {n} parameters, got {len(grads)} gradients")
    _check_cpu_tensors("grads", grads, kernel.torch_dtype, kernel.sizes)
    status = _load().sign_fused_step(
        RULES[rule], kernel.dtype, n, kernel.params, _pointers(grads), kernel.avgs, kernel.numel,
        (ctypes.c_double * n)(*coef_a), (ctypes.c_double * n)(*coef_b), lr, beta, alpha, weight_decay,
        int(maximize), torch.get_num_threads(), kernel.steps)
    if status != 0:
        raise MemoryError("sign_optim fused kernel: out of memory for its block table")


def _stream_copy(params: List[torch.Tensor], grads: List[torch.Tensor], avgs: List[torch.Tensor]) -> None:
    """The bandwidth reference of ``benchmarks.bench_sign_optim`` (not public API): move the bytes of a
    step (read p, g, m; write p, m) without the arithmetic, the floor a fused step can reach.

    It calls ``sign_stream_copy`` of the same C library as the step kernel: an OpenMP loop with the same
    threads (``torch.get_num_threads()``) and the same traffic per element, so the benchmark's "of copy"
    column compares like with like (the copy splits the work per tensor, the step per block). float32 CPU
    tensors only; it overwrites ``params`` and ``avgs`` (the benchmark passes scratch copies).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(_LIB_ERROR)
    n = len(params)
    sizes = [p.numel() for p in params]
    for what, tensors in (("params", params), ("grads", grads), ("avgs", avgs)):
        _check_cpu_tensors(what, tensors, torch.float32, sizes)
    numel = (ctypes.c_int64 * n)(*sizes)
    lib.sign_stream_copy(n, _pointers(params), _pointers(grads), _pointers(avgs), numel, torch.get_num_threads())


# ----------------------------------------------------------------- the optimizer's pointer plan

def float32_counters(steps: List[torch.Tensor]) -> bool:
    """Whether every step counter is a 0-d float32 CPU tensor (what the C kernel reads and advances)."""
    f32 = torch.float32
    for t in steps:
        if type(t) is not torch.Tensor or t.dtype is not f32 or not t.is_cpu or t.dim():
            return False
    return True


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2, tensor parallel), else ``t``: the rule is elementwise, so updating each
    rank's shard in place is the update of the whole tensor. Partial placements (a pending reduction) and
    other tensor subclasses are returned as they are, and the kernels refuse them (:func:`supported`)."""
    if type(t) in PLAIN_TENSORS or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and not any(pl.is_partial() for pl in t.placements):
        return t.to_local()
    return t


def layout(tensors: List[torch.Tensor]) -> List[tuple]:
    """What the kernels' pointers depend on, per tensor: address, shape, strides, dtype, device. Compared every
    step, so a plan is never used after ``p.data = ...``, ``state[p]["exp_avg"].data = ...`` or a resize."""
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors]


class FusedPlan:
    """What the fused path needs of a group's parameters that does not change from step to step: which
    ones the kernels take (contiguous plain tensors or DTensor shards, a supported dtype, the state's
    dtype), grouped by device and dtype, with their pointers. Valid while every parameter, moving average
    and step counter is the same object with the same memory layout (:meth:`matches`, checked every step)."""

    class Bucket:
        def __init__(self, device, idx, params, avgs, steps, counters_f32):
            self.device, self.idx = device, idx
            self.kernel = None
            if device.type == "cpu" and counters_f32:
                self.kernel = plan([params[i] for i in idx], [avgs[i] for i in idx], [steps[i] for i in idx])

    def __init__(self, params, avgs, states):
        self.params, self.avgs = list(params), list(avgs)
        self.steps = [s["step"] for s in states]
        local_params, local_avgs = [local_shard(p) for p in params], [local_shard(m) for m in avgs]
        self.layout = layout(local_params + local_avgs + self.steps)
        groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        rest = []
        for i, (p, m) in enumerate(zip(local_params, local_avgs)):
            if supported(p, p, m):
                groups.setdefault((p.device, p.dtype), []).append(i)
            else:
                rest.append(i)
        self.rest = rest
        counters_f32 = float32_counters(self.steps)
        self.buckets = [self.Bucket(device, idx, local_params, local_avgs, self.steps, counters_f32)
                        for (device, _), idx in groups.items()]
        self.local_params, self.local_avgs = local_params, local_avgs

    def matches(self, params, avgs, states) -> bool:
        if not (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and all(map(operator.is_, avgs, self.avgs)) and all(s["step"] is t for s, t in zip(states, self.steps))):
            return False
        local = [local_shard(p) for p in params] + [local_shard(m) for m in avgs]
        return layout(local + self.steps) == self.layout

"""Shared machinery of AddSign and PowerSign: the moving average, the internal decay, serialization.

Both rules (Bello et al., 2017, arXiv 1709.07417) keep one moving average per parameter and, as in
TensorFlow, update it first (no bias correction), then scale the gradient by a factor of
``sign(g) * sign(m)`` and of the internal decay ``d`` evaluated at the step *before* it is
incremented (the first update uses ``d(0)``). A subclass only gives its rule's coefficients
``(c0, a, b)`` (:mod:`sign_optim.functional`); the class keeps the state, checks everything first, and hands
the work to the functional implementations and the fused kernels (:mod:`sign_optim.fused`).
"""

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from stability_toolbox import validation

from . import functional, fused
from .decays import InternalDecay, internal_decay_from_state_dict
from .functional import Coefficients

__all__ = ["SignOptimizer", "SignDecay"]

SignDecay = Optional[Callable[[int], float]]

_HALF = (torch.float16, torch.bfloat16)


def _cuda_step():
    from .triton_kernel import cuda_step  # Triton is imported only when CUDA parameters are fused
    return cuda_step


def _step_dtype() -> torch.dtype:
    """The step counters' dtype, as torch.optim's: float64 when that is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# Key of the decay's serialized form in the optimizer's state_dict.
_DECAY_KEY = "sign_internal_decay"


class SignOptimizer(Optimizer):
    """Base class of :class:`~sign_optim.AddSign` and :class:`~sign_optim.PowerSign`.

    The internal decay is stored on the optimizer (``self.sign_internal_decay``), not in the param
    groups, so that ``state_dict()`` holds only tensors, numbers and strings. The step counter is
    per parameter (``state[p]["step"]``, a 0-d float32 CPU tensor, as in torch.optim, so that
    ``torch.compile(opt.step)`` does not recompile per step), next to the moving average
    ``state[p]["exp_avg"]`` (float32 for float16/bfloat16 parameters).

    Three implementations give the same result (to 1 ulp): the fused one-pass kernel
    (:mod:`sign_optim.fused`, the default where available), ``torch._foreach_*`` ops, and a loop over
    parameters. ``lr`` may be a 1-element tensor (read once per step). With ``capturable=True`` the
    step counters live on the parameters' device and the step, the decay and ``lr`` stay tensors: no
    host read, CUDA-graph safe (the foreach/traced update, not the fused kernels).

    Serialization of the decay: a :class:`~sign_optim.decays.InternalDecay` is saved as its config
    under ``state_dict()["sign_internal_decay"]`` and rebuilt by ``load_state_dict``. Any other
    callable cannot be serialized: it is saved as ``{"kind": "custom", "repr": ...}`` and
    ``load_state_dict`` keeps the callable the optimizer was constructed with (pass the same one
    again); it raises ``ValueError`` if the optimizer has no decay to keep.
    """

    #: CPU foreach path: elements per cache-sized piece of work (:func:`sign_optim.functional._cache_sized_chunks`).
    cpu_chunk_numel: int = 1 << 16

    def __init__(
        self,
        params: Iterable,
        defaults: Dict[str, Any],
        sign_internal_decay: SignDecay,
    ) -> None:
        self.sign_internal_decay = sign_internal_decay
        self._fused_plans: Dict[int, fused.FusedPlan] = {}
        self._check_group(defaults)  # hyper-parameters first, before the params are iterated (torch.optim's order)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- validation
    #: hyper-parameters every param group of this optimizer holds (a foreign state dict lacks some)
    group_keys = ("lr", "beta", "alpha", "weight_decay", "maximize", "foreach", "fused", "capturable")

    def _check_group(self, group: Dict[str, Any]) -> None:
        """Raise ValueError / TypeError for bad hyper-parameters of a param group (nothing is changed)."""
        missing = [k for k in self.group_keys if k not in group]
        if missing:
            raise ValueError(f"param group lacks {missing}: not a {type(self).__name__} param group")
        capturable = group.get("capturable", False)
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor (of any shape), got a tensor of shape "
                             f"{tuple(lr.shape)}")
        if capturable and isinstance(lr, torch.Tensor):  # its value stays on the device: no read
            if not lr.is_floating_point():
                raise TypeError(f"lr must be a number or a 1-element floating tensor, got dtype {lr.dtype}")
        else:
            validation.as_real("lr", lr, low=0.0)
        validation.as_real("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        validation.as_real("weight_decay", group["weight_decay"], low=0.0)
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"maximize must be a bool, got {type(group['maximize']).__name__}")
        for flag in ("foreach", "fused"):
            if group[flag] is not None and not isinstance(group[flag], bool):
                raise TypeError(f"{flag} must be None or a bool, got {type(group[flag]).__name__}")
        if group["foreach"] and group["fused"]:
            raise ValueError("fused=True and foreach=True cannot both be set: choose one implementation")
        if capturable and group["fused"]:
            raise ValueError("capturable=True and fused=True cannot both be set: the fused kernels read lr and "
                             "the decay on the host; capturable keeps them on the device")
        if capturable and self.sign_internal_decay is not None and not isinstance(self.sign_internal_decay,
                                                                                   InternalDecay):
            raise ValueError("capturable=True needs sign_internal_decay None or an InternalDecay (evaluated on the "
                             "device); a custom callable takes the step as a Python number")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, with the group's hyper-parameters and parameters checked first."""
        if isinstance(param_group, dict) and "params" in param_group:
            param_group = dict(param_group)
            params = param_group["params"]
            param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in param_group["params"]:
                if isinstance(p, torch.Tensor) and torch.is_complex(p):
                    raise TypeError(f"{type(self).__name__} does not support complex parameters "
                                    "(sign of a complex number)")
            merged = {**self.defaults, **param_group}
            self._check_group(merged)
            if _DECAY_KEY in param_group and not self._same_decay(param_group[_DECAY_KEY]):
                raise ValueError(
                    f"{_DECAY_KEY} is one per optimizer (the constructor's argument), a param group cannot have its "
                    f"own: got {param_group[_DECAY_KEY]!r} for a group of an optimizer with {self.sign_internal_decay!r}; "
                    "use one optimizer per decay")
            if merged["fused"]:
                for p in param_group["params"]:
                    # meta parameters (deferred initialization, to_empty later) are checked at the step
                    why = (fused.unavailable_reason(p.device) if isinstance(p, torch.Tensor) and not p.is_meta
                           else None)
                    if why is not None:
                        raise ValueError(f"fused=True: {why}; use fused=None (the fastest available) or foreach")
        super().add_param_group(param_group)

    def _same_decay(self, decay: Any) -> bool:
        """Whether ``decay`` is this optimizer's decay (ZeroRedundancyOptimizer copies the constructor's keyword
        arguments into every param group of the optimizer it wraps; that copy is honoured)."""
        own = self.sign_internal_decay
        if decay is own:
            return True
        if isinstance(decay, dict) and isinstance(own, InternalDecay):  # a group saved by state_dict()
            return decay == own.state_dict()
        return isinstance(decay, InternalDecay) and decay == own

    @property
    def sign_internal_decay(self) -> SignDecay:
        """The decay ``step -> float`` of the sign term (None: constant 1)."""
        return self._sign_internal_decay

    @sign_internal_decay.setter
    def sign_internal_decay(self, decay: SignDecay) -> None:
        if decay is not None and not callable(decay):
            raise TypeError(
                "sign_internal_decay must be None, an InternalDecay or a callable step -> float, "
                f"got {type(decay).__name__}"
            )
        self._sign_internal_decay = decay

    def __getstate__(self) -> Dict[str, Any]:  # copy.deepcopy / pickle of the optimizer keep the decay
        state = super().__getstate__()
        state["_sign_internal_decay"] = self.sign_internal_decay
        state.pop("_fused_plans", None)  # pointers: rebuilt at the next step
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_sign_internal_decay", None)
        self._fused_plans = {}
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("weight_decay", 0.0)

    # ----------------------------------------------------------------- serialization
    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state dict plus ``"sign_internal_decay"`` (None, a decay config, or
        ``{"kind": "custom", "repr": ...}`` for a callable that cannot be serialized)."""
        state_dict = super().state_dict()
        saved = self._saved_decay()
        state_dict[_DECAY_KEY] = saved
        for group in state_dict["param_groups"]:  # a group copy of the decay (ZeroRedundancyOptimizer's): its form
            if _DECAY_KEY in group:
                group[_DECAY_KEY] = saved
        return state_dict

    def _saved_decay(self) -> Optional[Dict[str, Any]]:
        """The decay as ``state_dict()`` saves it: None, an InternalDecay's config, or a custom callable's repr."""
        decay = self.sign_internal_decay
        if decay is None:
            return None
        if isinstance(decay, InternalDecay):
            return decay.state_dict()
        return {"kind": "custom", "repr": repr(decay)}

    def _check_state_dict(self, state_dict: Dict[str, Any]) -> Dict[Any, torch.Tensor]:
        """ValueError/TypeError unless ``state_dict`` is one of this optimizer's kind for these parameters."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(f"state_dict must be the dict of a {name}.state_dict() (keys 'state' and 'param_groups')")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} param groups, "
                             f"this {name} has {len(self.param_groups)}")
        params_of = {}
        for k, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(own["params"]):
                raise ValueError(f"state_dict param group {k} does not have the {len(own['params'])} parameters "
                                 f"of this {name}'s group {k}")
            try:
                self._check_group({"fused": None, "capturable": False, **saved})  # 0.1's have neither
            except (TypeError, ValueError) as err:
                raise ValueError(f"state_dict param group {k} is not a valid {name} group: {err}") from None
            params_of.update(zip(saved["params"], own["params"]))
        for key, entry in state_dict["state"].items():
            p = params_of.get(key)
            if p is None:
                raise ValueError(f"state_dict holds state for parameter {key!r}, which is in none of its param groups")
            if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg"}:
                raise ValueError(f"state_dict: the state of parameter {key} has keys "
                                 f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}, "
                                 f"a {name} keeps exactly ['exp_avg', 'step'] (is it another optimizer's?)")
            avg = entry["exp_avg"]
            if not isinstance(avg, torch.Tensor) or avg.shape != p.shape:
                raise ValueError(f"state_dict: exp_avg of parameter {key} has shape "
                                 f"{tuple(avg.shape) if isinstance(avg, torch.Tensor) else type(avg).__name__}, "
                                 f"the parameter has shape {tuple(p.shape)}")
            validation.as_int(f"state_dict: step of parameter {key}", entry["step"], minimum=0, integral_float=True)
        return params_of

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the state and the decay (see the class docstring for callables that are not decays).

        The whole state dict is checked first (the state of another optimizer, of other parameter
        shapes or counts, or bad hyper-parameters is a ValueError): a refused load changes nothing.
        """
        params_of = self._check_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype; half-precision parameters keep a
        # float32 moving average, so the saved one is put back after the load (not a float16 copy)
        avgs = {params_of[k]: e["exp_avg"] for k, e in state_dict["state"].items()}
        state_dict = dict(state_dict)
        has_key = _DECAY_KEY in state_dict
        saved = state_dict.pop(_DECAY_KEY, None)
        if has_key:
            if saved is not None and not isinstance(saved, dict):
                raise ValueError(f"state_dict[{_DECAY_KEY!r}] must be None or a decay's state_dict() (a dict), "
                                 f"got {type(saved).__name__}")
            if saved is None:
                decay: SignDecay = None
            elif saved.get("kind") == "custom":
                if self.sign_internal_decay is None:
                    raise ValueError(
                        f"the state dict was saved with a custom sign_internal_decay ({saved.get('repr')}) "
                        "that cannot be serialized: construct the optimizer with that callable again"
                    )
                decay = self.sign_internal_decay
            else:
                decay = internal_decay_from_state_dict(saved)
        super().load_state_dict(state_dict)
        for p, avg in avgs.items():
            state = self.state[p]
            state["exp_avg"] = avg.to(device=p.device, dtype=fused.state_dtype(p.dtype), copy=True)
            # 0.1 saved an int; capturable keeps the counter on the parameter's device
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            state["step"] = torch.tensor(float(state["step"]), dtype=_step_dtype(),
                                         device=p.device if group["capturable"] else "cpu")
        if has_key:
            self.sign_internal_decay = decay

    # ----------------------------------------------------------------- step
    def _decay_value(self, step: int) -> float:
        decay = self.sign_internal_decay
        if decay is None:
            return 1.0
        value = decay(step)
        try:
            value = validation.as_real(f"sign_internal_decay({step})", value, finite=False)
        except TypeError:
            raise TypeError(f"sign_internal_decay({step}) must return a real number, got {type(value).__name__}") from None
        if not math.isfinite(value):
            raise ValueError(f"sign_internal_decay({step}) returned {value}; it must be finite")
        return value

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._prepare_step()  # every check first: a refused step changes nothing
        for group, params, grads, decays, states in work:
            for i, state in enumerate(states):
                if not state:
                    p = params[i]
                    state = states[i] = self.state[p]
                    # a tensor step (as torch.optim's): torch.compile(opt.step) does not recompile per step;
                    # on the parameter's device when capturable (no host read, CUDA-graph safe)
                    state["step"] = torch.zeros((), dtype=_step_dtype(),
                                                device=p.device if group["capturable"] else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, dtype=fused.state_dtype(p.dtype),
                                                        memory_format=torch.preserve_format)
            avgs = [state["exp_avg"] for state in states]
            if torch.compiler.is_compiling() or group["capturable"]:
                torch._foreach_add_([state["step"] for state in states], 1.0)
                self._traced_update(group, params, grads, avgs)
                continue
            lr = validation.as_real("lr", group["lr"])  # a tensor lr is read once per group and step
            rest = list(range(len(params)))
            if self._use_fused(group, params):  # the fused kernels advance their parameters' step counters
                rest = self._fused_update(group, lr, params, grads, avgs, decays, states)
            if not rest:
                continue
            torch._foreach_add_([states[i]["step"] for i in rest], 1.0)  # one call, not one per parameter
            full = [i for i in rest if params[i].dtype not in _HALF]
            half = [i for i in rest if params[i].dtype in _HALF]
            foreach = group["foreach"]
            if foreach is None and full:
                foreach = _default_to_fused_or_foreach([params[i] for i in full], differentiable=False)[1]
            coefs = {d: self.coefficients(group, d) for d in set(decays)}
            options = dict(lr=lr, beta=group["beta"], weight_decay=group["weight_decay"], maximize=group["maximize"])
            for idx, use_foreach in ((full, bool(foreach)), (half, False)):  # half precision: one by one, in float32
                if idx:
                    functional.sign_update([params[i] for i in idx], [grads[i] for i in idx], [avgs[i] for i in idx],
                                           [coefs[decays[i]] for i in idx], foreach=use_foreach,
                                           chunk_numel=self.cpu_chunk_numel, **options)
        return loss

    def _traced_update(self, group, params, grads, avgs) -> None:
        """The update under ``torch.compile`` or ``capturable``: step, decay and lr stay tensors (no Python number
        derived from the step counter, so no recompilation per step); inductor fuses the elementwise ops."""
        decay = self.sign_internal_decay
        lr = group["lr"]
        lr = lr.reshape(()) if isinstance(lr, torch.Tensor) else lr  # a 1-element lr of any shape, e.g. (1, 1)
        for p, g, m in zip(params, grads, avgs):
            step = self.state[p]["step"] - 1  # the decay of the step before this update, as in eager
            if decay is None:
                d = torch.ones((), dtype=torch.float64)
            elif isinstance(decay, InternalDecay):
                d = decay.tensor_value(step)
            else:  # a custom callable takes a number: one recompilation per step value
                d = torch.tensor(float(decay(int(step))), dtype=torch.float64)
            d = d.to(torch.float32 if p.dtype in _HALF else p.dtype)
            functional._traced_sign(p, g, m, self.tensor_coefficients(group, d), lr=lr, beta=group["beta"],
                                    weight_decay=group["weight_decay"], maximize=group["maximize"])

    def _use_fused(self, group: Dict[str, Any], params: List[torch.Tensor]) -> bool:
        """``fused=True``, or ``fused=None`` and ``foreach=None`` with a fused kernel for every device."""
        if group["fused"] is not None or group["foreach"] is not None:
            return bool(group["fused"])
        return all(fused.available(d) for d in {p.device for p in params})

    def _fused_update(self, group, lr, params, grads, avgs, decays, states) -> List[int]:
        """Run the fused kernels on what they support, grouped by device and dtype, and advance those
        parameters' step counters; the indices left over."""
        plan = self._fused_plans.get(id(group))
        if plan is None or not plan.matches(params, avgs, states):
            plan = self._fused_plans[id(group)] = fused.FusedPlan(params, avgs, states)
        rest = list(plan.rest)
        coefs = {d: self.coefficients(group, d)[1:] for d in set(decays)}  # the kernels' (a, b)
        options = dict(lr=lr, beta=float(group["beta"]), alpha=float(group["alpha"]),
                       weight_decay=float(group["weight_decay"]), maximize=group["maximize"])
        for bucket in plan.buckets:
            idx = bucket.idx
            bucket_grads = [fused.local_shard(grads[i]) for i in idx]
            if not all(fused.supported(plan.local_params[i], g, plan.local_avgs[i])
                       and g.shape == plan.local_params[i].shape for i, g in zip(idx, bucket_grads)):
                rest += idx  # a rare gradient layout (non-contiguous, another sharding): the other paths
                continue
            a = [coefs[decays[i]][0] for i in idx]
            b = [coefs[decays[i]][1] for i in idx]
            if bucket.kernel is not None:
                fused.cpu_step_planned(self.rule, bucket.kernel, bucket_grads, a, b, **options)  # advances the counters
            else:
                run = fused.cpu_step if bucket.device.type == "cpu" else _cuda_step()
                run(self.rule, [plan.local_params[i] for i in idx], bucket_grads, [plan.local_avgs[i] for i in idx],
                    a, b, **options)
                torch._foreach_add_([states[i]["step"] for i in idx], 1.0)
        return sorted(rest)

    def coefficients(self, group: Dict[str, Any], decay: float) -> Coefficients:
        """The rule's ``(c0, a, b)`` for a parameter of ``group`` at decay value ``decay``
        (:mod:`sign_optim.functional`)."""
        raise NotImplementedError

    def tensor_coefficients(self, group: Dict[str, Any], decay: torch.Tensor):
        """:meth:`coefficients` with a 0-d tensor ``decay`` (the traced path); ``b`` None where the rule has none."""
        raise NotImplementedError

    def _prepare_step(self) -> List[Tuple[Dict[str, Any], List[torch.Tensor], List[torch.Tensor], List[float], List]]:
        """Check every group and gradient (hyper-parameters may have been changed since construction, by
        a scheduler say) and evaluate the decays; ``[(group, params, grads, decays, states)]``, nothing
        changed (``states``: each parameter's state dict, None for a parameter without state yet)."""
        name = type(self).__name__
        work = []
        compiling = torch.compiler.is_compiling()
        for group in self.param_groups:
            self._check_group(group)
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(f"{name} does not support sparse gradients (grad layout {g.layout})")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"{name}: a gradient of shape {tuple(g.shape)}, {g.dtype} on {g.device} "
                                     f"does not match its parameter ({tuple(p.shape)}, {p.dtype} on {p.device})")
                params.append(p)
                grads.append(g)
            if not params:
                continue
            # .get: self.state is a defaultdict, [] would add an entry (None: a new parameter)
            states = [self.state.get(p) for p in params]
            # the decay is evaluated as a tensor in _traced_update when compiling or capturable
            traced = compiling or group["capturable"]
            if not compiling:
                for p, state in zip(params, states):
                    if state:
                        self._check_state(p, state)
            decays = [] if traced else self._decays(states)
            if not traced:
                self._check_magnitudes(group, params, decays)
            work.append((group, params, grads, decays, states))
        return work

    def _check_state(self, p: torch.Tensor, state: Dict[str, Any]) -> None:
        """ValueError unless ``state`` still fits ``p`` (state surgery or ``p.data = ...`` can break that)."""
        avg, step = state.get("exp_avg"), state.get("step")
        want = fused.state_dtype(p.dtype)
        if not isinstance(avg, torch.Tensor) or avg.shape != p.shape or avg.dtype != want or avg.device != p.device:
            got = (f"shape {tuple(avg.shape)}, {avg.dtype} on {avg.device}" if isinstance(avg, torch.Tensor)
                   else type(avg).__name__)
            raise ValueError(f"{type(self).__name__}: the state of a parameter of shape {tuple(p.shape)} ({p.dtype} on "
                             f"{p.device}) has exp_avg of {got}, expected its shape, {want} on {p.device}; was the "
                             "parameter or its state replaced? (reset it with optimizer.state.pop(p))")
        if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.is_complex():
            raise ValueError(f"{type(self).__name__}: the state of a parameter of shape {tuple(p.shape)} has step "
                             f"{step!r}, expected a 1-element real tensor")

    def _max_factor(self, group: Dict[str, Any], decay: float) -> float:
        """The largest ``|factor|`` the rule can multiply a gradient element by at decay value ``decay`` (inf when
        it overflows a float64)."""
        try:
            return functional.max_factor(self.coefficients(group, decay))
        except OverflowError:
            return math.inf

    def _check_magnitudes(self, group: Dict[str, Any], params: List[torch.Tensor], decays: List[float]) -> None:
        """ValueError before any change when ``lr`` times the rule's factor (or ``lr * weight_decay``) overflows
        the dtype the update is computed in: a step that would write inf, or fail inside torch half done."""
        lr = validation.as_real("lr", self._lr_value(group))
        dtype = min({torch.float32 if p.dtype in _HALF else p.dtype for p in params}, key=lambda d: torch.finfo(d).max)
        limit = torch.finfo(dtype).max
        for d in set(decays):
            factor = self._max_factor(group, d)
            if not math.isfinite(factor) or factor > limit:
                raise ValueError(f"{type(self).__name__}: alpha={group['alpha']!r} with sign_internal_decay value {d!r} "
                                 f"scales the gradient by {factor:.3g}, beyond {dtype}'s range: choose alpha closer to "
                                 "1 or a smaller decay")
            if lr * factor > limit:
                raise ValueError(f"{type(self).__name__}: lr={lr!r} times the rule's largest factor {factor:.3g} "
                                 f"overflows {dtype} (max {limit:.3g}): lr must be below {limit / factor:.3g}")
        if lr * float(group["weight_decay"]) > limit:
            raise ValueError(f"{type(self).__name__}: lr * weight_decay = {lr * float(group['weight_decay']):.3g} "
                             f"overflows {dtype}")

    @staticmethod
    def _lr_value(group: Dict[str, Any]):
        lr = group["lr"]
        return lr.reshape(()) if isinstance(lr, torch.Tensor) else lr

    def _decays(self, states: List[Optional[Dict[str, Any]]]) -> List[float]:
        """The decay of each parameter's update (``states``: each one's state, None for a new one). TF
        evaluates the decay at the step before incrementing it: the first update uses d(0). The step
        counters are CPU tensors, read in one call (no sync)."""
        counted = [s["step"] for s in states if s]
        # what this optimizer creates and loads; checked once per step, read by the C kernel
        if counted and fused.float32_counters(counted) and fused.available(torch.device("cpu")):
            values = iter(fused.read_steps(counted))  # one C call
        else:
            values = iter(torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counted]).tolist()
                          if counted else [])
        steps = [int(next(values)) if s else 0 for s in states]
        cache = {step: self._decay_value(step) for step in set(steps)}
        return [cache[step] for step in steps]

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f"sign_internal_decay: {self.sign_internal_decay!r}\n)"

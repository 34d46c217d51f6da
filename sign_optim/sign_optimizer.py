"""Shared machinery of AddSign and PowerSign: the moving average, the internal decay, serialization.

Both rules (Bello et al., 2017, arXiv 1709.07417) keep one moving average per parameter and, as in
TensorFlow, update it first (no bias correction), then scale the gradient by a factor of
``sign(g) * sign(m)`` and of the internal decay ``d`` evaluated at the step *before* it is
incremented (the first update uses ``d(0)``). A subclass only gives its rule's coefficient function
(``rule_coefficients``, `sign_optim.functional`); the class keeps the state, checks everything first, and hands
the work to the one dispatcher, `sign_optim.functional.sign_update`, which chooses the route (fused, foreach,
single-tensor, traced) as torch's ``adam()`` does.
"""

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from toolbox_core import validation

from . import aliasing, functional, fused
from .decays import InternalDecay, internal_decay_from_state_dict
from .functional import Coefficients

__all__ = ["SignOptimizer", "SignDecay", "SHARED_ARGS_DOC", "shares_argument_docs"]

SignDecay = Optional[Callable[[int], float]]

_HALF = (torch.float16, torch.bfloat16)


def _step_dtype() -> torch.dtype:
    """The step counters' dtype, as torch.optim's: float64 when that is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# Key of the decay's serialized form in the optimizer's state_dict.
_DECAY_KEY = "sign_internal_decay"
# Key of the rule's name (a subclass's `rule`) in the optimizer's state_dict: an AddSign state (alpha 1) loaded
# into a PowerSign would silently make it SGD (ln 1 = 0), so a state dict loads only into its own rule.
_RULE_KEY = "sign_rule"
# Flags added after the first release, with their defaults: an older state dict's groups may lack them
# (torch's test_can_load_older_state_dict removes each one, as torch.optim's own flags).
_LATER_FLAGS = {"maximize": False, "foreach": None, "fused": None, "capturable": False, "weight_decay": 0.0}


#: The argument docs AddSign and PowerSign share, in one place (torch.optim's ``_foreach_doc``/``_fused_doc`` way):
#: `shares_argument_docs` appends them to a rule's own ``Args`` (``params``, ``alpha``).
SHARED_ARGS_DOC = """\
        lr: learning rate (>= 0), a number or a 1-element tensor. Default: 1e-3 (TensorFlow's default is 0.1).
        beta: moving-average coefficient in [0, 1). Default: 0.9.
        sign_internal_decay: None (constant 1), a [`InternalDecay`][sign_optim.InternalDecay] (saved in
            ``state_dict``), or any callable ``step -> float`` (not serializable: pass it again when
            resuming, see [`SignOptimizer`][sign_optim.SignOptimizer]).
        weight_decay: decoupled weight decay (>= 0): ``w <- w - lr * weight_decay * w`` before the update, as in
            AdamW. Default: 0.
        maximize: maximize the objective instead of minimizing it. Default: False.
        foreach: use the ``torch._foreach_*`` implementation.
        fused: use the one-pass operator (`sign_optim.fused`: C++ on CPU, Triton on CUDA).
            ``fused=None, foreach=None`` (the default) takes the fused kernel where it is available,
            else foreach; ``fused=True`` where it is not is a ValueError. The paths agree to 1 ulp
            (`sign_optim.functional.sign_update` dispatches them).
        capturable: keep the step counter on the parameters' device and never read a tensor on the
            host (CUDA graphs); ``lr`` may then be a device tensor. With ``fused=True`` on the CPU the
            fused operator runs (no device to sync with); on CUDA the traced update.
"""


def shares_argument_docs(cls: type) -> type:
    """Class decorator: `SHARED_ARGS_DOC` appended to the end of the class docstring's ``Args`` section (before
    ``Examples``), so a help() or an API page shows every argument while each is written once."""
    head, sep, tail = (cls.__doc__ or "").partition("\n\n    Examples:")
    cls.__doc__ = head.rstrip("\n") + "\n" + SHARED_ARGS_DOC.rstrip("\n") + sep + tail
    return cls


class SignOptimizer(Optimizer):
    """Base class of [`AddSign`][sign_optim.AddSign] and [`PowerSign`][sign_optim.PowerSign].

    Every constructor keyword is a per-group hyper-parameter, as in torch.optim, the internal decay included:
    ``group["sign_internal_decay"]`` (None: constant 1), so param groups may decay differently. The step counter
    is per parameter (``state[p]["step"]``, a 0-d CPU tensor of torch's step dtype, as in torch.optim, so that
    ``torch.compile(opt.step)`` does not recompile per step), next to the moving average ``state[p]["exp_avg"]``
    (float32 for float16/bfloat16 parameters).

    Three implementations give the same result (to 1 ulp), as torch.optim's functional split: the fused
    operator ``torch.ops.sign_optim.fused_sign_`` (`sign_optim.fused`, the default where available: it
    checks the tensors natively, as torch's fused optimizers do), ``torch._foreach_*`` ops, and a loop over
    parameters. ``lr`` may be a 1-element tensor (read once per step). With ``capturable=True`` the step
    counters live on the parameters' device and the step, the decay and ``lr`` stay tensors: no host read,
    CUDA-graph safe (the foreach/traced update, not the fused kernels).

    Every path refuses (ValueError, nothing changed) a step in which a tensor it writes (a parameter, its moving
    average or step counter) shares memory with another tensor of the step: a parameter listed twice, a gradient
    or moving average that is a view of a parameter (`sign_optim.aliasing`); every path bumps the parameters'
    version counters, so a backward through a graph that saved them raises. ``state_dict()["sign_rule"]`` names
    the rule, and a state dict loads only into its own rule (an AddSign state in a PowerSign is a ValueError).

    Serialization of the decays: an [`InternalDecay`][sign_optim.InternalDecay] is saved as its config in its
    group of ``state_dict()["param_groups"]`` (and the constructor's under ``state_dict()["sign_internal_decay"]``)
    and rebuilt by ``load_state_dict``. Any other callable cannot be serialized: it is saved as
    ``{"kind": "custom", "repr": ...}`` and ``load_state_dict`` keeps the callable the group was constructed with
    (pass the same one again); it raises ``ValueError`` if that group has no decay to keep.
    """

    #: the rule's name, saved in ``state_dict()["sign_rule"]`` (a subclass sets it)
    rule: str = ""

    #: the rule's ``(alpha, decay) -> (c0, a, b)``, for a number or a tensor decay (`sign_optim.functional`)
    rule_coefficients: Optional[Callable[[float, Any], Coefficients]] = None

    #: CPU foreach path: elements per cache-sized piece of work (`sign_optim.functional._cache_sized_chunks`).
    cpu_chunk_numel: int = 1 << 16

    def __init__(
        self,
        params: Iterable,
        defaults: Dict[str, Any],
        sign_internal_decay: SignDecay,
    ) -> None:
        if type(self).rule_coefficients is None:
            raise TypeError(f"{type(self).__name__} gives no rule: construct AddSign or PowerSign (a subclass of "
                            "SignOptimizer must set rule_coefficients, a function of sign_optim.functional)")
        defaults = {**defaults, _DECAY_KEY: _as_decay(sign_internal_decay)}
        self._check_group(defaults)  # hyper-parameters first, before the params are iterated (torch.optim's order)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- validation
    #: hyper-parameters every param group of this optimizer holds (a foreign state dict lacks some)
    group_keys = ("lr", "beta", "alpha", "weight_decay", "maximize", "foreach", "fused", "capturable", _DECAY_KEY)

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
            raise ValueError(f"Tensor lr must be 1-element (a number or a 1-element tensor of any shape), got a "
                             f"tensor of shape {tuple(lr.shape)}")
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
        decay = group[_DECAY_KEY]
        if decay is not None and not callable(decay):
            raise TypeError("sign_internal_decay must be None, an InternalDecay or a callable step -> float, "
                            f"got {type(decay).__name__}")
        if capturable and decay is not None and not isinstance(decay, InternalDecay):
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
            # torch.optim warns that this "will cause an error" in future; here it is one now: a parameter listed
            # twice would be stepped twice by the loop and the foreach ops, and its memory written twice at once
            # by the fused kernel (different answers on different paths)
            seen = set()
            for k, p in enumerate(param_group["params"]):
                if id(p) in seen:
                    raise ValueError(f"params: the parameter at position {k} is listed twice in one param group; "
                                     "each parameter may appear once")
                seen.add(id(p))
            if _DECAY_KEY in param_group:  # a saved group's config (ZeroRedundancyOptimizer's copy) is a decay
                param_group[_DECAY_KEY] = _as_decay(param_group[_DECAY_KEY])
            merged = {**self.defaults, **param_group}
            self._check_group(merged)
            if merged["fused"]:
                for p in param_group["params"]:
                    # meta parameters (deferred initialization, to_empty later) are checked at the step
                    why = (fused.unavailable_reason(p.device) if isinstance(p, torch.Tensor) and not p.is_meta
                           else None)
                    if why is not None:
                        raise ValueError(f"fused=True: {why}; use fused=None (the fastest available) or foreach")
        super().add_param_group(param_group)

    @property
    def sign_internal_decay(self) -> SignDecay:
        """The constructor's decay ``step -> float`` of the sign term (None: constant 1), the default of every
        param group. Setting it sets it for every group."""
        return self.defaults[_DECAY_KEY]

    @sign_internal_decay.setter
    def sign_internal_decay(self, decay: SignDecay) -> None:
        decay = _as_decay(decay)
        for group in [self.defaults, *self.param_groups]:
            self._check_group({**group, _DECAY_KEY: decay})
        for group in [self.defaults, *self.param_groups]:
            group[_DECAY_KEY] = decay

    def __setstate__(self, state: Dict[str, Any]) -> None:
        old_decay = state.pop("_sign_internal_decay", None)  # pickles of 0.3 kept the decay on the optimizer
        super().__setstate__(state)
        self.defaults.setdefault(_DECAY_KEY, old_decay)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("weight_decay", 0.0)
            group.setdefault(_DECAY_KEY, old_decay)

    # ----------------------------------------------------------------- serialization
    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state dict, each group's decay in its serialized form (None, a decay config, or
        ``{"kind": "custom", "repr": ...}`` for a callable that cannot be serialized), and the constructor's
        under ``"sign_internal_decay"``."""
        state_dict = super().state_dict()
        state_dict[_RULE_KEY] = self.rule
        state_dict[_DECAY_KEY] = _saved_decay(self.sign_internal_decay)
        for group in state_dict["param_groups"]:
            group[_DECAY_KEY] = _saved_decay(group.get(_DECAY_KEY))
        return state_dict

    def _check_state_dict(self, state_dict: Dict[str, Any]) -> Dict[Any, torch.Tensor]:
        """ValueError/TypeError unless ``state_dict`` is one of this optimizer's kind for these parameters."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(f"state_dict must be the dict of a {name}.state_dict() (keys 'state' and 'param_groups')")
        saved_rule = state_dict.get(_RULE_KEY, self.rule)  # older state dicts do not say
        if saved_rule != self.rule:
            raise ValueError(f"state_dict is the state of a {saved_rule!r} optimizer (state_dict[{_RULE_KEY!r}]), this "
                             f"is {name} ({self.rule!r}): a state dict loads into the rule that saved it (alpha means "
                             "something else in another rule)")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} param groups, "
                             f"this {name} has {len(self.param_groups)}")
        if _DECAY_KEY in state_dict:
            try:
                self._loaded_decay(state_dict[_DECAY_KEY], self.defaults, -1)
            except (TypeError, ValueError) as err:
                raise ValueError(f"state_dict[{_DECAY_KEY!r}]: {err}") from None
        if not isinstance(state_dict["state"], dict):
            raise TypeError(f"state_dict['state'] must be a dict (parameter id -> its state), got "
                            f"{type(state_dict['state']).__name__}")
        params_of = {}
        for k, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(own["params"]):
                raise ValueError(f"state_dict param group {k} does not have the {len(own['params'])} parameters "
                                 f"of this {name}'s group {k}")
            try:
                decay = self._loaded_decay(saved.get(_DECAY_KEY, state_dict.get(_DECAY_KEY)), own, k)
                self._check_group({**_LATER_FLAGS, **saved, _DECAY_KEY: decay})
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
            # a moving average holds real values to read: a meta, sparse, complex or integer tensor is another
            # optimizer's (or a tampered) state, which the load would cast silently or the step fail on half done
            if avg.is_meta or avg.layout != torch.strided or not avg.is_floating_point():
                raise ValueError(f"state_dict: exp_avg of parameter {key} must be a dense floating tensor with data, "
                                 f"got {avg.dtype}, layout {avg.layout} on {avg.device}")
            if _is_dtensor(p) != _is_dtensor(avg):
                raise ValueError(
                    f"state_dict: exp_avg of parameter {key} is a {type(avg).__name__} but the parameter is a "
                    f"{type(p).__name__}: a single-process state does not load into sharded (FSDP2/DTensor) "
                    "parameters, or the reverse; load it with torch.distributed.checkpoint.state_dict."
                    "set_optimizer_state_dict (or set_state_dict), which reshards it")
            validation.as_int(f"state_dict: step of parameter {key}", entry["step"], minimum=0, integral_float=True)
        return params_of

    @staticmethod
    def _loaded_decay(saved: Any, group: Dict[str, Any], k: int) -> SignDecay:
        """The decay a loaded group gets: rebuilt from its config, or the group's own callable for a custom one."""
        if saved is None or callable(saved):
            return saved
        if not isinstance(saved, dict):
            raise ValueError(f"{_DECAY_KEY} must be None or a decay's state_dict() (a dict), got {type(saved).__name__}")
        if saved.get("kind") == "custom":
            if group.get(_DECAY_KEY) is None:
                where = "" if k < 0 else f" in param group {k}"
                raise ValueError(f"the state dict was saved with a custom {_DECAY_KEY} ({saved.get('repr')}){where} "
                                 "that cannot be serialized: construct the optimizer with that callable again")
            return group[_DECAY_KEY]
        return internal_decay_from_state_dict(saved)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the state and the groups' decays (see the class docstring for callables that are not decays).

        The whole state dict is checked first (the state of another optimizer, of other parameter
        shapes or counts, or bad hyper-parameters is a ValueError): a refused load changes nothing.
        """
        params_of = self._check_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype; half-precision parameters keep a
        # float32 moving average, so the saved one is put back after the load (not a float16 copy)
        avgs = {params_of[k]: e["exp_avg"] for k, e in state_dict["state"].items()}
        top = state_dict.get(_DECAY_KEY, self.sign_internal_decay)
        decays = [self._loaded_decay(saved.get(_DECAY_KEY, top), own, k)
                  for k, (saved, own) in enumerate(zip(state_dict["param_groups"], self.param_groups))]
        default = self._loaded_decay(top, self.defaults, -1)  # the constructor's: the default of groups added later
        state_dict = dict(state_dict)
        state_dict.pop(_DECAY_KEY, None)
        state_dict.pop(_RULE_KEY, None)
        state_dict["param_groups"] = [{**g, _DECAY_KEY: d} for g, d in zip(state_dict["param_groups"], decays)]
        super().load_state_dict(state_dict)
        for p, avg in avgs.items():
            state = self.state[p]
            state["exp_avg"] = avg.to(device=p.device, dtype=fused.state_dtype(p.dtype), copy=True)
            # 0.1 saved an int; capturable keeps the counter on the parameter's device
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            state["step"] = torch.tensor(float(state["step"]), dtype=_step_dtype(),
                                         device=p.device if group["capturable"] else "cpu")
        self.defaults[_DECAY_KEY] = default

    # ----------------------------------------------------------------- step
    @staticmethod
    def _decay_value(decay: SignDecay, step: int) -> float:
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

        Every group is checked before any tensor changes: a refused step raises ValueError or TypeError and
        changes nothing.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf, grad_scale = self._amp_flags()
        # one group and nothing to unscale: the operator's own native check is the only one (a refused call changes
        # nothing, and the general path then reports or partitions); else every group is checked before any runs
        precheck = grad_scale is not None or len(self.param_groups) > 1
        fast = None if torch.compiler.is_compiling() else self._fused_work(precheck)
        if fast is not None:  # every group fused and checked natively: one operator call per group
            self._unscale(grad_scale, found_inf)
            try:
                for params, grads, avgs, steps, table, group in fast:
                    functional._sign_update(params, grads, avgs, table, steps, lr=group["lr"], beta=group["beta"],
                                            weight_decay=group["weight_decay"], maximize=group["maximize"],
                                            fused=True, found_inf=found_inf)
                return loss
            except (ValueError, TypeError, RuntimeError, NotImplementedError):
                if precheck:  # the operator refused what its own check passed: not a layout question
                    raise
        # (a layout the operator refused: the general path reports it by name or hands it to the other paths)
        work = self._prepare_step()  # every check first
        self._unscale(grad_scale, found_inf)  # after the checks: a refused step leaves the gradients as they were
        for group, params, grads, decays, states in work:
            self._update_group(group, params, grads, decays, states, found_inf)
        return loss

    def _amp_flags(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """torch's fused-optimizer protocol with a gradient scaler: ``optimizer.found_inf`` (non-zero: this step
        changes nothing, decided on the flag's device by `sign_optim.functional.sign_update`, never read on the
        host) and ``optimizer.grad_scale`` (the gradients are divided by it in place, as ``GradScaler.unscale_``
        does, once the step's checks have passed, unless found_inf is set). Both are absent unless a caller sets
        them; each must be None or a 1-element tensor (a floating one for ``grad_scale``)."""
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for name, value in (("found_inf", found_inf), ("grad_scale", grad_scale)):
            if value is not None and not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise TypeError(f"optimizer.{name} must be None or a 1-element tensor (torch's GradScaler protocol), "
                                f"got {type(value).__name__}"
                                + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
        if grad_scale is not None and not grad_scale.is_floating_point():
            raise TypeError(f"optimizer.grad_scale must be a floating tensor, got dtype {grad_scale.dtype}")
        return found_inf, grad_scale

    def _unscale(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        """Divide every gradient by ``grad_scale`` in place (one foreach call per device); by 1 where ``found_inf``
        is set (a skipped step leaves the gradients as they were; a tensor decision, no host read)."""
        if grad_scale is None:
            return
        if found_inf is not None:
            grad_scale = torch.where(found_inf.reshape(()).to(grad_scale.device) != 0,
                                     torch.ones_like(grad_scale), grad_scale)
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            torch._foreach_div_(grads, grad_scale.to(device).reshape(()))

    # ---- the fused fast path: torch.optim's _init_group, with the checks in the operator
    def _fused_work(self, precheck: bool = True) -> Optional[List[tuple]]:
        """The operator's arguments for every group, checked natively, when every group with gradients takes the
        fused path and every parameter has its state; None otherwise (the general path then checks, partitions
        and reports). Per parameter this costs what torch's fused Adam's ``_init_group`` does."""
        work = []
        state_of = self.state.get
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self._route(group, params) != "fused":
                return None
            self._check_group(group)
            states = list(map(state_of, params))
            if not all(states):
                return None  # a first step: the general path creates the state
            try:
                grads = [p.grad for p in params]
                avgs = [s["exp_avg"] for s in states]
                steps = [s["step"] for s in states]
            except KeyError:
                return None
            coefficients = self._fused_coefficients(group, params, steps)
            if type(params[0]) not in fused.PLAIN_TENSORS:  # DTensors (FSDP2, tensor parallel): their local shards
                params, grads, avgs = ([fused.local_shard(t) for t in ts] for ts in (params, grads, avgs))
            try:
                if precheck:
                    torch.ops.sign_optim.check_fused_inputs(params, grads, avgs, steps, coefficients,
                                                            float(group["beta"]), params[0].device.type)
            except (ValueError, TypeError, RuntimeError, NotImplementedError):
                # the check reads metadata only: a layout the general path partitions or reports (a subclass that is
                # not a plain shard, a view, state surgery)
                return None
            work.append((params, grads, avgs, steps, coefficients, group))
        return work

    def _fused_coefficients(self, group: Dict[str, Any], params: List[torch.Tensor],
                            steps: List[torch.Tensor]) -> torch.Tensor:
        """The operator's coefficient table of a group: one row when every parameter is at the same decay (always
        without a decay), else one per parameter. Checks the magnitudes first."""
        decay = group[_DECAY_KEY]
        if decay is None:
            decays = [1.0]
        else:
            values = fused.step_values(steps)  # one native read of every counter
            decays = [self._decay_value(decay, int(v)) for v in values] if min(values) != max(values) \
                else [self._decay_value(decay, int(values[0]))]
        self._check_magnitudes(group, params, decays)
        lr = validation.as_real("lr", self._lr_value(group))
        by_decay = {d: self.coefficients(group, d) for d in set(decays)}
        return fused._kernel_table([by_decay[d] for d in decays], lr, float(group["weight_decay"]))

    # ---- the general path: every route, first steps, subclasses, capturable, torch.compile
    @staticmethod
    def _route(group: Dict[str, Any], params: List[torch.Tensor]) -> str:
        """The route `sign_optim.functional.sign_update` takes for the group (`sign_optim.functional.route`)."""
        return functional._route(params, group["foreach"], group["fused"], group["capturable"])  # flags checked

    def _use_fused(self, group: Dict[str, Any], params: List[torch.Tensor]) -> bool:
        """Whether the group takes the fused operator (eagerly or as a compiled graph's node)."""
        return self._route(group, params) in ("fused", "compiled_fused")

    def _update_group(self, group, params, grads, decays, states, found_inf=None) -> None:
        """The state of a first step, the coefficients (numbers, or tensors on the traced routes), then the
        dispatcher."""
        for i, state in enumerate(states):
            if not state:
                p = params[i]
                state = states[i] = self.state[p]
                # a tensor step (as torch.optim's): torch.compile(opt.step) does not recompile per step;
                # on the parameter's device when capturable (no host read, CUDA-graph safe)
                state["step"] = torch.zeros((), dtype=_step_dtype(), device=p.device if group["capturable"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, dtype=fused.state_dtype(p.dtype),
                                                    memory_format=torch.preserve_format)
        avgs = [state["exp_avg"] for state in states]
        steps = [state["step"] for state in states]
        path = self._route(group, params)
        if path in ("traced", "compiled_fused"):
            lr = self._lr_value(group)  # a 1-element lr of any shape, e.g. (1, 1), stays a tensor
            coefficients = [self.coefficients(group, self._tensor_decay(group, p, s, path)) for p, s in
                            zip(params, steps)]
        else:
            lr = validation.as_real("lr", group["lr"])  # a tensor lr is read once per group and step
            by_decay = {d: self.coefficients(group, d) for d in set(decays)}
            coefficients = [by_decay[d] for d in decays]
        functional._sign_update(params, grads, avgs, coefficients, steps, lr=lr, beta=group["beta"],
                                weight_decay=group["weight_decay"], maximize=group["maximize"],
                                foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
                                found_inf=found_inf, chunk_numel=self.cpu_chunk_numel)

    @staticmethod
    def _tensor_decay(group: Dict[str, Any], p: torch.Tensor, step: torch.Tensor, path: str) -> torch.Tensor:
        """The decay of the step before this update as a 0-d tensor (torch.compile, capturable: no Python number
        derived from the counter, so no recompilation per step), in the dtype the route computes in."""
        decay = group[_DECAY_KEY]
        if decay is None:
            d = torch.ones((), dtype=torch.float64)
        elif isinstance(decay, InternalDecay):
            d = decay.tensor_value(step.reshape(()))
        else:  # a custom callable takes a number: one recompilation per step value
            d = torch.tensor(float(decay(int(step))), dtype=torch.float64)
        return d if path == "compiled_fused" else d.to(torch.float32 if p.dtype in _HALF else p.dtype)

    def coefficients(self, group: Dict[str, Any], decay) -> Coefficients:
        """The rule's ``(c0, a, b)`` for a parameter of ``group`` at decay value ``decay``, a number or a 0-d
        tensor (`rule_coefficients`, `sign_optim.functional`)."""
        return type(self).rule_coefficients(group["alpha"], decay)

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
            if group["fused"] and any(p.is_meta or not p.is_floating_point() for p in params):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   f"devices: {sorted({str(p.device.type) for p in params})} (materialize meta "
                                   "parameters first, e.g. with module.to_empty(device=...))")
            # .get: self.state is a defaultdict, [] would add an entry (None: a new parameter)
            states = [self.state.get(p) for p in params]
            # the decay is evaluated as a tensor (_tensor_decay) when compiling or capturable
            traced = self._route(group, params) in ("traced", "compiled_fused")
            if not compiling:
                for p, state in zip(params, states):
                    if state:
                        self._check_state(p, state)
                self._check_no_overlap(group, params, grads, states)
            decays = [] if traced else self._decays(group, states)
            if not traced:
                self._check_magnitudes(group, params, decays)
            work.append((group, params, grads, decays, states))
        return work

    def _check_no_overlap(self, group: Dict[str, Any], params: List[torch.Tensor], grads: List[torch.Tensor],
                          states: List[Optional[Dict[str, Any]]]) -> None:
        """ValueError when a tensor the step writes (a parameter, its moving average or step counter) shares memory
        with another tensor of the group's step (`sign_optim.aliasing`): every path would give another answer."""
        avgs = [s["exp_avg"] for s in states if s]
        steps = [s["step"] for s in states if s]
        found = aliasing.first_overlap(params, grads, avgs, steps)
        if found is None:
            return
        # the positions in group["params"] of `params` (those with a gradient, in order) and of those with state
        positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        with_state = [i for i, s in zip(positions, states) if s]
        words = {"params": "parameter", "grads": "gradient of parameter", "exp_avgs": "moving average of parameter",
                 "state_steps": "step counter of parameter"}

        def describe(role: str, i: int) -> str:
            return f"the {words[role]} {(with_state if role in ('exp_avgs', 'state_steps') else positions)[i]}"

        (a, i), (b, j) = found
        k = next(n for n, g in enumerate(self.param_groups) if g is group)
        raise ValueError(f"{type(self).__name__}: in param group {k}, {describe(a, i)} "
                         f"shares memory with {describe(b, j)}; a step writes each parameter, its moving average and "
                         "step counter in place, so none may overlap another tensor of the step (a parameter listed "
                         "twice, a gradient or moving average that is a view of a parameter): pass separate tensors "
                         "(clone() the gradient)")

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
        dtypes = {torch.float32 if p.dtype in _HALF else p.dtype for p in params}
        dtype = min(dtypes, key=lambda d: torch.finfo(d).max)
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

    def _decays(self, group: Dict[str, Any], states: List[Optional[Dict[str, Any]]]) -> List[float]:
        """The decay of each parameter's update (``states``: each one's state, None for a new one). TF
        evaluates the decay at the step before incrementing it: the first update uses d(0). The step
        counters are CPU tensors, read in one call (no sync)."""
        decay = group[_DECAY_KEY]
        if decay is None:
            return [1.0] * len(states)
        counted = [s["step"] for s in states if s]
        if all(type(c) in fused.PLAIN_TENSORS and c.is_cpu and c.dtype in (torch.float32, torch.float64)
               for c in counted):
            values = iter(fused.step_values(counted))
        else:
            values = iter(torch.stack([torch.as_tensor(c, dtype=torch.float64).reshape(()) for c in counted]).tolist()
                          if counted else [])
        steps = [int(next(values)) if s else 0 for s in states]
        cache = {step: self._decay_value(decay, step) for step in set(steps)}
        return [cache[step] for step in steps]

    def __repr__(self) -> str:
        return super().__repr__()


def _as_decay(decay: Any) -> SignDecay:
    """A group's decay: None, a callable, or an InternalDecay rebuilt from its saved config (a dict)."""
    if isinstance(decay, dict):
        return internal_decay_from_state_dict(decay)
    if decay is not None and not callable(decay):
        raise TypeError("sign_internal_decay must be None, an InternalDecay or a callable step -> float, "
                        f"got {type(decay).__name__}")
    return decay


def _saved_decay(decay: SignDecay) -> Optional[Dict[str, Any]]:
    """A decay as ``state_dict()`` saves it: None, an InternalDecay's config, or a custom callable's repr."""
    if decay is None:
        return None
    if isinstance(decay, InternalDecay):
        return decay.state_dict()
    return {"kind": "custom", "repr": repr(decay)}


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__name__ == "DTensor"

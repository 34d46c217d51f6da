"""The early-warning detector over per-update scalars: rules against each signal's own recent baseline.

Input: one value per update and signal (`stability_toolbox.leading_signals.SIGNALS`: ``grad_norm``,
``attn_logit_max``, ``grad_ratio_min`` ...). A [`SignalRule`][stability_toolbox.signal_detector.SignalRule]
compares, at update ``t``, the signal's recent level

    ``level_t = median(x[t - smooth + 1 .. t])``

with its baseline, the median of the ``baseline`` values before the latest ``lag + 1``,

    ``base_t = median(x[t - lag - baseline .. t - lag - 1])``

and holds at ``t`` when ``level_t >= factor * base_t`` (``direction='rising'``) or
``level_t <= base_t / factor`` (``'falling'``) with ``base_t > 0``, and, with ``level`` set,
``level_t >= level`` (rising) or
``<= level`` (falling). It fires at the first update ``t >= start`` at which it has held for ``persist``
consecutive updates; a non-finite value counts as holding (so an isolated overflow, such as a GradScaler's
skipped step under fp16, does not fire, and a diverged run fires after ``persist`` updates). Each rule fires once.
With ``within`` set (``>= persist``), the hold tolerates gaps: the rule fires at the first update ``t`` at which
it holds and at which it has held on at least ``persist`` of the last ``within`` updates that measured the
signal (``t`` included; updates before ``start`` or without a full baseline count as not holding), so a signal
that departs and flickers back for an update (a noisy collapse) still fires; ``within = persist`` (or any
``within`` with ``persist = 1``) is the consecutive hold.

[`SignalDetector`][stability_toolbox.signal_detector.SignalDetector] runs a set of rules online
(``update(step, scalars)`` returns the warnings of that update, each with its update index) and
[`detect`][stability_toolbox.signal_detector.detect] / [`first_alarm`][stability_toolbox.signal_detector.first_alarm]
replay whole recorded streams. Nothing here imports torch, and the detector is what a guard (skip or
rewind an update) can build on: it needs only the scalars and returns the update index of each warning.

`DEFAULT_SIGNAL_RULES` were calibrated on the calibration seeds of ``benchmarks.foresight`` only
(results/monitor/foresight.md gives their hit, lead and false-alarm rates on the evaluation seeds and on
models they were not calibrated on).

Examples:
    >>> rules = [SignalRule("grad_norm", factor=4.0, baseline=20, lag=5, persist=2, smooth=1, start=10)]
    >>> stream = {"grad_norm": [1.0] * 30 + [1.0 * 2 ** i for i in range(1, 8)]}
    >>> [(w["update"], w["signal"]) for w in detect(stream, rules)]
    [(32, 'grad_norm')]
"""

import math
import numbers
import statistics
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence

from toolbox_core import checks

__all__ = ["SignalRule", "SignalDetector", "DEFAULT_SIGNAL_RULES", "SIGNAL_DIAGNOSES", "detect", "first_alarm"]


@dataclass(frozen=True)
class SignalRule:
    """When one per-update signal departs from its own recent baseline (module docstring for the formula).

    Args:
        signal: the signal's name (a key of the scalars passed to the detector).
        factor: the ratio to the baseline that fires (a finite number > 1).
        direction: ``'rising'`` or ``'falling'``.
        baseline: how many values the baseline median spans (>= 1).
        lag: how many of the latest updates the baseline leaves out (>= 0).
        smooth: how many of the latest values the level median spans (>= 1; 1: the value itself).
        persist: how many updates the condition must hold (>= 1): in a row, or within ``within``.
        level: an absolute bound the level must also pass (None: none).
        start: no warning before this update (>= 0).
        within: hold on ``persist`` of the last ``within`` updates (``persist`` to 64; None: ``persist`` in a
            row; ``within == persist``, or any window with ``persist == 1``, fires as the hold in a row does).

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range (named).
    """

    signal: str
    factor: float
    direction: str = "rising"
    baseline: int = 50
    lag: int = 10
    smooth: int = 3
    persist: int = 3
    level: Optional[float] = None
    start: int = 20
    within: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.signal, str) or not self.signal:
            raise TypeError(f"signal must be a non-empty str, got {self.signal!r}")
        # every field checked, then kept as a plain Python number (a 0-d tensor or NumPy scalar passed in would
        # otherwise make every comparison a tensor and the rule unhashable)
        fields = {
            "factor": checks.as_real("factor", self.factor, low=1.0, low_open=True),
            "direction": checks.as_choice("direction", self.direction, ("rising", "falling")),
            "baseline": checks.as_int("baseline", self.baseline, minimum=1),
            "lag": checks.as_int("lag", self.lag, minimum=0),
            "smooth": checks.as_int("smooth", self.smooth, minimum=1),
            "persist": checks.as_int("persist", self.persist, minimum=1),
            "level": None if self.level is None else checks.as_real("level", self.level),
            "start": checks.as_int("start", self.start, minimum=0),
        }
        if self.within is not None:
            persist = fields["persist"]
            # at most 64: the hold's window is kept as a bit mask of its updates (one int of the detector's state)
            fields["within"] = checks.as_int("within (>= persist, or None)", self.within, minimum=persist, maximum=64)
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def memory(self) -> int:
        """How many past values the rule reads."""
        return max(self.smooth, self.lag + self.baseline)


#: signal -> (likely mechanism, remedy) named in a warning
SIGNAL_DIAGNOSES: Dict[str, tuple] = {
    "grad_ratio_min": ("vanishing gradients in the lower layers (deep Post-LN)",
                       "Admin (admin_torch.convert(model)) or DeepNorm, else a lower learning rate or a longer "
                       "warm-up"),
    "grad_norm": ("a gradient-norm surge (OLMo 2: gradient spikes precede loss spikes)",
                  "a lower learning rate or gradient clipping"),
    "grad_rms_eps": ("the gradient's RMS shrinking towards Adam's epsilon (updates shrink; Wortsman et al. 2023)",
                     "a smaller Adam eps (1e-15) or a larger learning rate"),
    "grad_rms_eps_min": ("a layer's gradient RMS shrinking towards Adam's epsilon (Wortsman et al. 2023)",
                         "a smaller Adam eps (1e-15); if the layer is a lower Post-LN layer: Admin"),
    "update_ratio": ("updates growing against the weights",
                     "a lower learning rate or a longer warm-up"),
    "log_z_rms": ("output-logit divergence (log Z drifts; Wortsman et al. 2023)",
                  "z-loss 1e-4 (stability_toolbox.cross_entropy_with_z_loss), weight decay, a lower learning rate"),
    "log_z_mean": ("output-logit divergence (log Z drifts; Wortsman et al. 2023)",
                   "z-loss 1e-4 (stability_toolbox.cross_entropy_with_z_loss), weight decay, a lower learning rate"),
    "attn_logit_max": ("attention-logit growth (Wortsman et al. 2023)",
                       "qk-layernorm (admin_torch.add_qk_norm(model)), else a lower learning rate"),
    "attn_entropy_min": ("attention-entropy collapse (Zhai et al. 2023)",
                         "qk-layernorm or sigmaReparam, else a lower learning rate"),
    "linear_rms_max": ("linear-layer output norms growing (Rybakov et al. 2024)",
                       "qk-layernorm and a lower learning rate"),
    "linear_rms_gmean": ("every linear layer's output norm growing (Rybakov et al. 2024)",
                         "qk-layernorm and a lower learning rate"),
    "act_kurtosis_max": ("heavy-tailed activations (outlier features)", "a lower learning rate"),
    "adam_v_rms": ("Adam's second moment growing (BLOOM)", "a lower learning rate or gradient clipping"),
    "adam_v_max": ("Adam's second moment growing (BLOOM)", "a lower learning rate or gradient clipping"),
    "loss": ("the loss rising above its recent level", "a lower learning rate; check the data"),
}


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


class SignalDetector:
    """Runs `SignalRule` s online over per-update scalars.

    Args:
        rules: the rules (default `DEFAULT_SIGNAL_RULES`).

    Examples:
        >>> det = SignalDetector([SignalRule("loss", factor=2.0, baseline=3, lag=0, smooth=1, persist=1,
        ...                                  start=0)])
        >>> [det.update(i, {"loss": v}) for i, v in enumerate([1.0, 1.0, 1.0, 3.0])][-1][0]["update"]
        3
    """

    def __init__(self, rules: Optional[Sequence[SignalRule]] = None, *, argument: str = "rules"):
        # argument: the name a refusal gives the rules (the caller's own argument, e.g. the monitor's signal_rules)
        rules = DEFAULT_SIGNAL_RULES if rules is None else rules
        if isinstance(rules, SignalRule) or not isinstance(rules, (list, tuple)):
            raise TypeError(f"{argument} must be a list or tuple of SignalRule, got {type(rules).__name__}")
        for i, r in enumerate(rules):
            if not isinstance(r, SignalRule):
                raise TypeError(f"{argument}[{i}] must be a SignalRule, got {type(r).__name__}")
        seen: Dict[SignalRule, int] = {}
        for i, r in enumerate(rules):  # the same rule twice would issue every warning twice
            # keyed by what the rule fires on: a window of `persist` updates (or any window of a hold of 1) is
            # the hold in a row, so SignalRule(..., persist=5, within=5) repeats SignalRule(..., persist=5)
            key = replace(r, within=None) if r.within is not None and r.persist in (1, r.within) else r
            if key in seen:
                why = ("" if rules[seen[key]] == r else
                       " (a window of persist updates, or with persist=1, is the hold in a row)")
                raise ValueError(f"{argument}[{i}] repeats {argument}[{seen[key]}] ({r}){why}; each rule once")
            seen[key] = i
        self.rules = tuple(rules)
        self._memory = self._memories(self.rules)
        self._past: Dict[str, Deque[float]] = {}
        self._held = [0] * len(self.rules)
        self._fired = [False] * len(self.rules)
        #: every warning issued so far, in order
        self.warnings: List[Dict[str, Any]] = []

    @staticmethod
    def _memories(rules: Sequence[SignalRule]) -> Dict[str, int]:
        """Each signal's values kept: as many as its most demanding rule reads (fixed with the rules)."""
        memory: Dict[str, int] = {}
        for r in rules:
            memory[r.signal] = max(memory.get(r.signal, 0), r.memory)
        return memory

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # a detector pickled before `_memory` was kept (a monitor saved with torch.save) gets it from its rules
        self.__dict__.update(state)
        if "_memory" not in state:
            self._memory = self._memories(self.rules)

    def update(self, step: int, scalars: Mapping[str, float]) -> List[Dict[str, Any]]:
        """Feed update ``step``'s scalars (``{signal: value}``; signals absent or None are skipped: None is
        "not measured at this update", NaN is a measured non-finite value and fires).

        Returns the warnings this update raises: dicts ``update`` (= ``step``), ``signal`` (= ``quantity``;
        ``layer`` is ``'(model)'``), ``value``, ``baseline``, ``ratio``, ``rule``, ``mechanism``, ``remedy``,
        ``message``.
        """
        checks.as_int("step", step, minimum=0)
        if not isinstance(scalars, Mapping):
            raise TypeError(f"scalars must be a mapping {{signal: value}}, got {type(scalars).__name__}")
        memory = self._memory
        for name in memory:  # every value checked before any is kept: a refused call changes nothing
            v = scalars.get(name)
            # a real number (NumPy's too) or None; never a tensor: reading one here would be a host-device sync
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"scalars[{name!r}] must be a real number or None, got {type(v).__name__}")
        out = []
        for name, keep in memory.items():
            if scalars.get(name) is not None:
                self._past.setdefault(name, deque(maxlen=keep + 1)).append(float(scalars[name]))
        for i, r in enumerate(self.rules):
            if self._fired[i] or r.signal not in scalars or scalars[r.signal] is None:
                continue
            w = self._check(i, r, step)
            if w is not None:
                self._fired[i] = True
                out.append(w)
        self.warnings += out
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The running state, for a checkpoint (plain Python values): the rules, each signal's recent values,
        how long each rule has held and whether it fired, the warnings so far. A detector given it by
        `load_state_dict` warns, from the next update on, exactly as the one it was taken from.

        Examples:
            >>> det = SignalDetector([SignalRule("loss", factor=2.0, baseline=3, lag=0, smooth=1, persist=1,
            ...                                  start=0)])
            >>> for i, v in enumerate([1.0, 1.0, 1.0]): _ = det.update(i, {"loss": v})
            >>> resumed = SignalDetector(det.rules); resumed.load_state_dict(det.state_dict())
            >>> resumed.update(3, {"loss": 3.0})[0]["update"]
            3
        """
        # rules as dicts of their fields: the state is plain data, so torch.load(..., weights_only=True) reads it
        return {"rules": [asdict(r) for r in self.rules], "past": {k: list(v) for k, v in self._past.items()},
                "held": list(self._held), "fired": list(self._fired),
                "warnings": [{**w, "rule": asdict(w["rule"])} for w in self.warnings]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict`. ValueError (naming ``state``) for another detector's state (other rules)
        or a malformed one; checked first: a refused call changes nothing."""
        keys = ("rules", "past", "held", "fired", "warnings")
        if not isinstance(state, Mapping) or set(state) != set(keys):
            raise ValueError(f"state must be a SignalDetector.state_dict() (keys {', '.join(keys)})")
        # a state saved before SignalRule had `within` lists its rules without it: the same rules, held in a row
        if not isinstance(state["rules"], (list, tuple)) or not all(isinstance(d, Mapping) for d in state["rules"]) \
                or [{"within": None, **d} for d in state["rules"]] != [asdict(r) for r in self.rules]:
            raise ValueError(f"state: its rules {state['rules']!r} are not this detector's {self.rules}; resume with "
                             "the rules it was saved with (a monitor: signal_rules=[SignalRule(**d) for d in them])")
        n = len(self.rules)
        held, fired, past = state["held"], state["fired"], state["past"]
        if not (isinstance(held, (list, tuple)) and len(held) == n
                and all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in held)
                and isinstance(fired, (list, tuple)) and len(fired) == n and all(isinstance(f, bool) for f in fired)):
            raise ValueError(f"state: 'held' and 'fired' must list one count / flag per rule ({n})")
        for i, (h, r) in enumerate(zip(held, self.rules)):
            # a windowed rule's hold is a bit mask of its last `within` updates: a larger int is no such mask
            if r.within is not None and h >= 1 << r.within:
                raise ValueError(f"state: 'held'[{i}] must be a bit mask of rule {i}'s last {r.within} updates "
                                 f"(an int in [0, 2**{r.within})), got {h}")
        memory = self._memory
        if not isinstance(past, Mapping) or not set(past) <= set(memory) or any(
                not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, numbers.Real)
                                                        for x in v) for v in past.values()):
            raise ValueError(f"state: 'past' must map signals of these rules ({', '.join(memory)}) to numbers")
        warnings = state["warnings"]
        if not isinstance(warnings, (list, tuple)) or not all(
                isinstance(w, Mapping) and isinstance(w.get("rule"), Mapping) for w in warnings):
            raise ValueError("state: 'warnings' must be a list of warnings (dicts, their 'rule' a dict of its fields)")
        try:
            warnings = [{**w, "rule": SignalRule(**w["rule"])} for w in warnings]
        except (TypeError, ValueError) as e:
            raise ValueError(f"state: a warning's rule is not a SignalRule's fields ({e})") from None
        self._past = {k: deque((float(x) for x in v), maxlen=memory[k] + 1) for k, v in past.items()}
        self._held, self._fired = [int(h) for h in held], [bool(f) for f in fired]
        self.warnings = warnings

    def _check(self, i: int, r: SignalRule, step: int) -> Optional[Dict[str, Any]]:
        past = self._past[r.signal]
        v = past[-1]
        if not math.isfinite(v):
            # a non-finite value holds the rule, as a departure does: one isolated overflow (a GradScaler's skipped
            # step under fp16) is not a warning; a run that has diverged stays non-finite and warns after `persist`
            fired = self._hold(i, r, step >= r.start)
            return self._warning(r, step, v, float("nan"), "is non-finite") if fired else None
        xs = list(past)
        if len(xs) < r.lag + r.baseline + 1 or step < r.start:
            self._hold(i, r, False)
            return None
        recent = [x for x in xs[-r.smooth:] if math.isfinite(x)]
        base_vals = [x for x in xs[-(r.lag + r.baseline) - 1: len(xs) - r.lag - 1] if math.isfinite(x)]
        if not recent or not base_vals:
            self._hold(i, r, False)
            return None
        level, base = _median(recent), _median(base_vals)
        if r.direction == "rising":
            ok = base > 0 and level >= r.factor * base  # a ratio needs a positive baseline
            ok = ok and (r.level is None or level >= r.level)
        else:
            ok = base > 0 and level * r.factor <= base
            ok = ok and (r.level is None or level <= r.level)
        if not self._hold(i, r, ok):
            return None
        verb = "rose" if r.direction == "rising" else "fell"
        return self._warning(r, step, level, base, f"{verb} to {level:.4g} from a baseline of {base:.4g}")

    def _hold(self, i: int, r: SignalRule, ok: bool) -> bool:
        """Record whether rule ``i`` holds at this update; True: it fires now. ``_held[i]``: the count of
        consecutive updates held (``within`` None), else a bit mask of the last ``within`` updates (bit 0: this
        one), so the state stays one non-negative int per rule."""
        if r.within is None:
            self._held[i] = self._held[i] + 1 if ok else 0
            return self._held[i] >= r.persist
        self._held[i] = ((self._held[i] << 1) | int(ok)) & ((1 << r.within) - 1)
        return ok and bin(self._held[i]).count("1") >= r.persist

    @staticmethod
    def _warning(r: SignalRule, step: int, level: float, base: float, trend: str) -> Dict[str, Any]:
        mech, remedy = SIGNAL_DIAGNOSES.get(r.signal, ("a signal departing from its baseline", "a lower learning rate"))
        ratio = level / base if base and math.isfinite(base) and base != 0 else float("nan")
        hold = f"{r.persist} updates" if r.within is None else f"{r.persist} of {r.within} updates"
        message = (f"stability warning: update {step}: {r.signal} {trend} (x{ratio:.3g}; rule x{r.factor:g}, "
                   f"{hold}); likely mechanism: {mech}; remedy: {remedy}")
        # step / layer / quantity: the keys of the monitor's other warnings (warning_rules), for one list of both
        return {"update": step, "step": step, "layer": "(model)", "quantity": r.signal, "signal": r.signal,
                "value": level, "baseline": base, "ratio": ratio, "rule": r, "mechanism": mech, "remedy": remedy, "message": message}


def detect(stream: Mapping[str, Sequence[float]], rules: Optional[Sequence[SignalRule]] = None,
           first_update: int = 0) -> List[Dict[str, Any]]:
    """Every warning of a recorded ``stream`` (``{signal: [value per update]}``, the updates numbered from
    ``first_update``) under ``rules``, in order (the same as feeding `SignalDetector.update` one update at a
    time)."""
    if not isinstance(stream, Mapping):
        raise TypeError(f"stream must be a mapping {{signal: [value per update]}}, got {type(stream).__name__}")
    first_update = checks.as_int("first_update", first_update, minimum=0)
    det = SignalDetector(rules)
    names = sorted({r.signal for r in det.rules} & set(stream))
    for k in names:
        if isinstance(stream[k], (str, bytes)) or not isinstance(stream[k], Sequence):
            raise TypeError(f"stream[{k!r}] must be a sequence of values (one per update; None: no value), "
                            f"got {type(stream[k]).__name__}")
    n = max((len(stream[k]) for k in names), default=0)
    for t in range(n):
        det.update(first_update + t, {k: stream[k][t] for k in names if t < len(stream[k])})
    return det.warnings


def first_alarm(stream: Mapping[str, Sequence[float]], rules: Optional[Sequence[SignalRule]] = None
                ) -> Optional[Dict[str, Any]]:
    """The first warning of ``stream`` under ``rules`` (a dict as `SignalDetector.update` gives), or None."""
    ws = detect(stream, rules)
    return ws[0] if ws else None


#: the default rules, set by ``python -m benchmarks.foresight analyze`` on its calibration seed (seed 1) only
#: (`benchmarks.foresight_analysis.calibrate_monitor_defaults`): the smallest layer's gradient RMS (in Adam's
#: epsilon) falling to a quarter of its level over the 20 updates before the last 6, on 5 of the last 8 updates
#: (Wortsman et al. 2023's signal: the gradient shrinking towards epsilon; here it falls when the lower layers
#: of a deep Post-LN stack stop learning and when a high learning rate breaks a qk-normed LM). Held 5 updates,
#: not 3: every run's gradient shrinks for a few updates early in training (the loss leaving log(vocabulary)),
#: which a 3-update rule took for a collapse on 12-layer runs that trained fine; 5 of 8 rather than 5 in a row:
#: a high-learning-rate collapse is noisy, its signal flickering back above the factor for an update (the
#: calibration keeps, among rules held 5 that warn ahead on as many calibration runs, the one with the largest
#: separation between failing and stable runs). The factor is 1.5 x above the largest ratio any stable
#: calibration run reaches. `stability_toolbox.StabilityMonitor` runs them at every update by default (on a host
#: copy of the scalar, no host-device sync). Hit, lead and false-alarm rates on the evaluation seeds and on
#: models it was not calibrated on: results/monitor/foresight.md.
DEFAULT_SIGNAL_RULES: tuple = (
    SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=20, lag=5, smooth=3, persist=5, start=20, within=8),
)

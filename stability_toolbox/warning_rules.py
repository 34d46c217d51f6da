"""The stability monitor's warning rules: pure functions of its logged history.

A *history* is the list of records [`StabilityMonitor`][stability_toolbox.StabilityMonitor] logs (one per logging
step, as in ``monitor.jsonl``): ``{"step": int, "loss": ..., "log_z_rms": ..., "quantities": {quantity:
{row: value}}}``. Model-level quantities (``log_z``, ``log_z_rms``, ``loss``...) are read from the record
itself with the row ``(model)``.

A rule ([`stability_toolbox.WarningRule`][stability_toolbox.WarningRule]: ``threshold``, ``window``, ``min_growth``, ``min_rows``,
``direction``, ``growth_span``) fires on one (row, quantity) at the latest record when its latest value is past the
threshold *and* it moved the same way at each of the last ``window`` logged values, by at least a factor
``min_growth`` per logged step, or per ``growth_span`` updates when set (a rate, not only a level: a low
threshold with a required rate warns early without firing on a value that merely sits low). Non-finite values warn at once; each
(row, quantity) warns once; ``min_rows`` rows must fire together.

Each warning names the layer, the quantity and its trend, then the *likely mechanism* and the
*remedy this toolbox ships* (`DIAGNOSES`), in one line that begins ``stability warning:``:

    stability warning: layer layers.0: grad_ratio fell 0.0207 -> 0.00297 -> 0.000615 over the last 3 logged
    steps (x0.17 per log; <= 0.001) at step 15; likely mechanism: vanishing gradients in the lower layers ...;
    remedy: Admin (admin_torch.convert(model)) ...

`check` gives the warnings of the latest record (the monitor calls it at every logging step);
`replay` re-runs a whole history (e.g. a ``monitor.jsonl`` with other rules) and `first_warning`
returns the first one.

Their arguments are checked before anything is read, by one helper per kind: `as_history` (a sequence of
records; a single record is a TypeError naming ``history``: wrap it in a list), `as_record` (a mapping with an
integer ``step``, ``quantities`` ``{str: {str: real}}``, ``warnings`` a list of str, the model-level values the
rules read real or None; NaN and infinities are values like any other, as floats), `as_rules`
(``{quantity: WarningRule}``, a rule also as a dict of its fields) and ``warned`` (``(row, quantity)`` pairs of
str). A malformed argument is a TypeError or ValueError naming it down to the field
(``history[3]['quantities']['beta']['layers.0']``, ``rules['beta'].window``), never an AttributeError or
KeyError.

`WarningRule` and `DEFAULT_RULES` live here with the rules they parameterise
(``stability_toolbox.WarningRule`` and ``stability_toolbox.monitor.WarningRule`` are the same class).
Nothing here imports torch.

Examples:
    >>> from stability_toolbox import WarningRule
    >>> hist = [{"step": s, "quantities": {"attn_logit_max": {"attn.0": v}}}
    ...         for s, v in ((0, 4.0), (10, 9.0), (20, 20.0), (30, 45.0))]
    >>> w = first_warning(hist, {"attn_logit_max": WarningRule(threshold=15.0, window=3, min_growth=1.5)})
    >>> w["step"], w["layer"], w["mechanism"].split(" (")[0]
    (20, 'attn.0', 'attention-logit growth')
"""

import math
import numbers
from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

# the torch-free argument checks (toolbox_core.validation re-exports the same functions): the rules stay
# importable without torch
from toolbox_core import checks

__all__ = ["WarningRule", "DEFAULT_RULES", "Diagnosis", "DIAGNOSES", "MODEL_ROW", "rows", "check", "replay",
           "first_warning", "format_line", "lookback", "as_record", "as_history", "as_rules"]

#: the row name of model-level quantities
MODEL_ROW = "(model)"


@dataclass(frozen=True)
class WarningRule:
    """When a per-row quantity "trends toward divergence".

    Over the logged values ``v_1 .. v_n`` of one (row, quantity), a warning is issued at step n when

    * ``direction='rising'``: ``v_n >= threshold`` and each of the last ``window`` values is more than
      ``min_growth`` times the one before;
    * ``direction='falling'``: ``v_n <= threshold`` and each of the last ``window`` values is less than
      ``1 / min_growth`` times the one before;
    * and at least ``min_rows`` rows of that quantity meet it at once (one noisy row does not fire).

    ``growth_span`` (None: per logged step) makes ``min_growth`` a rate per ``growth_span`` updates, whatever
    the logging interval: between two logged values ``d`` updates apart (their records' ``step``) the
    required factor is ``min_growth ** (d / growth_span)``. Without it a rule set on records every 10 updates
    asks ten times less growth per update of a monitor logging every 100.

    Non-finite values (NaN/inf in a statistic) warn at once. Each (row, quantity) warns once.
    """

    threshold: float
    window: int = 3
    min_growth: float = 1.0
    min_rows: int = 1
    direction: str = "rising"
    growth_span: Optional[int] = None

    def __post_init__(self):
        # stored as checked (Python float / int): a NumPy scalar or a 0-d tensor given here compares, slices,
        # formats and hashes like the number it holds
        for name, value in (("threshold", checks.as_real("threshold", self.threshold)),
                            ("window", checks.as_int("window", self.window, minimum=1)),
                            ("min_growth", checks.as_real("min_growth", self.min_growth, low=0.0)),
                            ("min_rows", checks.as_int("min_rows", self.min_rows, minimum=1)),
                            ("direction", checks.as_choice("direction", self.direction, ("rising", "falling"))),
                            ("growth_span", None if self.growth_span is None
                             else checks.as_int("growth_span", self.growth_span, minimum=1))):
            object.__setattr__(self, name, value)  # frozen: the dataclass way to set a field in __post_init__


#: the default rules (calibration and false-alarm rates: docs/monitor.md)
DEFAULT_RULES: Dict[str, WarningRule] = {
    # vanishing gradients, what freezes the lower layers of a deep Post-LN stack: in at least 2 layers the
    # gradient fell below 1/100 of the largest layer gradient, falling >= 3x per log over the last 3
    # logged steps (a rate: it warns while the collapse is under way, before the loss stalls)
    "grad_ratio": WarningRule(threshold=1e-2, window=3, min_growth=3.0, min_rows=2, direction="falling"),
    # exploding gradients: a layer's gradient norm grew three logs in a row to >= 100
    "grad_norm": WarningRule(threshold=100.0, window=3, min_growth=1.5),
    # fp16 overflow: the largest activation within a factor 16 of the dtype's largest finite value
    "act_frac": WarningRule(threshold=1.0 / 16, window=2),
    # attention-logit growth: the largest |q.k|/sqrt(d) past 20 and at least doubling per 10 updates over the
    # last 3 logged steps (slow growth to ~50 trains fine; growth that fast ends in a saturated softmax). A rate
    # per 10 updates (growth_span), whatever the interval: per logged step, at the default interval of 100 it
    # asked a doubling per 100 updates and warned on Pre-LN LMs whose logits grew x10 per 100 updates past 500
    # but that trained within 3% of their control (benchmarks.foresight, seed 1 already; results/monitor/foresight.md)
    "attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=2.0, growth_span=10),
    # output-logit divergence: the RMS of the output logits' log Z past 10 and growing >= 1.3x per log
    # (needs monitor.observe_logits(logits))
    "log_z_rms": WarningRule(threshold=10.0, window=3, min_growth=1.3),
}


@dataclass(frozen=True)
class Diagnosis:
    """What a warning on one quantity most likely means, and what the toolbox offers against it."""

    mechanism: str
    remedy: str


#: quantity -> its diagnosis (the text of the warning line after the trend)
DIAGNOSES: Dict[str, Diagnosis] = {
    "grad_ratio": Diagnosis(
        "vanishing gradients in the lower layers (deep Post-LN: the residual branches dominate the "
        "LayerNorm input and amplify the output change, the lower layers stop learning)",
        "Admin (admin_torch.convert(model), make_stack('admin'), fairseq --arch transformer_admin) or "
        "DeepNorm, else a lower learning rate or a longer warm-up"),
    "grad_norm": Diagnosis(
        "exploding gradients",
        "a lower learning rate or gradient clipping (clip 1.0)"),
    "act_frac": Diagnosis(
        "activations approaching the dtype's overflow",
        "bf16 or fp32 for that sublayer, or a lower learning rate"),
    "attn_logit_max": Diagnosis(
        "attention-logit growth (q.k/sqrt(d) grows, the attention softmax saturates to one-hot; "
        "Wortsman et al. 2023)",
        "qk-layernorm (admin_torch.add_qk_norm(model), make_stack(..., qk_norm=True), fairseq --qk-norm), "
        "else a lower learning rate"),
    "log_z_rms": Diagnosis(
        "output-logit divergence (the softmax normaliser log Z of the output logits drifts away from 0; "
        "Wortsman et al. 2023)",
        "z-loss 1e-4 (stability_toolbox.z_loss.cross_entropy_with_z_loss, fairseq --criterion "
        "cross_entropy_zloss --z-loss 1e-4), else a lower learning rate or weight decay"),
    "loss": Diagnosis(
        "divergence (the loss is non-finite)",
        "restart from the last checkpoint with a lower learning rate; the earlier warnings name the mechanism"),
    "loss_spike": Diagnosis(
        "a loss spike (the interval's largest loss far above the recent level)",
        "a lower learning rate or gradient clipping; see the per-layer warnings for the mechanism"),
}

_GENERIC = Diagnosis("a quantity trending toward divergence", "a lower learning rate")


# the keys of a record that are not a quantity (a rule cannot be named after them)
_RECORD_FIELDS = ("step", "quantities", "warnings")
# the model-level values `check` reads besides those the rules name
_LOSS_KEYS = ("loss_max", "loss_spike")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _value(name: str, value: Any) -> None:
    """A logged value: a real number (NaN and infinities included: they are what the rules look for)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (NaN and infinities as floats: read a monitor.jsonl with "
                        f"stability_toolbox.records.read_records), got {_describe(value)}")
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a real number that fits a float, got an integer of "
                         f"{int(value).bit_length()} bits") from None


def as_record(record: Any, name: str = "record", *, model_keys: Iterable[str] = ()) -> Mapping[str, Any]:
    """``record`` checked as one record of a history, and returned as it is.

    A record is a mapping with an integer ``step``; ``quantities`` (optional) ``{quantity (str): {row (str):
    real}}``; ``warnings`` (optional) a list of str; and each key of ``model_keys`` absent, None or a real
    number. Other keys are not read here. Values may be NaN or infinite (as floats).

    Raises:
        TypeError / ValueError: what is wrong, named from ``name`` down to the field
            (``record['quantities']['beta']['layers.0']``).

    Examples:
        >>> as_record({"step": 0, "quantities": {"beta": {"layers.0": float("nan")}}})["step"]
        0
        >>> as_record({"step": 0, "quantities": {"beta": {"layers.0": "NaN"}}})
        Traceback (most recent call last):
        ...
        TypeError: record['quantities']['beta']['layers.0'] must be a real number (NaN and infinities as floats: \
read a monitor.jsonl with stability_toolbox.records.read_records), got 'NaN' (str)
    """
    if not isinstance(record, _Mapping):
        raise TypeError(f"{name} must be a record (a dict {{'step': int, 'quantities': {{quantity: {{row: value}}}}, "
                        f"...}}), got {_describe(record)}")
    if "step" not in record:
        raise ValueError(f"{name} has no 'step': a record is a dict {{'step': int, 'quantities': ...}}, got the "
                         f"keys {sorted(map(str, record))[:8]}")
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name}['step'] must be an integer, got {_describe(step)}")
    if "quantities" in record:
        per_quantity = record["quantities"]
        if not isinstance(per_quantity, _Mapping):
            raise TypeError(f"{name}['quantities'] must be a dict {{quantity: {{row: value}}}}, got "
                            f"{_describe(per_quantity)}")
        for q, per_row in per_quantity.items():
            if not isinstance(q, str):
                raise TypeError(f"{name}['quantities'] must have quantity names (str) as keys, got {_describe(q)}")
            if not isinstance(per_row, _Mapping):
                raise TypeError(f"{name}['quantities'][{q!r}] must be a dict {{row: value}}, got {_describe(per_row)}")
            for row, v in per_row.items():
                if not isinstance(row, str):
                    raise TypeError(f"{name}['quantities'][{q!r}] must have row names (str) as keys, got "
                                    f"{_describe(row)}")
                _value(f"{name}['quantities'][{q!r}][{row!r}]", v)
    if "warnings" in record:
        lines = record["warnings"]
        if isinstance(lines, (str, bytes)) or not isinstance(lines, (list, tuple)) or \
                not all(isinstance(line, str) for line in lines):
            raise TypeError(f"{name}['warnings'] must be a list of str (the warning lines), got {_describe(lines)}")
    for key in model_keys:
        v = record.get(key)
        if v is not None:
            _value(f"{name}[{key!r}]", v)
    return record


def as_history(history: Any, name: str = "history", *, model_keys: Iterable[str] = ()) -> Sequence[Mapping[str, Any]]:
    """``history`` checked as a sequence of records (each by `as_record`) and returned as it is.

    A single record (a mapping) is a TypeError naming ``history``: a history is a list of them, even of one
    (``[record]``); so are a str, a generator and anything else that is not a sequence.

    Examples:
        >>> as_history({"step": 0, "quantities": {}})
        Traceback (most recent call last):
        ...
        TypeError: history must be a sequence of records (a list of dicts, as StabilityMonitor.history and \
read_records give), got a single record (dict): pass [record]
    """
    if isinstance(history, _Mapping):
        raise TypeError(f"{name} must be a sequence of records (a list of dicts, as StabilityMonitor.history and "
                        f"read_records give), got a single record ({type(history).__name__}): pass [record]")
    if isinstance(history, (str, bytes, bytearray)) or not isinstance(history, _Sequence):
        raise TypeError(f"{name} must be a sequence of records (a list of dicts, as StabilityMonitor.history and "
                        f"read_records give), got {_describe(history)}")
    model_keys = tuple(model_keys)
    for i, record in enumerate(history):
        as_record(record, f"{name}[{i}]", model_keys=model_keys)
    return history


_RULE_FIELDS = tuple(f.name for f in fields(WarningRule))


def as_rules(rules: Any, name: str = "rules") -> Dict[str, WarningRule]:
    """``rules`` checked as ``{quantity: WarningRule}``: a new dict, each rule a `WarningRule` (one given as a
    dict of its fields, ``{"threshold": 20.0, "window": 3}``, is made one).

    Raises:
        TypeError / ValueError: not a mapping, a quantity that is not a non-empty str or is a record field
            (``step``, ``quantities``, ``warnings``), a rule of another type, an unknown or missing field, or a
            field's value (named: ``rules['beta'].window must be an integer >= 1, got 0``).

    Examples:
        >>> as_rules({"attn_logit_max": {"threshold": 20.0, "window": 3, "min_growth": 2.0}})["attn_logit_max"].window
        3
        >>> as_rules({"beta": {"threshold": 1.0, "window": 0}})
        Traceback (most recent call last):
        ...
        ValueError: rules['beta'].window must be an integer >= 1, got 0
    """
    if not isinstance(rules, _Mapping):
        raise TypeError(f"{name} must be a dict {{quantity: WarningRule}}, got {_describe(rules)}")
    out: Dict[str, WarningRule] = {}
    for q, rule in rules.items():
        if not isinstance(q, str):
            raise TypeError(f"{name} must have quantity names (str) as keys, got {_describe(q)}")
        if not q or q in _RECORD_FIELDS:
            raise ValueError(f"{name}: {q!r} is not a quantity name (a non-empty str other than "
                             f"{', '.join(_RECORD_FIELDS)})")
        if isinstance(rule, WarningRule):
            out[q] = rule
            continue
        if not isinstance(rule, _Mapping):
            raise TypeError(f"{name}[{q!r}] must be a WarningRule (or a dict of its fields "
                            f"{', '.join(_RULE_FIELDS)}), got {_describe(rule)}")
        unknown = [k for k in rule if k not in _RULE_FIELDS]
        if unknown:
            raise TypeError(f"{name}[{q!r}] has the unknown field {unknown[0]!r}; a WarningRule's fields are "
                            f"{', '.join(_RULE_FIELDS)}")
        if "threshold" not in rule:
            raise TypeError(f"{name}[{q!r}].threshold is required (a finite real number)")
        try:
            out[q] = WarningRule(**rule)
        except (TypeError, ValueError) as e:  # the field's own message, prefixed with where the rule is
            raise type(e)(f"{name}[{q!r}].{e}") from None
    return out


def _as_warned(warned: Any) -> Set[Tuple[str, str]]:
    """``warned`` checked as an iterable of ``(row, quantity)`` pairs of str, as a new set."""
    if isinstance(warned, (str, bytes, _Mapping)) or not isinstance(warned, _Iterable):
        raise TypeError(f"warned must be an iterable of (row, quantity) pairs of str, got {_describe(warned)}")
    out: Set[Tuple[str, str]] = set()
    for pair in warned:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TypeError(f"warned must hold (row, quantity) pairs of str, got {_describe(pair)}")
        out.add((pair[0], pair[1]))
    return out


def lookback(rules: Mapping[str, WarningRule]) -> int:
    """How many of the latest records `check` reads under ``rules``: the longest ``window`` (at least 1).
    ``check(history[-lookback(rules):], ...)`` gives what ``check(history, ...)`` gives.

    Examples:
        >>> lookback(DEFAULT_RULES), lookback({})
        (3, 1)
    """
    return max((rule.window for rule in as_rules(rules).values()), default=1)


def _rows(record: Mapping[str, Any], quantity: str) -> Dict[str, float]:
    per_row = record.get("quantities", {}).get(quantity)
    if per_row:
        return dict(per_row)
    value = record.get(quantity)
    return {MODEL_ROW: value} if isinstance(value, numbers.Real) and not isinstance(value, bool) else {}


def rows(record: Mapping[str, Any], quantity: str) -> Dict[str, float]:
    """``{row: value}`` of ``quantity`` in one record (model-level quantities under `MODEL_ROW`).

    Examples:
        >>> rows({"step": 0, "log_z_rms": 3.0, "quantities": {"beta": {"layers.0": 0.5}}}, "log_z_rms")
        {'(model)': 3.0}
    """
    if not isinstance(quantity, str):
        raise TypeError(f"quantity must be a quantity name (str), got {_describe(quantity)}")
    return _rows(as_record(record, model_keys=(quantity,)), quantity)


def format_line(layer: str, quantity: str, trend: str) -> str:
    """The one-line warning: ``stability warning: layer L: Q <trend>; likely mechanism: M; remedy: R``."""
    d = DIAGNOSES.get(quantity, _GENERIC)
    return f"stability warning: layer {layer}: {quantity} {trend}; likely mechanism: {d.mechanism}; remedy: {d.remedy}"


def _warning(step: int, layer: str, quantity: str, trend: str) -> Dict[str, Any]:
    d = DIAGNOSES.get(quantity, _GENERIC)
    return {"step": step, "layer": layer, "quantity": quantity, "trend": trend, "mechanism": d.mechanism,
            "remedy": d.remedy, "message": format_line(layer, quantity, trend)}


def _growth(rule, updates: int) -> float:
    """The factor ``rule`` asks between two logged values ``updates`` apart (``min_growth`` per log, or per
    ``growth_span`` updates)."""
    if rule.growth_span is None:
        return rule.min_growth
    try:
        return rule.min_growth ** (max(updates, 0) / rule.growth_span)
    except OverflowError:  # a rate asked over very many updates: no finite growth meets it
        return math.inf


def _times(x: float, factor: float) -> float:
    """``x * factor``, 0 for ``x == 0`` whatever the factor: a factor that overflowed to inf (`_growth`) stands for
    a finite one too large for a float, and 0 times it is 0 (``0 * inf`` is NaN, which compares false and would
    decide the rule differently from a factor just below the overflow)."""
    return x * factor if x else x


def _trend(series: Sequence[float], rule, steps: Optional[Sequence[int]] = None) -> Optional[str]:
    """The trend text when ``series`` (the last ``window`` values, latest last; logged at ``steps``) meets
    ``rule``, else None."""
    steps = list(range(len(series))) if steps is None else list(steps)
    pairs = [(a, b, _growth(rule, sb - sa)) for a, b, sa, sb in zip(series, series[1:], steps, steps[1:])]
    v = series[-1]
    if rule.direction == "rising":
        moving = all(b > a and b >= _times(a, g) for a, b, g in pairs)
        reached, verb, cmp = v >= rule.threshold, "rose", ">="
    else:
        moving = all(b < a and _times(b, g) <= a for a, b, g in pairs)
        reached, verb, cmp = v <= rule.threshold, "fell", "<="
    if not (reached and moving):
        return None
    text = f"{verb} " + " -> ".join(f"{x:.3g}" for x in series) + f" over the last {len(series)} logged steps"
    if len(series) > 1 and series[0] > 0 and v > 0:
        rate = (v / series[0]) ** (1.0 / (len(series) - 1))
        return text + f" (x{rate:.3g} per log; {cmp} {rule.threshold:g})"
    return text + f" ({cmp} {rule.threshold:g})"


def _check(history: Sequence[Mapping[str, Any]], end: int, rules: Mapping[str, WarningRule],
           done: Set[Tuple[str, str]]) -> List[Dict[str, Any]]:
    """The warnings of ``history[end - 1]`` (the arguments checked already; reads ``history[:end]`` only)."""
    record = history[end - 1]
    step = record["step"]
    out: List[Dict[str, Any]] = []
    for q, rule in rules.items():
        hits = []
        for row, v in _rows(record, q).items():
            if (row, q) in done:
                continue
            if not math.isfinite(v):
                hits.append((row, f"is non-finite ({v}) at step {step}", True))
                continue
            recent = history[max(0, end - rule.window):end]
            series = [_rows(h, q).get(row) for h in recent]
            if len(series) < rule.window or any(x is None or not math.isfinite(x) for x in series):
                continue
            trend = _trend(series, rule, [h["step"] for h in recent])
            if trend is not None:
                hits.append((row, f"{trend} at step {step}", False))
        if sum(not nonfinite for _, _, nonfinite in hits) < rule.min_rows:
            hits = [h for h in hits if h[2]]
        out += [_warning(step, row, q, trend) for row, trend, _ in hits]
    # the loss: non-finite (once), or a spike over the recent level (each time)
    lmax = record.get("loss_max")
    spike = record.get("loss_spike")
    if lmax is not None and not math.isfinite(lmax):
        if (MODEL_ROW, "loss") not in done:
            out.append(_warning(step, MODEL_ROW, "loss", f"is non-finite ({lmax}) at step {step}"))
    elif spike is not None and spike >= 2.0:
        largest = "the interval's largest loss" + (f" {lmax:.4g}" if lmax is not None else "")
        out.append(_warning(step, MODEL_ROW, "loss_spike",
                            f"{largest} is {spike:.2f}x the recent median at step {step}"))
    return out


def _checked(history: Any, rules: Any) -> Tuple[Sequence[Mapping[str, Any]], Dict[str, WarningRule]]:
    """The arguments of `check`, `replay`, `first_warning` checked: the rules first (they say which model-level
    values of the records are read)."""
    rules = as_rules(rules)
    history = as_history(history, model_keys=tuple(rules) + _LOSS_KEYS)
    return history, rules


def check(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any],
          warned: Iterable[Tuple[str, str]] = ()) -> List[Dict[str, Any]]:
    """The warnings the latest record of ``history`` raises under ``rules`` (``{quantity: WarningRule}``).

    ``warned``: the (row, quantity) pairs that warned before (they do not warn again). Pure: nothing is
    modified; each warning is a dict ``step, layer, quantity, trend, mechanism, remedy, message``. Every record
    of ``history`` is checked (`as_history`; the monitor passes the last `lookback` records).

    Raises:
        TypeError / ValueError: a malformed argument, named down to the field (module docstring).
    """
    history, rules = _checked(history, rules)
    done = _as_warned(warned)
    return _check(history, len(history), rules, done) if len(history) else []


def replay(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Every warning of ``history`` as the monitor would have issued it under ``rules``, in order.

    Raises:
        TypeError / ValueError: a malformed argument, named down to the field (module docstring).
    """
    history, rules = _checked(history, rules)
    warned: Set[Tuple[str, str]] = set()
    out: List[Dict[str, Any]] = []
    for end in range(1, len(history) + 1):
        new = _check(history, end, rules, warned)
        warned.update((w["layer"], w["quantity"]) for w in new)
        out += new
    return out


def first_warning(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The first warning of ``history`` under ``rules`` (a dict as `check` gives), or None.

    Raises:
        TypeError / ValueError: a malformed argument, named down to the field (module docstring).
    """
    history, rules = _checked(history, rules)
    for end in range(1, len(history) + 1):
        new = _check(history, end, rules, set())
        if new:
            return new[0]
    return None

"""The stability monitor's warning rules: pure functions of its logged history.

A *history* is the list of records [`StabilityMonitor`][stability_toolbox.StabilityMonitor] logs (one per logging
step, as in ``monitor.jsonl``): ``{"step": int, "loss": ..., "log_z_rms": ..., "quantities": {quantity:
{row: value}}}``. Model-level quantities (``log_z``, ``log_z_rms``, ``loss``...) are read from the record
itself with the row ``(model)``.

A rule ([`stability_toolbox.WarningRule`][stability_toolbox.WarningRule]: ``threshold``, ``window``, ``min_growth``, ``min_rows``,
``direction``) fires on one (row, quantity) at the latest record when its latest value is past the
threshold *and* it moved the same way at each of the last ``window`` logged values, by at least a factor
``min_growth`` per logged step (a rate, not only a level: a low threshold with a required rate warns
early without firing on a value that merely sits low). Non-finite values warn at once; each
(row, quantity) warns once; ``min_rows`` rows must fire together.

Each warning names the layer, the quantity and its trend, then the *likely mechanism* and the
*remedy this toolbox ships* (`DIAGNOSES`), in one line that begins ``stability warning:``:

    stability warning: layer layers.0: grad_ratio fell 0.0207 -> 0.00297 -> 0.000615 over the last 3 logged
    steps (x0.17 per log; <= 0.001) at step 15; likely mechanism: vanishing gradients in the lower layers ...;
    remedy: Admin (admin_torch.convert(model)) ...

`check` gives the warnings of the latest record (the monitor calls it at every logging step);
`replay` re-runs a whole history (e.g. a ``monitor.jsonl`` with other rules) and `first_warning`
returns the first one. `WarningRule` and `DEFAULT_RULES` live here with the rules they parameterise
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
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

# the torch-free argument checks (toolbox_core.validation re-exports the same functions): the rules stay
# importable without torch
from toolbox_core import checks

__all__ = ["WarningRule", "DEFAULT_RULES", "Diagnosis", "DIAGNOSES", "MODEL_ROW", "rows", "check", "replay",
           "first_warning", "format_line"]

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

    Non-finite values (NaN/inf in a statistic) warn at once. Each (row, quantity) warns once.
    """

    threshold: float
    window: int = 3
    min_growth: float = 1.0
    min_rows: int = 1
    direction: str = "rising"

    def __post_init__(self):
        checks.as_real("threshold", self.threshold)
        checks.as_int("window", self.window, minimum=1)
        checks.as_real("min_growth", self.min_growth, low=0.0)
        checks.as_int("min_rows", self.min_rows, minimum=1)
        checks.as_choice("direction", self.direction, ("rising", "falling"))


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
    # attention-logit growth: the largest |q.k|/sqrt(d) past 20 and at least doubling per log over the last
    # 3 logged steps (slow growth to ~50 trains fine; growth that fast ends in a saturated softmax)
    "attn_logit_max": WarningRule(threshold=20.0, window=3, min_growth=2.0),
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


def rows(record: Mapping[str, Any], quantity: str) -> Dict[str, float]:
    """``{row: value}`` of ``quantity`` in one record (model-level quantities under `MODEL_ROW`)."""
    per_row = record.get("quantities", {}).get(quantity)
    if per_row:
        return dict(per_row)
    value = record.get(quantity)
    return {MODEL_ROW: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def format_line(layer: str, quantity: str, trend: str) -> str:
    """The one-line warning: ``stability warning: layer L: Q <trend>; likely mechanism: M; remedy: R``."""
    d = DIAGNOSES.get(quantity, _GENERIC)
    return f"stability warning: layer {layer}: {quantity} {trend}; likely mechanism: {d.mechanism}; remedy: {d.remedy}"


def _warning(step: int, layer: str, quantity: str, trend: str) -> Dict[str, Any]:
    d = DIAGNOSES.get(quantity, _GENERIC)
    return {"step": step, "layer": layer, "quantity": quantity, "trend": trend, "mechanism": d.mechanism,
            "remedy": d.remedy, "message": format_line(layer, quantity, trend)}


def _trend(series: Sequence[float], rule) -> Optional[str]:
    """The trend text when ``series`` (the last ``window`` values, latest last) meets ``rule``, else None."""
    pairs = list(zip(series, series[1:]))
    v = series[-1]
    if rule.direction == "rising":
        moving = all(b > a and b >= a * rule.min_growth for a, b in pairs)
        reached, verb, cmp = v >= rule.threshold, "rose", ">="
    else:
        moving = all(b < a and b * rule.min_growth <= a for a, b in pairs)
        reached, verb, cmp = v <= rule.threshold, "fell", "<="
    if not (reached and moving):
        return None
    text = f"{verb} " + " -> ".join(f"{x:.3g}" for x in series) + f" over the last {len(series)} logged steps"
    if len(series) > 1 and series[0] > 0 and v > 0:
        rate = (v / series[0]) ** (1.0 / (len(series) - 1))
        return text + f" (x{rate:.3g} per log; {cmp} {rule.threshold:g})"
    return text + f" ({cmp} {rule.threshold:g})"


def check(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any],
          warned: Iterable[Tuple[str, str]] = ()) -> List[Dict[str, Any]]:
    """The warnings the latest record of ``history`` raises under ``rules`` (``{quantity: WarningRule}``).

    ``warned``: the (row, quantity) pairs that warned before (they do not warn again). Pure: nothing is
    modified; each warning is a dict ``step, layer, quantity, trend, mechanism, remedy, message``.
    """
    if not history:
        return []
    record = history[-1]
    step = record.get("step")
    done: Set[Tuple[str, str]] = set(warned)
    out: List[Dict[str, Any]] = []
    for q, rule in rules.items():
        hits = []
        for row, v in rows(record, q).items():
            if (row, q) in done:
                continue
            if not math.isfinite(v):
                hits.append((row, f"is non-finite ({v}) at step {step}", True))
                continue
            series = [rows(h, q).get(row) for h in history[-rule.window:]]
            if len(series) < rule.window or any(x is None or not math.isfinite(x) for x in series):
                continue
            trend = _trend(series, rule)
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
        out.append(_warning(step, MODEL_ROW, "loss_spike",
                            f"the interval's largest loss {lmax:.4g} is {spike:.2f}x the recent median at step {step}"))
    return out


def replay(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Every warning of ``history`` as the monitor would have issued it under ``rules``, in order."""
    warned: Set[Tuple[str, str]] = set()
    out: List[Dict[str, Any]] = []
    for i in range(1, len(history) + 1):
        new = check(history[:i], rules, warned)
        warned.update((w["layer"], w["quantity"]) for w in new)
        out += new
    return out


def first_warning(history: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The first warning of ``history`` under ``rules`` (a dict as `check` gives), or None."""
    warned: Set[Tuple[str, str]] = set()
    for i in range(1, len(history) + 1):
        new = check(history[:i], rules, warned)
        if new:
            return new[0]
    return None

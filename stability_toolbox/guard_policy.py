"""What the stability guard does about each signal: `GuardPolicy`, a documented table a user can override.

A *signal* is what the guard saw; an *action* is what it does about it:

| signal | default action | why |
|---|---|---|
| ``nonfinite`` (NaN/inf loss or gradient norm) | ``skip`` | one poisoned batch: drop its update |
| ``loss_spike`` (loss > ``threshold`` robust sigmas above its running median and > ``min_ratio`` x it: 1.2) | ``skip`` | a bad batch (OLMo-core, metaseq) |
| ``grad_norm_spike`` (global gradient norm, same test; ``min_ratio`` 2.0) | ``skip`` | gradient-norm spikes precede loss spikes (OLMo 2) |
| ``repeated`` (more than ``max_skips`` skips within ``window`` updates) | ``rewind`` | "data x model state" (PaLM): go back, skip ahead |
| ``persistent`` (``max_rewinds`` rewinds within ``rewind_window`` updates) | ``cut_lr`` | spikes that return from the last good state: the learning rate is too high (OPT-175B's remedy) |
| ``warning:grad_ratio`` (the monitor: vanishing lower-layer gradients) | ``stop`` | deep Post-LN stalls; no batch skipping cures it: convert with admin_torch |
| ``warning:act_frac`` (activations near the dtype's overflow) | ``stop`` | change the dtype |
| ``warning:attn_logit_max`` (attention-logit growth) | ``rewind`` | back off the learning rate (then qk-norm, named in the line) |
| ``warning:log_z_rms`` (output-logit divergence) | ``rewind`` | back off (then z-loss) |
| ``warning:grad_norm`` (a layer's gradients exploding) | ``rewind`` | back off |
| ``warning:loss`` (a non-finite interval loss) | ``rewind`` | |
| ``warning:loss_spike`` (the monitor's interval spike) | ``log`` | the detector already acted on the step |

Actions, from mild to severe: ``log`` (one line and a record, nothing changes), ``skip`` (the update is not
applied), ``rewind`` (restore the last good snapshot, skip batches, back the learning rate off for a while),
``cut_lr`` (the rewind, and the learning rate multiplied by ``lr_cut`` for the rest of the run: the schedule's
rate times ``lr_cut ** cuts``; after ``max_lr_cuts`` cuts it becomes ``stop``), ``stop`` (end the run cleanly
with the diagnosis and the remedy). When one step raises several signals the most severe action wins. A signal
the table does not name is logged. Two rows are restricted: ``nonfinite`` cannot be ``log`` (the update would
be applied: NaN parameters) and ``persistent`` must be ``cut_lr`` or ``stop`` (anything else would rewind
without end; ``cut_lr`` is bounded by ``max_lr_cuts``); a row overridden otherwise is a ValueError naming it.

Examples:
    >>> policy = GuardPolicy(actions={"loss_spike": "rewind"})   # override one row, keep the others
    >>> policy.action("loss_spike"), policy.action("nonfinite"), policy.action("warning:grad_ratio")
    ('rewind', 'skip', 'stop')
    >>> policy.action("something new")
    'log'
    >>> GuardPolicy().action("persistent"), GuardPolicy(max_lr_cuts=0).max_lr_cuts   # 0: persistent stops at once
    ('cut_lr', 0)
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping

from toolbox_core import checks

__all__ = ["GuardPolicy", "DEFAULT_ACTIONS", "ACTIONS", "SIGNALS", "severest"]

#: the actions, from mild to severe
ACTIONS = ("log", "skip", "rewind", "cut_lr", "stop")

#: the signals the guard raises itself (the monitor's warnings come as ``warning:<quantity>``)
SIGNALS = ("nonfinite", "loss_spike", "grad_norm_spike", "repeated", "persistent")

#: the default table (the module docstring says why each row is what it is)
DEFAULT_ACTIONS: Dict[str, str] = {
    "nonfinite": "skip",
    "loss_spike": "skip",
    "grad_norm_spike": "skip",
    "repeated": "rewind",
    "persistent": "cut_lr",
    "warning:grad_ratio": "stop",
    "warning:act_frac": "stop",
    "warning:attn_logit_max": "rewind",
    "warning:log_z_rms": "rewind",
    "warning:grad_norm": "rewind",
    "warning:loss": "rewind",
    "warning:loss_spike": "log",
}


#: rows whose action is restricted: logging a non-finite update would apply it (NaN parameters for good); a
#: ``persistent`` that neither cuts the learning rate (bounded by ``max_lr_cuts``) nor stops would rewind without
#: end (the escalation exists to end that loop)
_ALLOWED = {"nonfinite": ("skip", "rewind", "cut_lr", "stop"), "persistent": ("cut_lr", "stop")}
_WHY = {"nonfinite": "'log' would apply a non-finite update and leave NaN parameters",
        "persistent": "anything else would rewind without end"}


def severest(actions: Iterable[str]) -> str:
    """The most severe of ``actions`` (``'log'`` for none)."""
    return max(actions, key=ACTIONS.index, default="log")


@dataclass(frozen=True)
class GuardPolicy:
    """The guard's decision table and its escalation limits.

    Args:
        actions: ``{signal: action}`` rows replacing the defaults' (`DEFAULT_ACTIONS`; the rows not named keep
            their default). Signals are `SIGNALS` or ``warning:<quantity>``; actions are `ACTIONS`.
        max_skips: more than this many skips within ``window`` updates raise ``repeated`` (an integer >= 0).
        window: the span of ``max_skips``, in updates (an integer >= 1).
        max_rewinds: this many rewinds within ``rewind_window`` updates raise ``persistent`` (an integer >= 1).
        rewind_window: the span of ``max_rewinds``, in updates (an integer >= 1).
        lr_cut: the ``cut_lr`` action multiplies the learning rate by this factor for the rest of the run (a real
            in (0, 1); it multiplies whatever the scheduler sets, and the cuts compound: ``lr_cut ** cuts``).
        max_lr_cuts: after this many cuts a further ``cut_lr`` stops the run (an integer >= 0; 0: ``persistent``
            stops at once, the behavior without learning-rate cuts).

    Raises:
        TypeError / ValueError: a bad argument, named with the accepted values.
    """

    actions: Mapping[str, str] = field(default_factory=dict)
    max_skips: int = 3
    window: int = 50
    max_rewinds: int = 3
    rewind_window: int = 1000
    lr_cut: float = 0.5
    max_lr_cuts: int = 3

    def __post_init__(self):
        if not isinstance(self.actions, Mapping):
            raise TypeError(f"actions must be a mapping {{signal: action}}, got {type(self.actions).__name__}")
        table = dict(DEFAULT_ACTIONS)
        for signal, action in self.actions.items():
            if not isinstance(signal, str) or not (signal in SIGNALS or
                                                   (signal.startswith("warning:") and len(signal) > 8)):
                raise ValueError(f"actions: unknown signal {signal!r}; accepted: {', '.join(SIGNALS)} or "
                                 "'warning:<quantity>'")
            checks.as_choice(f"actions[{signal!r}]", action, ACTIONS)
            if signal in _ALLOWED and action not in _ALLOWED[signal]:
                raise ValueError(f"actions[{signal!r}] must be one of {', '.join(_ALLOWED[signal])}, got {action!r} "
                                 f"({_WHY[signal]})")
            table[signal] = action
        object.__setattr__(self, "actions", table)
        checks.as_int("max_skips", self.max_skips, minimum=0)
        checks.as_int("window", self.window, minimum=1)
        checks.as_int("max_rewinds", self.max_rewinds, minimum=1)
        checks.as_int("rewind_window", self.rewind_window, minimum=1)
        object.__setattr__(self, "lr_cut", checks.as_real("lr_cut", self.lr_cut, low=0.0, high=1.0, low_open=True,
                                                          high_open=True))
        object.__setattr__(self, "max_lr_cuts", checks.as_int("max_lr_cuts", self.max_lr_cuts, minimum=0))

    def action(self, signal: str) -> str:
        """The action for ``signal`` (``'log'`` for a signal the table does not name)."""
        return self.actions.get(signal, "log")

    def skips_on_device(self, signal: str) -> bool:
        """Whether a step that raises ``signal`` is not applied (every action but ``log``)."""
        return self.action(signal) != "log"

"""``--optimizer addsign`` and ``--optimizer powersign``: fairseq adapters of [`sign_optim`][sign_optim].

Flags (both optimizers):

    --sign-beta 0.9                 moving-average coefficient, in [0, 1)
    --sign-alpha A                  AddSign's constant (default 1) / PowerSign's base (default e)
    --weight-decay 0.0              decoupled weight decay
    --sign-decay {none,linear,cosine,restart}
    --sign-decay-periods N          cosine default 0.5, restart default 1
    --sign-decay-zero-after Z       cosine / restart: the decay is 0 after Z periods
    --sign-decay-steps T            decay horizon in updates (default: --max-update)

The learning rate is fairseq's ``--lr`` (set on the param groups by fairseq's lr schedulers).
Works with ``--fp16`` / ``--bf16`` (flattened fp32 master parameters) and their memory-efficient
variants (the update then runs in the parameters' dtype). On checkpoint resume the optimizer
state (moving averages, step counters) and the decay saved in the checkpoint are restored, so
the decay continues where it stopped; the decay of the checkpoint wins over the flags (a
different one on the command line is reported in the log).
"""

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import OPTIMIZER_REGISTRY, FairseqOptimizer, register_optimizer
from omegaconf import II

from sign_optim import AddSign, PowerSign, make_internal_decay

from toolbox_core import validation

from ..flags import FlagError, check_flag, flag_check
from ..registry import register_once

logger = logging.getLogger(__name__)

SIGN_DECAY_CHOICES = ChoiceEnum(["none", "linear", "cosine", "restart"])


@dataclass
class _SignConfig(FairseqDataclass):
    sign_beta: float = field(default=0.9, metadata={"help": "moving-average coefficient, in [0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    sign_decay: SIGN_DECAY_CHOICES = field(  # type: ignore[valid-type]
        default="none", metadata={"help": "internal decay of the sign term"}
    )
    sign_decay_periods: Optional[float] = field(
        default=None, metadata={"help": "number of periods of the cosine (0.5) / restart (1) decay"}
    )
    sign_decay_zero_after: Optional[float] = field(
        default=None, metadata={"help": "cosine / restart decay: 0 after this many periods"}
    )
    sign_decay_steps: Optional[int] = field(
        default=None, metadata={"help": "decay horizon in updates (default: --max-update)"}
    )
    lr: List[float] = II("optimization.lr")
    max_update: int = II("optimization.max_update")


@dataclass
class FairseqAddSignConfig(_SignConfig):
    sign_alpha: float = field(default=1.0, metadata={"help": "AddSign: the constant alpha of alpha + d sign(g) sign(m)"})


@dataclass
class FairseqPowerSignConfig(_SignConfig):
    sign_alpha: float = field(default=math.e, metadata={"help": "PowerSign: the base (> 0)"})


@flag_check
def check_sign_flags(args) -> None:
    """The flags of ``--optimizer addsign|powersign`` (FlagError naming the flag and the accepted values)."""
    optimizer = getattr(args, "optimizer", None)
    if optimizer not in ("addsign", "powersign"):
        return
    check_flag("--sign-beta", validation.as_real, args.sign_beta, low=0.0, high=1.0, high_open=True)
    if optimizer == "powersign":
        check_flag("--sign-alpha", validation.as_real, args.sign_alpha, low=0.0, low_open=True)
    else:
        check_flag("--sign-alpha", validation.as_real, args.sign_alpha)
    check_flag("--weight-decay", validation.as_real, args.weight_decay, low=0.0)
    for lr in (args.lr if isinstance(args.lr, Collection) else [args.lr]):
        check_flag("--lr", validation.as_real, lr, low=0.0)
    decay = str(args.sign_decay)
    if decay in ("none", "linear"):
        for flag, value in (("--sign-decay-periods", args.sign_decay_periods),
                            ("--sign-decay-zero-after", args.sign_decay_zero_after)):
            if value is not None:
                raise FlagError(f"{flag} is accepted only with --sign-decay cosine or restart "
                                f"(got --sign-decay {decay})")
    if decay == "none":
        if args.sign_decay_steps is not None:
            raise FlagError("--sign-decay-steps is accepted only with --sign-decay linear, cosine or restart "
                            "(got --sign-decay none)")
        return
    if args.sign_decay_periods is not None:
        check_flag("--sign-decay-periods", validation.as_real, args.sign_decay_periods, low=0.0, low_open=True)
    if args.sign_decay_zero_after is not None:
        check_flag("--sign-decay-zero-after", validation.as_real, args.sign_decay_zero_after, low=0.0)
    if args.sign_decay_steps is not None:
        check_flag("--sign-decay-steps", validation.as_int, args.sign_decay_steps, minimum=1)
    elif not args.max_update or args.max_update < 1:
        raise FlagError(f"--sign-decay {decay} needs a horizon: --sign-decay-steps T (an integer >= 1) "
                        "or --max-update")


class _FairseqSignOptimizer(FairseqOptimizer):
    optimizer_class = AddSign

    def __init__(self, cfg: _SignConfig, params) -> None:
        super().__init__(cfg)
        self._optimizer = self.optimizer_class(params, sign_internal_decay=self._build_decay(), **self.optimizer_config)

    def _build_decay(self):
        kind = str(self.cfg.sign_decay)
        if kind == "none":
            return None
        steps = self.cfg.sign_decay_steps or self.cfg.max_update
        if not steps or steps < 1:
            raise ValueError(
                f"--sign-decay {kind} needs a horizon: set --sign-decay-steps or --max-update (got {steps})"
            )
        return make_internal_decay(kind, steps, self.cfg.sign_decay_periods, self.cfg.sign_decay_zero_after)

    @property
    def optimizer_config(self):
        """Keyword arguments of the optimizer; fairseq also uses them as overrides on checkpoint load."""
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        return {
            "lr": lr,
            "beta": self.cfg.sign_beta,
            "alpha": self.cfg.sign_alpha,
            "weight_decay": self.cfg.weight_decay,
        }

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        wanted = self.optimizer.sign_internal_decay
        super().load_state_dict(state_dict, optimizer_overrides)
        restored = self.optimizer.sign_internal_decay
        if restored != wanted:
            logger.warning(
                "the checkpoint's sign decay %r is kept (the command line asked for %r)", restored, wanted
            )

    @property
    def supports_flat_params(self):
        return True

    @property
    def supports_memory_efficient_fp16(self):
        return True


@register_once(OPTIMIZER_REGISTRY, register_optimizer, "addsign", dataclass=FairseqAddSignConfig)
class FairseqAddSign(_FairseqSignOptimizer):
    """AddSign ([`sign_optim.AddSign`][sign_optim.AddSign]) for fairseq: ``--optimizer addsign``."""

    optimizer_class = AddSign


@register_once(OPTIMIZER_REGISTRY, register_optimizer, "powersign", dataclass=FairseqPowerSignConfig)
class FairseqPowerSign(_FairseqSignOptimizer):
    """PowerSign ([`sign_optim.PowerSign`][sign_optim.PowerSign]) for fairseq: ``--optimizer powersign``."""

    optimizer_class = PowerSign

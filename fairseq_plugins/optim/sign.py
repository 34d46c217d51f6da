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

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import OPTIMIZER_REGISTRY, FairseqOptimizer, register_optimizer
from omegaconf import II

from sign_optim import AddSign, PowerSign, make_internal_decay

from ..flags import FlagError, flag_check, library_check
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


#: the libraries' argument -> the flag that sets it: each bound is written once, in sign_optim (the optimizer's
#: constructor, make_internal_decay); the plugin only maps the flags onto it
LIBRARY_FLAGS = {"lr": "--lr", "beta": "--sign-beta", "alpha": "--sign-alpha", "weight_decay": "--weight-decay",
                 "T_max": "--sign-decay-steps", "num_periods": "--sign-decay-periods",
                 "zero_after": "--sign-decay-zero-after"}


def internal_decay(cfg):
    """The internal decay of the flags (None for ``--sign-decay none``), built by
    [`sign_optim.make_internal_decay`][sign_optim.make_internal_decay]; its refusal is a `FlagError` naming the flag.
    The horizon is ``--sign-decay-steps``, else ``--max-update``."""
    kind = str(cfg.sign_decay)
    if kind == "none":
        return None
    steps = cfg.sign_decay_steps
    if steps is None:
        steps = cfg.max_update
        if not steps or steps < 1:  # fairseq's --max-update 0: no limit, so no horizon
            raise FlagError(f"--sign-decay {kind} needs a horizon: --sign-decay-steps T (an integer >= 1) "
                            "or --max-update")
    return library_check(LIBRARY_FLAGS, make_internal_decay, kind, steps, cfg.sign_decay_periods,
                         cfg.sign_decay_zero_after)


@flag_check
def check_sign_flags(args) -> None:
    """The flags of ``--optimizer addsign|powersign`` (FlagError naming the flag and the accepted values): which
    ``--sign-decay`` takes which flag is the plugin's; every bound is the library's, checked by building the
    decay and the optimizer (on a one-element probe) as the run will."""
    optimizer = getattr(args, "optimizer", None)
    if optimizer not in ("addsign", "powersign"):
        return
    decay = str(args.sign_decay)
    if decay in ("none", "linear"):
        for flag, value in (("--sign-decay-periods", args.sign_decay_periods),
                            ("--sign-decay-zero-after", args.sign_decay_zero_after)):
            if value is not None:
                raise FlagError(f"{flag} is accepted only with --sign-decay cosine or restart "
                                f"(got --sign-decay {decay})")
    if decay == "none" and args.sign_decay_steps is not None:
        raise FlagError("--sign-decay-steps is accepted only with --sign-decay linear, cosine or restart "
                        "(got --sign-decay none)")
    sign_decay = internal_decay(args)
    rule = OPTIMIZER_REGISTRY[optimizer].optimizer_class
    for lr in (args.lr if isinstance(args.lr, Collection) else [args.lr]):
        library_check(LIBRARY_FLAGS, rule, [torch.zeros(1)], lr=lr, beta=args.sign_beta, alpha=args.sign_alpha,
                      weight_decay=args.weight_decay, sign_internal_decay=sign_decay)


class _FairseqSignOptimizer(FairseqOptimizer):
    optimizer_class = AddSign

    def __init__(self, cfg: _SignConfig, params) -> None:
        super().__init__(cfg)
        self._optimizer = self.optimizer_class(params, sign_internal_decay=internal_decay(self.cfg),
                                               **self.optimizer_config)

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

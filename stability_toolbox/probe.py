"""The probe batch of ``output_change``: one fixed input, replayed on every logging step.

``output_change`` compares each sublayer's residual sum on the same input across logging steps, so the
monitor keeps one call of the model: the ``probe=`` inputs, else the inputs of the first logged forward pass
(a [`Probe`][stability_toolbox.probe.Probe] captures them through a forward pre-hook). On each logging step,
after the training pass, [`Probe.run`][stability_toolbox.probe.Probe.run] calls the model on it in eval
mode, with the random state forked and the [`Recorder`][stability_toolbox.quantities.Recorder] in its probe
phase, so the hooks keep the probe rows and training is not disturbed. When the model moved
(``model.to(torch.bfloat16)``, ``model.cuda()``) the probe follows it.
"""

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from .quantities import Recorder

__all__ = ["Probe", "as_call"]

#: a probe as ``model(*args, **kwargs)`` takes it
Call = Tuple[tuple, dict]


def as_call(probe: Any) -> Call:
    """``probe`` (a tensor, a tuple/list of positional arguments or a dict of keyword arguments) as
    ``(args, kwargs)``.

    Raises:
        TypeError: ``probe`` is none of those.
    """
    if not isinstance(probe, (Tensor, tuple, list, dict)):
        raise TypeError(f"probe must be a tensor, a tuple of positional arguments or a dict of keyword "
                        f"arguments, got {type(probe).__name__}")
    if isinstance(probe, Tensor):
        return (probe,), {}
    if isinstance(probe, dict):
        return (), dict(probe)
    return tuple(probe), {}


@contextlib.contextmanager
def _python_path(off: bool) -> Iterator[None]:
    """With ``off``, torch.nn's fused transformer fast path is disabled inside (and restored after)."""
    if not off:
        yield
        return
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _dtype_device(model: nn.Module) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.dtype, p.device) if p is not None else (None, None)


class Probe:
    """The probe inputs of one monitor.

    Args:
        model: the monitored model.
        recorder: the monitor's recorder (its probe phase is on while the probe runs).
        call: the given probe as [`as_call`][stability_toolbox.probe.as_call] returns it; None: captured from
            the first logged forward pass.
    """

    def __init__(self, model: nn.Module, recorder: Recorder, call: Optional[Call] = None):
        self.model = model
        self.recorder = recorder
        self.call = call
        self.given = call is not None
        self.step: Optional[int] = None  # the step whose inputs the probe was taken from (None: given)
        self._model_at = _dtype_device(model) if call is not None else None  # the model's dtype, device then

    def capture(self, args: tuple, kwargs: dict, step: int) -> None:
        """Keep ``model(*args, **kwargs)``'s inputs (detached copies) as the probe, taken at ``step``."""
        if self.recorder.foreign:
            return

        def keep(v):
            return v.detach().clone() if isinstance(v, Tensor) else v
        self.call = (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()})
        self.step = step
        self._model_at = _dtype_device(self.model)

    def forget_step(self, step: int, failed: bool) -> None:
        """The step ``step`` ends: a probe captured in it is dropped if the step ``failed`` (the next logged step
        takes a fresh one), and is no longer that step's either way."""
        if failed and self.step is not None and self.step == step:
            self.call = None
        if self.step == step:
            self.step = None

    def run(self) -> bool:
        """Call the model on the probe (eval mode, random state forked); False if there is no probe yet.

        Raises:
            ValueError: the model refused the probe (what to give instead is named).
        """
        if self.call is None:
            return False
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        # torch.nn's encoder layers take a fused fast path in eval mode without autograd, which skips the
        # hooks of their LayerNorms: it is switched off for the pass (torch.backends.mha), which runs without
        # autograd (no graph is built for outputs that are discarded; the same kernels, the same values)
        fast_path = any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules())
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        args, kwargs = self.call = self._follow_model(*self.call)
        with self.recorder.probing():
            try:
                model.eval()
                with torch.random.fork_rng(devices=devices), torch.no_grad(), _python_path(fast_path):
                    model(*args, **kwargs)
            except Exception as err:
                given = "the probe= inputs" if self.given else "the probe (the first logged step's inputs)"
                raise ValueError(f"probe: the model refused {given} ({type(err).__name__}: {err}); give probe= "
                                 "inputs the model accepts: a tensor, a tuple of positional arguments or a dict of "
                                 "keyword arguments of model") from err
            finally:
                for m, mode in modes:
                    m.training = mode
        return True

    def _follow_model(self, args: tuple, kwargs: dict) -> Call:
        """The probe moved to the model's floating dtype and device when the model moved since the probe was
        stored (``model.to(torch.bfloat16)``, ``model.cuda()``): floating inputs of the model's old dtype take
        the new one, every tensor the new device."""
        now = _dtype_device(self.model)
        was = self._model_at or now
        self._model_at = now
        if was == now or now[0] is None:
            return args, kwargs

        def move(v):
            if not isinstance(v, Tensor):
                return v
            dtype = now[0] if v.is_floating_point() and v.dtype == was[0] else v.dtype
            return v.to(device=now[1], dtype=dtype)
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

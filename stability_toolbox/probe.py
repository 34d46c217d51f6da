"""The probe batch of ``output_change``: one fixed input, replayed on every logging step.

``output_change`` compares each sublayer's residual sum on the same input across logging steps, so the
monitor keeps one call of the model: the ``probe=`` inputs, else the inputs of the first logged forward pass
(a [`Probe`][stability_toolbox.probe.Probe] captures them through a forward pre-hook). On each logging step,
after the training pass, [`Probe.run`][stability_toolbox.probe.Probe.run] calls the model on it in eval
mode, with the random state forked and the [`Recorder`][stability_toolbox.quantities.Recorder] in its probe
phase, so the hooks keep the probe rows and training is not disturbed: what the model's modules hold besides
their parameters (buffers, tensor attributes, lists / tuples / dicts of tensors: an LM's carried hidden state, a
cache, a running statistic updated in eval mode) is put back after every pass. When the model moved
(``model.to(torch.bfloat16)``, ``model.cuda()``) the probe follows it.

Only the first ``probe_rows`` rows of each residual sum are kept, and a training batch often holds many more (a
batch of 8 sequences of 64 tokens holds 512 rows; an LM's batch, thousands). So on its first run a probe is also
tried cut to its leading samples (every top-level tensor input whose first dimension is the batch's, cut to the
fewest samples that still give every sublayer its rows): when the cut pass keeps the same rows at every sublayer (to
float tolerance), the cut probe replaces the full one, and the later logging steps pay for the smaller pass. A model
whose samples interact, a time-first layout whose attention looks ahead, inputs the cut does not fit, a model that
keeps batch-sized state between calls (an RNN's carried hidden state: its next training step would get the cut
batch's), a compiled model (``torch.compile``: another batch size is another graph), or any model in a run of
several processes (every rank must run as many probe passes as the others: a sharded model gathers its weights in
each) keep the full probe. One check sees one set of weights, and samples may come to interact only later (a
zero-initialised branch that mixes them, still zero on a first step that a warmup from a learning rate of 0 left
unchanged; routing with a capacity that overflows once the router has learnt a preference). So the cut is checked
again, on the full probe, on the probe's runs 1, 2, 4, 8, ... (a few more full passes: log2 of the number of logging
steps); the first check that fails restores the full probe for good. The values of every checked run are the full
probe's; between two checks, those of a model whose samples came to interact since the last one are the cut probe's.
"""

import contextlib
import math
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .module_state import restore_state, save_state, state_shapes
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
        self.full: Optional[Call] = None  # the full probe while ``call`` is the cut one (its checks run it)
        self.call = call
        self.given = call is not None
        self.step: Optional[int] = None  # the step whose inputs the probe was taken from (None: given)
        self._model_at = _dtype_device(model) if call is not None else None  # the model's dtype, device then
        #: whether ``call`` is the probe cut to its leading samples (None: not tried yet on this probe)
        self.cut: Optional[bool] = None
        self.runs = 0  # the runs of this probe so far (the cut is checked on runs 0, 1, 2, 4, 8, ...)

    @property
    def call(self) -> Optional[Call]:
        """The probe's call as the next run makes it (the cut one where ``cut``); None: no probe yet."""
        return self._call

    @call.setter
    def call(self, value: Optional[Call]) -> None:
        self._call = value
        if value is None:  # no probe: nothing of the last one is kept (its full batch neither)
            self.full, self.cut, self.runs = None, None, 0

    def capture(self, args: tuple, kwargs: dict, step: int) -> None:
        """Keep ``model(*args, **kwargs)``'s inputs (detached copies) as the probe, taken at ``step``."""
        if self.recorder.foreign or self.recorder.phase == "probe":  # a probe pass (this monitor's or another's)
            return

        def keep(v):
            return v.detach().clone() if isinstance(v, Tensor) else v
        self.call = (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()})
        self.step = step
        self.full, self.cut, self.runs = None, None, 0
        self._model_at = _dtype_device(self.model)

    def forget_step(self, step: int, failed: bool) -> None:
        """The step ``step`` ends: a probe captured in it is dropped if the step ``failed`` (the next logged step
        takes a fresh one), and is no longer that step's either way."""
        if failed and self.step is not None and self.step == step:
            self.call = None
        if self.step == step:
            self.step = None

    def run(self) -> bool:
        """Call the model on the probe (eval mode, random state forked); False if there is no probe yet. On a
        probe's first run it is also tried cut to its leading samples, and a cut probe is checked again on its runs
        1, 2, 4, 8, ... (see the module's docstring); the rows kept on those runs are the full probe's.

        Raises:
            ValueError: the model refused the probe (what to give instead is named).
        """
        if self.call is None:
            return False
        self.call, self.full = self._follow_model(self.call, self.full)
        # check runs: the first, and a cut probe's runs numbered by a power of two
        check = self.cut is None or (self.cut and self.runs & (self.runs - 1) == 0)
        args, kwargs = self.full if check and self.full is not None else self.call
        self.runs += 1
        try:
            self._pass(args, kwargs)
        except Exception as err:
            given = "the probe= inputs" if self.given else "the probe (the first logged step's inputs)"
            raise ValueError(f"probe: the model refused {given} ({type(err).__name__}: {err}); give probe= "
                             "inputs the model accepts: a tensor, a tuple of positional arguments or a dict of "
                             "keyword arguments of model") from err
        if check:
            self.cut = self._try_cut(args, kwargs)
        return True

    def _pass(self, args: tuple, kwargs: dict, compare: bool = False) -> bool:
        """One probe pass: ``model(*args, **kwargs)`` in eval mode, without autograd, random state forked, the
        recorder in its probe phase; the training flags and what the modules hold (`stability_toolbox.module_state`)
        put back whatever happens. With ``compare``, returns whether the tensors the modules held after the pass had the
        shapes they had before it (an RNN's carried state of another batch size: False); else True."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        # a model that keeps state between calls (an LM's carried hidden state, a cache, a running statistic
        # updated in eval mode too) starts its next training step with what it held before the probe pass
        state, shapes = save_state(model), state_shapes(model) if compare else None
        # torch.nn's encoder layers take a fused fast path in eval mode without autograd, which skips the
        # hooks of their LayerNorms: it is switched off for the pass (torch.backends.mha), which runs without
        # autograd (no graph is built for outputs that are discarded; the same kernels, the same values)
        fast_path = any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules())
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        with self.recorder.probing():
            try:
                model.eval()
                with torch.random.fork_rng(devices=devices), torch.no_grad(), _python_path(fast_path):
                    model(*args, **kwargs)
                return not compare or state_shapes(model) == shapes
            finally:
                restore_state(state)
                for m, mode in modes:
                    m.training = mode

    def _try_cut(self, args: tuple, kwargs: dict) -> bool:
        """After a full pass on ``(args, kwargs)``: try the probe cut to the fewest leading samples that give every
        site its rows; it becomes ``call`` (the full one ``full``) when every site keeps the same rows, else the
        full one is ``call``. The full pass's rows stay recorded."""
        full = list(self.recorder.probed)
        kept = [(site, site.probe) for site, _ in full]
        batch = _batch_size(args, kwargs)
        n = _samples_needed(batch, [rows for _, rows in full], self.recorder.probe_rows)
        self.call, self.full = (args, kwargs), None
        if n is None or _compiled(self.model) or _several_processes():
            return False
        cut_args = tuple(_cut(a, n, batch) for a in args)
        cut_kwargs = {k: _cut(v, n, batch) for k, v in kwargs.items()}
        same = False
        try:
            # a model that keeps batch-sized state (an RNN's carried hidden state, a memory, a per-batch-size
            # buffer) reads the training batch's in its probe pass: such a model keeps its full probe
            kept_shapes = self._pass(cut_args, cut_kwargs, compare=True)
            same = kept_shapes and [site for site, _ in self.recorder.probed] == [site for site, _ in full] and all(
                _close(site.probe, rows, site.dtype) for site, rows in kept)
        except Exception:  # inputs the cut does not fit (a batch dimension elsewhere): the full probe stays
            pass
        finally:
            for site, _ in self.recorder.probed:  # a sublayer only the cut pass reached has no rows of the full one
                site.probe = None
            for site, rows in kept:  # this step's rows are the full pass's
                site.probe = rows
        if same:
            self.call, self.full = (cut_args, cut_kwargs), (args, kwargs)
        return same

    def _follow_model(self, *calls: Optional[Call]) -> Tuple[Optional[Call], ...]:
        """The probe's ``calls`` (the cut one and the full one; None stays None) moved to the model's floating
        dtype and device when the model moved since the probe was stored (``model.to(torch.bfloat16)``,
        ``model.cuda()``): floating inputs of the model's old dtype take the new one, every tensor the new
        device."""
        now = _dtype_device(self.model)
        was = self._model_at or now
        self._model_at = now
        if was == now or now[0] is None:
            return calls

        def move(v):
            if not isinstance(v, Tensor):
                return v
            dtype = now[0] if v.is_floating_point() and v.dtype == was[0] else v.dtype
            return v.to(device=now[1], dtype=dtype)
        return tuple(None if c is None else (tuple(move(a) for a in c[0]), {k: move(v) for k, v in c[1].items()})
                     for c in calls)


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules runs compiled (``torch.compile(module)``, ``module.compile()``): a
    probe of another batch size would be one more graph compiled, and the batch dimension of every later graph of
    the training step's code made dynamic (torch.compile's automatic dynamic shapes), so such a model keeps its
    full probe."""
    return any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _several_processes() -> bool:
    """Whether this process is one of several in a ``torch.distributed`` run. There the probe is not cut: a
    sharded model (FSDP) gathers its weights in every forward pass, and a DDP wrapper broadcasts its buffers, so
    every rank must run as many probe passes as the others, while the cut's passes and checks depend on each
    rank's own batch (another rank's sequences of another length, or samples that interact there only)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """The first dimension of the call's first tensor of at least one dimension (None: there is none)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v.shape[0]
    return None


def _samples_needed(batch: Optional[int], rows: List[int], probe_rows: int) -> Optional[int]:
    """The fewest leading samples of a ``batch`` whose sites had ``rows`` rows each that still give every site
    ``min(probe_rows, rows)`` rows; None when there is nothing to cut (no site, a site whose rows are no
    multiple of the batch, or every sample needed)."""
    if not batch or not rows or any(r == 0 or r % batch for r in rows):
        return None
    n = max(math.ceil(min(probe_rows, r) / (r // batch)) for r in rows)
    return n if n < batch else None


def _cut(v: Any, n: int, batch: int) -> Any:
    """``v[:n]`` for a tensor whose first dimension is the batch's; anything else as it is."""
    return v[:n] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch else v


def _close(now: Optional[Tensor], full: Optional[Tensor], dtype: Optional[torch.dtype]) -> bool:
    """Whether the cut pass's rows ``now`` are the full pass's ``full``: the same shape, and equal to within a
    few units in the last place of the activations' ``dtype`` (float32 when unknown; matrix products of another
    batch size may round differently), relative to each entry or to the rows' largest, non-finite entries alike."""
    if now is None or full is None or now.shape != full.shape:
        return now is None and full is None
    if not full.numel():
        return True
    eps = torch.finfo(dtype if dtype is not None and dtype.is_floating_point else torch.float32).eps
    tol = max(1e-4, 4 * eps)
    scale = full.abs().nan_to_num(posinf=0.0).amax()
    near = torch.isclose(now, full, rtol=tol, atol=0.0, equal_nan=True) | ((now - full).abs() <= tol * 1e-2 * scale)
    return bool(near.all())

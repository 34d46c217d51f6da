"""The guard's snapshots: a small ring of known-good training states, in host memory or on disk (`SnapshotRing`).

A snapshot holds everything a rewind restores: the model's and the optimizer's state (tensors copied to the
CPU), the scheduler's and the gradient scaler's, the random number generators (torch CPU and CUDA, Python's
``random``, NumPy's global one), the data position and whatever ``extra`` state the caller adds. On disk each
snapshot is one file written through `toolbox_core.files.atomic_write` (a temporary name renamed over the
target): a crash while writing leaves the previous snapshots intact, and the oldest file is removed only after
the new one is complete. Restoring never modifies a stored snapshot (everything loaded is a copy), so a crash
in the middle of a rewind leaves the last good snapshot as it was.

Examples:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> ring = SnapshotRing(size=2)
    >>> ring.save(capture(model, None, update=0, position=0))
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> snap = ring.latest()
    >>> restore(snap, model, None)
    >>> torch.equal(model.weight, snap["model"]["weight"])
    True
"""

import copy
import os
import random
import re
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Union

import torch

from toolbox_core import validation
from toolbox_core.files import atomic_write

__all__ = ["SnapshotRing", "capture", "restore", "check_snapshot", "rng_state", "set_rng_state"]


def _to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor cloned to the CPU (DTensors: their local shard)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if type(t).__name__ == "DTensor":
            t = t.to_local()
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items()) if type(obj) is not dict else \
            {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state() -> Dict[str, Any]:
    """The random generators' states: torch CPU (and every CUDA device once CUDA is initialized), ``random``,
    and NumPy's global generator when NumPy is imported."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    import sys
    if "numpy" in sys.modules:
        state["numpy"] = sys.modules["numpy"].random.get_state()
    return state


def _check_rng_state(state: Any, name: str = "state") -> None:
    """TypeError/ValueError naming ``name`` unless ``state`` has the form `rng_state` gives (checked before any
    generator is set, so a refused state changes none of them)."""
    if not isinstance(state, dict) or not {"torch", "python"} <= set(state):
        raise TypeError(f"{name} must be the dict rng_state() gives (keys 'torch', 'python', optionally 'cuda' and "
                        f"'numpy'), got {type(state).__name__ if not isinstance(state, dict) else sorted(map(str, state))}")
    t = state["torch"]
    want = torch.get_rng_state()
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.device.type != "cpu" or t.shape != want.shape:
        raise TypeError(f"{name}['torch'] must be what torch.get_rng_state() gives (a CPU uint8 tensor of shape "
                        f"{tuple(want.shape)}), got " + (f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
                                                          if isinstance(t, torch.Tensor) else type(t).__name__))
    py = state["python"]
    if not (isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], tuple)):
        raise TypeError(f"{name}['python'] must be what random.getstate() gives (a 3-tuple), got {type(py).__name__}")
    try:
        random.Random().setstate(py)  # random's own check of the words, on a scratch generator (not the global one)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{name}['python'] is not a state random.getstate() gives: {err}") from None
    cuda = state.get("cuda")
    if "cuda" in state and not (isinstance(cuda, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in cuda)):
        raise TypeError(f"{name}['cuda'] must be a list of tensors (torch.cuda.get_rng_state_all()), got "
                        f"{type(cuda).__name__}")


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` gave (TypeError/ValueError naming ``state`` for another value: nothing is set)."""
    _check_rng_state(state)
    torch.set_rng_state(state["torch"].clone())
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"]])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(copy.deepcopy(state["numpy"]))


def capture(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *, update: int,
            position: Optional[int], scheduler: Any = None, scaler: Any = None,
            extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A snapshot of the training state after ``update`` optimizer steps, ``position`` the next data index (None:
    not known). TypeError/ValueError naming an argument that is not what it says."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"{name} must be None or an object with state_dict() and load_state_dict(), got "
                            f"{type(obj).__name__}")
    update = validation.as_int("update", update, minimum=0)
    if position is not None:
        position = validation.as_int("position", position, minimum=0)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be None or a dict, got {type(extra).__name__}")
    return {
        "update": update,
        "position": position,
        "model": _to_cpu(model.state_dict()),
        "optimizer": None if optimizer is None else _to_cpu(optimizer.state_dict()),
        "scheduler": None if scheduler is None else _to_cpu(scheduler.state_dict()),
        "scaler": None if scaler is None else _to_cpu(scaler.state_dict()),
        "rng": _to_cpu(rng_state()),
        "extra": _to_cpu(extra or {}),
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _fits(live: Any, saved: Any) -> bool:
    """Whether ``saved`` (a snapshot's CPU copy) can be copied into ``live`` in place, tensor by tensor."""
    if isinstance(live, torch.Tensor):
        return isinstance(saved, torch.Tensor) and _local(live).shape == saved.shape
    if isinstance(live, dict):
        return isinstance(saved, dict) and set(live) == set(saved) and all(_fits(live[k], saved[k]) for k in live)
    return not isinstance(saved, torch.Tensor)


@torch.no_grad()
def _copy_into(live: Dict[Any, Any], saved: Dict[Any, Any]) -> None:
    for k, v in live.items():
        if isinstance(v, torch.Tensor):
            _local(v).copy_(saved[k])
        elif isinstance(v, dict):
            _copy_into(v, saved[k])
        else:
            live[k] = copy.deepcopy(saved[k])


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """Copy the saved state into the optimizer's own tensors (their identity, device and sharding kept: what a
    compiled step or an FSDP2 shard needs), else fall back to ``load_state_dict`` (a plain state that changed
    shape, e.g. a parameter that got its state after the snapshot)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(params) or len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("snapshot: the optimizer's parameter groups changed since the snapshot was taken")
    by_id = dict(zip(ids, params))
    live = {i: optimizer.state[p] for i, p in by_id.items() if p in optimizer.state and optimizer.state[p]}
    if set(live) == set(saved["state"]) and all(_fits(live[i], saved["state"][i]) for i in live):
        for i in live:
            _copy_into(live[i], saved["state"][i])
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            for k, v in saved_group.items():
                if k != "params":
                    group[k] = copy.deepcopy(v)
        return
    optimizer.load_state_dict(copy.deepcopy(saved))  # copies: load_state_dict keeps CPU tensors as they are


_SNAPSHOT_KEYS = ("update", "position", "model", "optimizer", "scheduler", "scaler", "rng", "extra")


def check_snapshot(snapshot: Any, name: str = "snapshot") -> None:
    """TypeError/ValueError naming ``name`` (and the entry) unless ``snapshot`` has the form `capture` gives: what
    `restore` checks before it changes anything. Reads no tensor data."""
    if not isinstance(snapshot, dict) or set(snapshot) != set(_SNAPSHOT_KEYS):
        raise TypeError(f"{name} must be the dict capture() gives (keys {', '.join(_SNAPSHOT_KEYS)}), got "
                        + (f"keys {sorted(map(str, snapshot))}" if isinstance(snapshot, dict)
                           else type(snapshot).__name__))
    validation.as_int(f"{name}['update']", snapshot["update"], minimum=0)
    if snapshot["position"] is not None:
        validation.as_int(f"{name}['position']", snapshot["position"], minimum=0)
    for key in ("model", "extra"):
        if not isinstance(snapshot[key], dict):
            raise TypeError(f"{name}['{key}'] must be a dict, got {type(snapshot[key]).__name__}")
    for key in ("optimizer", "scheduler", "scaler"):
        if snapshot[key] is not None and not isinstance(snapshot[key], dict):
            raise TypeError(f"{name}['{key}'] must be None or a state dict, got {type(snapshot[key]).__name__}")
    opt = snapshot["optimizer"]
    if opt is not None and not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
                                and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                        for g in opt["param_groups"])):
        raise ValueError(f"{name}['optimizer'] must be an optimizer's state_dict() (a 'state' dict and "
                         "'param_groups', a list of dicts with 'params')")
    _check_rng_state(snapshot["rng"], f"{name}['rng']")


def restore(snapshot: Dict[str, Any], model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
            scheduler: Any = None, scaler: Any = None) -> None:
    """Load ``snapshot`` into the objects given, tensor by tensor into their own storage where the layout is
    unchanged (DTensors: their local shards), from copies otherwise; the snapshot itself is never modified.

    Checked first (TypeError/ValueError naming the argument, nothing changed): the snapshot's form
    (`check_snapshot`), the objects' types, and that the model's parameter and buffer names are the snapshot's."""
    check_snapshot(snapshot)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"{name} must be None or an object with load_state_dict(), got {type(obj).__name__}")
    if optimizer is not None and not isinstance(getattr(optimizer, "param_groups", None), list):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with param_groups), got {type(optimizer).__name__}")
    live = model.state_dict()
    if set(live) != set(snapshot["model"]):
        missing, unexpected = sorted(set(live) - set(snapshot["model"])), sorted(set(snapshot["model"]) - set(live))
        raise ValueError(f"snapshot['model'] is not this model's state: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    if _fits(dict(live), snapshot["model"]):
        _copy_into(dict(live), snapshot["model"])
    else:
        model.load_state_dict(copy.deepcopy(snapshot["model"]))
    if optimizer is not None and snapshot["optimizer"] is not None:
        _restore_optimizer(optimizer, snapshot["optimizer"])
    if scheduler is not None and snapshot["scheduler"] is not None:
        scheduler.load_state_dict(copy.deepcopy(snapshot["scheduler"]))
    if scaler is not None and snapshot["scaler"] is not None:
        scaler.load_state_dict(copy.deepcopy(snapshot["scaler"]))
    set_rng_state(copy.deepcopy(snapshot["rng"]))


class SnapshotRing:
    """The last ``size`` snapshots, in host memory (``directory=None``) or as files in ``directory``.

    Files are named ``guard-snapshot-<update>.pt`` (with a ``prefix``, e.g. ``rank1-``, under several
    processes) and loaded with ``torch.load(..., weights_only=False)``: they hold Python and NumPy generator
    states, and are this run's own files.

    Args:
        size: how many snapshots are kept (an integer >= 1).
        directory: where the files go (created); None keeps them in memory.
        prefix: the file names' prefix.

    Raises:
        TypeError / ValueError: a bad argument, named.
    """

    def __init__(self, size: int = 2, directory: Optional[Union[str, "os.PathLike[str]"]] = None,
                 prefix: str = ""):
        self.size = validation.as_int("size", size, minimum=1)
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path (str or os.PathLike) or None, got {type(directory).__name__}")
        if directory is not None and not os.fspath(directory):
            raise ValueError("directory must be a non-empty path or None (snapshots in memory)")
        if not isinstance(prefix, str) or not re.fullmatch(r"[\w.-]*", prefix):
            raise ValueError(f"prefix must be a string of letters, digits, '_', '.', '-', got {prefix!r}")
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None and self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"directory {self.directory} exists and is not a directory")
        self.prefix = prefix
        self._memory: Deque[Dict[str, Any]] = deque()
        self._files: Deque[Path] = deque()

    def __len__(self) -> int:
        return len(self._files) if self.directory is not None else len(self._memory)

    def save(self, snapshot: Dict[str, Any]) -> None:
        """Add ``snapshot`` (the oldest one beyond ``size`` is dropped after it is stored): a dict whose
        ``"update"`` is an integer >= 0 (what the ring reads; `restore` checks the rest), else TypeError/ValueError."""
        if not isinstance(snapshot, dict) or "update" not in snapshot:
            raise TypeError(f"snapshot must be a dict with an 'update' (what capture() gives), got "
                            f"{type(snapshot).__name__ if not isinstance(snapshot, dict) else 'a dict without it'}")
        update = validation.as_int("snapshot['update']", snapshot["update"], minimum=0)
        if type(snapshot["update"]) is not int:  # a NumPy or tensor integer: the ring keeps (and compares) an int
            snapshot = {**snapshot, "update": update}
        if self.directory is None:
            self._memory.append(snapshot)
            while len(self._memory) > self.size:
                self._memory.popleft()
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}guard-snapshot-{snapshot['update']}.pt"
        with atomic_write(path, "wb") as f:
            torch.save(snapshot, f)
        if path in self._files:
            self._files.remove(path)
        self._files.append(path)
        while len(self._files) > self.size:
            old = self._files.popleft()
            old.unlink(missing_ok=True)

    def latest(self) -> Optional[Dict[str, Any]]:
        """The newest snapshot, or None. On disk, a file that vanished (its directory deleted or cleaned) is
        forgotten and the next newer one read: None when none is left (the guard then skips instead of rewinding)."""
        if self.directory is None:
            return self._memory[-1] if self._memory else None
        while self._files:
            try:
                return torch.load(self._files[-1], weights_only=False)
            except FileNotFoundError:
                self._files.pop()
        return None

    def updates(self) -> List[int]:
        """The updates the stored snapshots were taken at, oldest first."""
        if self.directory is None:
            return [s["update"] for s in self._memory]
        return [int(p.stem.rsplit("-", 1)[1]) for p in self._files]

    def drop_after(self, update: int) -> None:
        """Forget the snapshots taken after ``update`` (a rewind went back before them)."""
        update = validation.as_int("update", update)
        if self.directory is None:
            self._memory = deque(s for s in self._memory if s["update"] <= update)
            return
        keep = deque()
        for p in self._files:
            if int(p.stem.rsplit("-", 1)[1]) <= update:
                keep.append(p)
            else:
                p.unlink(missing_ok=True)
        self._files = keep

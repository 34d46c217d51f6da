"""The public packages this toolbox is compared with, loaded under names that do not clash.

``make install`` puts admin-torch 0.1.0 and reinmax 0.1.0 under ``<venv>/peers`` (not importable
by name: their import names are this project's). :func:`load_peer` loads one of their
implementation files under an alias, for the benchmarks' peer columns (and the compatibility tests).

Example::

    >>> admin_0_1_0 = load_peer("admin_torch")   # None where make install did not put it under <venv>/peers
    >>> admin_0_1_0 is None or round(admin_0_1_0.calculate_init(12, "O(logn)"), 3) == 2.017
    True
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["PEERS", "peers_dir", "load_peer"]

# import name -> (file inside the installed package, alias it is loaded under)
PEERS = {
    "admin_torch": ("admin_torch/admin.py", "admin_torch_0_1_0"),
    "reinmax": ("reinmax/reinmax.py", "reinmax_0_1_0"),
}


def peers_dir() -> Path:
    return Path(sys.prefix) / "peers"


def load_peer(name: str) -> Optional[ModuleType]:
    """The public package ``name`` (0.1.0) as a module, or None when it is not installed."""
    if name not in PEERS:
        raise ValueError(f"name must be one of {sorted(PEERS)}, got {name!r}")
    rel, alias = PEERS[name]
    if alias in sys.modules:
        return sys.modules[alias]
    path = peers_dir() / rel
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module

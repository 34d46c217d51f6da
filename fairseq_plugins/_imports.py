"""Import every module of a plugin sub-package, as fairseq's ``import_models`` does for a user dir."""

import importlib
import os


def import_all(package: str, directory: str) -> None:
    """Import ``package.<name>`` for each ``<name>.py`` in ``directory`` (skipping ``_private.py``)."""
    for file in sorted(os.listdir(directory)):
        if file.endswith(".py") and not file.startswith("_"):
            importlib.import_module(f"{package}.{file[:-3]}")

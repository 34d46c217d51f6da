"""The directory of an installed package that a repair tool patches (``tools/patch_*.py`` run on what pip
installed): the tool's one argument, else where the package is installed for this Python, found without importing
it. Shared by `patch_fairscale_amp` and `patch_fairseq_imports`."""

import importlib.util
import sys
from pathlib import Path
from typing import List, Optional, Sequence


def package_dir(tool: str, package: str, argv: Sequence[str], files: Sequence[str]) -> Optional[Path]:
    """The package directory holding every one of ``files`` (relative paths); None after printing one line
    (usage, not installed, not that package) to stderr, for the tool to exit 2."""
    if len(argv) > 1:
        print(f"usage: python tools/{tool}.py [{package.upper()}_DIR]", file=sys.stderr)
        return None
    if argv:
        root = Path(argv[0])
    else:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            print(f"{tool}: error: {package} is not installed for this Python", file=sys.stderr)
            return None
        root = Path(list(spec.submodule_search_locations)[0])
    missing: List[str] = [name for name in files if not (root / name).is_file()]
    if missing:
        print(f"{tool}: error: {root} is not a {package} package (no {missing[0]})", file=sys.stderr)
        return None
    return root

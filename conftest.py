"""pytest at the repository root: the libraries' docstring examples run as doctests (pytest.ini's
``--doctest-modules`` over the packages), next to the tests under tests/."""

import importlib.util

# the Triton kernel imports triton at module level: it is collected (and its examples run) where triton is
collect_ignore = [] if importlib.util.find_spec("triton") else ["sign_optim/triton_kernel.py"]
# aliases of modules that moved to the ground package toolbox_core (they replace themselves in sys.modules, so
# their examples run where the modules now live)
collect_ignore += [f"stability_toolbox/{name}.py" for name in ("checks", "files", "validation", "listops")]
collect_ignore += ["toolbox_core/listops.py"]  # the ListOps data code moved up, to listops_data

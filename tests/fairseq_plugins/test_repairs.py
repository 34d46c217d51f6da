"""The repairs of fairseq / torch behaviour: one module each, installed from the one list ``fairseq_plugins.REPAIRS``.

Importing any module of the package (a repair module included) changes nothing in fairseq or torch; each
repair's ``install()`` does, once (a second call changes nothing); ``import fairseq_plugins`` installs the list.
"""

import ast
import json
import pkgutil
import re
import subprocess
import sys

import pytest

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, tool_env

# What the repairs may change, read without importing fairseq_plugins: a name -> a comparable value (the objects
# themselves, by identity; the warnings filters and torch's allowlist as text). fairseq is imported first, so that
# its own import-time changes are not counted.
PATCH_POINTS = r'''
def patch_points():
    import sys, warnings
    import torch
    from fairseq import checkpoint_utils, models, options, trainer
    from fairseq.data import data_utils
    from fairseq.dataclass import utils as dataclass_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model

    return {
        "warnings.filters": repr(warnings.filters),
        "sys.excepthook": id(sys.excepthook),
        "torch safe globals": repr(sorted(map(repr, torch.serialization.get_safe_globals()))),
        "load_checkpoint_to_cpu": id(checkpoint_utils.load_checkpoint_to_cpu),
        "_broadcast_object_slow": id(distributed_utils._broadcast_object_slow),
        "infer_init_method": id(distributed_utils.infer_init_method),
        "batch_by_size": id(data_utils.batch_by_size),
        "DistributedDataParallel": id(distributed_fairseq_model.DistributedDataParallel),
        "register_model_architecture": id(models.register_model_architecture),
        "arch functions": {name: id(fn) for name, fn in models.ARCH_CONFIG_REGISTRY.items()},
        "add_checkpoint_args": id(options.add_checkpoint_args),
        "parse_args_and_arch": id(options.parse_args_and_arch),
        "convert_namespace_to_omegaconf": id(dataclass_utils.convert_namespace_to_omegaconf),
        "Trainer.train_step": id(trainer.Trainer.train_step),
        "Trainer.clip_grad_norm": id(trainer.Trainer.clip_grad_norm),
    }
'''


def changed(before: dict, after: dict) -> list:
    """The patch points that differ; an architecture registered in between is a registration, not a change."""
    out = [k for k in before if k != "arch functions" and before[k] != after[k]]
    if any(after["arch functions"].get(name) != fn for name, fn in before["arch functions"].items()):
        out.append("arch functions")
    return out


def repair_modules():
    from fairseq_plugins import repairs

    return sorted(m.name for m in pkgutil.iter_modules(repairs.__path__) if not m.name.startswith("_"))


def test_the_list_names_every_repair_module_once_warnings_filter_first():
    import fairseq_plugins

    names = [r.__name__.rsplit(".", 1)[-1] for r in fairseq_plugins.REPAIRS]
    assert sorted(names) == repair_modules() and len(set(names)) == len(names)
    assert names[0] == "fairscale_warnings"  # before anything imports fairseq (and so fairscale)
    for repair in fairseq_plugins.REPAIRS:
        doc = repair.__doc__ or ""
        # what is wrong, in which version, and the idempotent install
        assert re.search(r"\d+\.\d+", doc) and "`install`" in doc, repair.__name__
        assert callable(repair.install) and "idempotent" in repair.install.__doc__, repair.__name__


def test_every_install_is_idempotent():
    import fairseq_plugins

    namespace = {}
    exec(PATCH_POINTS, namespace)
    for repair in fairseq_plugins.REPAIRS:  # again: pytest restores the warnings filters around each test
        repair.install()
    before = namespace["patch_points"]()
    for repair in fairseq_plugins.REPAIRS:
        repair.install()
    assert changed(before, namespace["patch_points"]()) == []


def test_installs_happen_only_in_the_list():
    """No module calls an ``install()`` but the package's loop and the old ``safe_checkpoint.install`` alias."""
    calls = []
    for path in sorted(PLUGINS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "install":
                calls.append(str(path.relative_to(PLUGINS_DIR)))
    assert sorted(set(calls)) == ["__init__.py", "safe_checkpoint.py"], calls


def test_old_module_paths_still_work():
    import fairseq_plugins  # noqa: F401
    from fairseq_plugins import batching, distributed, safe_checkpoint
    from fairseq_plugins.models import transformer_admin
    from fairseq_plugins.repairs import cpu_ddp, last_batch

    assert batching.install is last_batch.install
    assert distributed.CpuAwareDistributedDataParallel is cpu_ddp.CpuAwareDistributedDataParallel
    safe_checkpoint.install()
    assert safe_checkpoint.safe_globals() and issubclass(safe_checkpoint.UnsafeCheckpointError, Exception)
    for name in transformer_admin.__all__ + ["apply_qk_norm", "check_transformer_admin_flags"]:
        assert hasattr(transformer_admin, name), name


@pytest.mark.slow
def test_importing_any_module_patches_nothing_until_its_install():
    """Every module of the package imported without the package's ``__init__`` (a bare package object stands in
    for it): nothing in fairseq or torch changes. Then each repair, in the list's order: its ``install()``
    changes something, and a second call changes nothing."""
    order = repair_modules_in_list_order()
    code = PATCH_POINTS + f"""
import importlib, json, pkgutil, sys, types
plugins = types.ModuleType("fairseq_plugins")
plugins.__path__ = [{str(PLUGINS_DIR)!r}]
sys.modules["fairseq_plugins"] = plugins  # its __init__ (the one place that installs) does not run
# the libraries' own import-time registrations (sign_optim allowlists its decays with torch) are not the plugins'
import admin_torch, reinmax, sign_optim, stability_toolbox.monitor, toolbox_core

start = patch_points()
imported = [m.name for m in pkgutil.walk_packages(plugins.__path__, "fairseq_plugins.")]
for name in imported:
    importlib.import_module(name)
after_import = patch_points()
installs = []
for name in {order!r}:
    repair = importlib.import_module("fairseq_plugins.repairs." + name)
    before = patch_points()
    repair.install()
    once = patch_points()
    repair.install()
    installs.append([name, before, once, patch_points()])
print("RESULT" + json.dumps({{"imported": imported, "start": start, "after_import": after_import,
                             "installs": installs}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=tool_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stdout[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert {"fairseq_plugins.repairs.last_batch", "fairseq_plugins.models.transformer_admin",
            "fairseq_plugins.monitor", "fairseq_plugins.fold_checkpoint"} <= set(result["imported"])
    assert changed(result["start"], result["after_import"]) == []
    assert [name for name, *_ in result["installs"]] == order
    for name, before, once, twice in result["installs"]:
        assert changed(before, once), f"{name}.install() changed nothing"
        assert changed(once, twice) == [], f"{name}.install() is not idempotent"


def repair_modules_in_list_order():
    import fairseq_plugins

    return [r.__name__.rsplit(".", 1)[-1] for r in fairseq_plugins.REPAIRS]


def test_every_replacing_repair_goes_through_wrap_once():
    """A repair that replaces a fairseq attribute does it through ``_wrap.wrap_once`` (marked per repair, so two
    repairs can wrap one function, each once), never by assigning the attribute itself."""
    from fairseq_plugins import REPAIRS

    for repair in REPAIRS:
        tree = ast.parse(open(repair.__file__).read())
        install = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "install")
        assigned = [ast.unparse(t) for n in ast.walk(install) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Attribute)]
        assert not assigned, f"{repair.__name__}.install() assigns {assigned}: use wrap_once"


def test_the_monitor_and_the_guard_register_into_one_train_step_repair():
    from fairseq.trainer import Trainer

    import fairseq_plugins
    from fairseq_plugins.repairs import _wrap, train_step, training_flags

    assert _wrap.wrapped_by(Trainer.train_step) == {"fairseq_plugins.repairs.train_step._wrap_train_step"}
    assert train_step._WRAPPERS == {"stability_monitor": fairseq_plugins.monitor.monitored_step,
                                    "stability_guard": fairseq_plugins.guard.guarded_step}
    assert list(training_flags._ADDERS.values()) == [fairseq_plugins.monitor.add_monitor_args,
                                                     fairseq_plugins.guard.add_guard_args]
    before = Trainer.train_step
    train_step.install()
    train_step.register_step_wrapper("stability_guard", lambda *a: None)  # a second registration: a no-op
    assert Trainer.train_step is before and train_step._WRAPPERS["stability_guard"] is fairseq_plugins.guard.guarded_step


def test_the_wrappers_run_first_registered_outermost(monkeypatch):
    from fairseq_plugins.repairs import train_step

    calls = []

    def named(name):
        def wrapper(trainer, step, samples, raise_oom=False):
            calls.append(name)
            return step(samples + [name], raise_oom)
        return wrapper

    monkeypatch.setattr(train_step, "_WRAPPERS", {"outer": named("outer"), "inner": named("inner")})
    wrapped = train_step._wrap_train_step(lambda self, samples, raise_oom=False: (self, samples, raise_oom))
    assert wrapped("trainer", [], True) == ("trainer", ["outer", "inner"], True) and calls == ["outer", "inner"]


def test_repairs_import_no_feature_module():
    """A repair knows fairseq and torch: of the plugins it imports only the other repairs and the flag plumbing
    (fairseq_plugins.flags); the features register into it."""
    allowed = {"fairseq_plugins.flags", "fairseq_plugins.repairs"}
    bad = []
    for path in sorted((PLUGINS_DIR / "repairs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    continue  # a sibling repair
                base = "fairseq_plugins" if node.level == 2 else (node.module or "")
                names = [f"{base}.{node.module}" if node.level == 2 and node.module else base]
                if node.level == 2 and not node.module:
                    names = [f"fairseq_plugins.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names
                    if n.startswith("fairseq_plugins") and not any(n == a or n.startswith(a + ".") for a in allowed)]
    assert not bad, bad


def test_no_setting_travels_through_the_environment():
    """No module of the plugins writes the environment (the features' flags travel on fairseq's configuration,
    repairs.training_flags); reading a launcher's variables (WORLD_SIZE, RANK ...) is allowed."""
    writes = []
    for path in sorted(PLUGINS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete, ast.Call)) else ""
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)) and "environ[" in text.split("=")[0]:
                writes.append(f"{path.name}: {text}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr in ("pop", "update", "setdefault", "clear", "popitem")
                    and "environ" in ast.unparse(node.func.value) or node.func.attr in ("putenv", "unsetenv")):
                writes.append(f"{path.name}: {text}")
    assert not writes, writes

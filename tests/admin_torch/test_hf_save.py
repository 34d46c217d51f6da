"""The save path of converted HuggingFace models: atomic as a whole (a save killed at any file boundary leaves
the old checkpoint or the new one), stale files of the other weight layout gone, a file in place of the
directory refused intact, a damaged Admin-form config named; a read-only checkpoint, the working directory and
a second concurrent save refused with the old checkpoint untouched. Tiny random ALBERT / BERT, nothing
downloaded."""

import builtins
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import admin_torch
from admin_torch import convert, hf_io

from benchmarks import hf_families as H
from toolbox_core import files as toolbox_files

transformers = pytest.importorskip("transformers")


@torch.no_grad()
def _admin_form_model(seed=1):
    """An ALBERT with its layer shared across depth and trained per-feature omegas: no stock model computes its
    function, so save_pretrained writes its Admin form."""
    model, x, _ = H.build("albert_shared")
    convert(model, as_parameter=True)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, admin_torch.OmegaResidual):
            m.omega.mul_(1 + 0.1 * torch.rand(m.omega.shape, generator=gen))
    return model, x


@torch.no_grad()
def _folded_model(seed=2):
    """An ALBERT without sharing (it folds), its omegas "trained"."""
    model, x, _ = H.build("albert")
    convert(model, as_parameter=True)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, admin_torch.OmegaResidual):
            m.omega.mul_(1 + 0.1 * torch.rand(m.omega.shape, generator=gen))
    return model, x


def _stock_small_model():
    """A smaller stock ALBERT (one layer, unconverted), saved by transformers itself."""
    torch.manual_seed(3)
    config = transformers.AlbertConfig(**{**H.COMMON, "num_hidden_layers": 1}, embedding_size=8)
    return transformers.AlbertForMaskedLM(config).eval()


def _model(kind):
    return {"stock_small": _stock_small_model, "admin_form": lambda: _admin_form_model()[0],
            "fold": lambda: _folded_model()[0], "fold_sharded": lambda: _folded_model(seed=4)[0]}[kind]()


def _save(kind, path, model=None):
    """Write a checkpoint of ``kind`` to ``path`` (``model``: the one ``_model(kind)`` gives, built already)."""
    model = _model(kind) if model is None else model
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if kind == "fold_sharded" else {}))


def _snapshot(path):
    """{file name: content digest} of a directory (recursively), or None when it does not exist."""
    if not os.path.isdir(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = _digest(full)
    return out


def _digest(file):
    """A file's content; a safetensors file's by its tensors and metadata (its header's key order varies)."""
    digest = hashlib.sha256()
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(file, framework="pt") as f:
            digest.update(repr(sorted((f.metadata() or {}).items())).encode())
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                digest.update(f"{key}{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(-1).view(torch.uint8)
                              .numpy().tobytes())
    else:
        with open(file, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


class _Killed(BaseException):
    """The process died here (not an Exception: nothing catches it)."""


#: every call that creates, writes, moves or removes a file or directory: the file boundaries of a save
_BOUNDARIES = [(os, "rename"), (os, "replace"), (os, "link"), (os, "symlink"), (os, "mkdir"), (os, "makedirs"),
               (os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "fsync"), (shutil, "rmtree"), (shutil, "copy2"),
               (shutil, "copytree"), (tempfile, "mkdtemp"), (builtins, "open"), (toolbox_files, "_exchange")]


class _Killer:
    """Counts the boundary calls; at call ``at`` (before it runs, or right after it returned) the process
    "dies": that call and every later one raise, so no clean-up runs either, as after SIGKILL."""

    def __init__(self, monkeypatch, at=None, after=False):
        self.calls, self.at, self.after, self.dead = 0, at, after, False
        for module, name in _BOUNDARIES + self._writers():
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    @staticmethod
    def _writers():
        import safetensors.torch
        import transformers.modeling_utils as mu
        out = [(safetensors.torch, "save"), (safetensors.torch, "save_file")]
        if hasattr(mu, "safe_save_file"):
            out.append((mu, "safe_save_file"))
        return out

    def _wrap(self, fn):
        def boundary(*args, **kwargs):
            if self.dead:
                raise _Killed()
            index = self.calls
            self.calls += 1
            if index == self.at and not self.after:
                self.dead = True
                raise _Killed()
            result = fn(*args, **kwargs)
            if index == self.at:
                self.dead = True
                raise _Killed()
            return result
        return boundary


#: (what the directory holds, what is saved over it): every layout change a save can make
_CASES = [("stock_small", "fold"), ("admin_form", "fold"), ("fold", "fold_sharded"), ("fold_sharded", "admin_form"),
          ("fold_sharded", "fold"), (None, "fold")]


@pytest.mark.parametrize("old,new", _CASES, ids=[f"{o}-to-{n}" for o, n in _CASES])
def test_a_save_killed_at_any_file_boundary_leaves_the_old_or_the_new_checkpoint(old, new, tmp_path, monkeypatch):
    """Kill the save before and right after each file operation it makes (create, write, rename, remove, fsync,
    the exchange): the directory then holds, file for file, the old checkpoint or the new one, never a mix and
    never nothing; the next save publishes the new one and removes what the killed one left behind. The old
    directory's other files (a tokenizer) are there in both."""
    origin = tmp_path / "origin"
    if old is not None:
        _save(old, origin)
        (origin / "tokenizer.json").write_text('{"tokens": 1}')
    old_files = _snapshot(origin)
    done = tmp_path / "done"
    if old is not None:
        shutil.copytree(origin, done)
    # the uninterrupted save, counting its boundaries
    model = _model(new)
    with monkeypatch.context() as m:
        counter = _Killer(m)
        _save(new, done, model)
    boundaries = counter.calls
    new_files = _snapshot(done)
    assert new_files is not None and new_files != old_files and boundaries >= 5
    if old is not None:
        assert new_files["tokenizer.json"] == old_files["tokenizer.json"]
    seen = set()
    # killed right after call k is killed before call k + 1 (no file operation runs between them): before each
    # call, and after the last one
    for at, after in [(k, False) for k in range(boundaries)] + [(boundaries - 1, True)]:
        if True:
            run = tmp_path / f"run{at}{'a' if after else 'b'}"
            run.mkdir()
            target = run / "ckpt"
            if old is not None:
                shutil.copytree(origin, target)
            with monkeypatch.context() as m:
                killer = _Killer(m, at=at, after=after)
                try:
                    _save(new, target, model)
                except _Killed:
                    pass
            state = _snapshot(target)
            assert state in (old_files, new_files), (at, after, state and sorted(state))
            seen.add("old" if state == old_files else "new")
            _save(new, target, model)  # the next save: the new checkpoint, nothing of the killed one left beside it
            assert _snapshot(target) == new_files
            assert os.listdir(run) == ["ckpt"]
            shutil.rmtree(run)
    assert seen == {"old", "new"}


@pytest.mark.parametrize("old,new", [("fold", "fold_sharded"), ("fold_sharded", "fold"), ("fold_sharded", "admin_form"),
                                     ("admin_form", "fold_sharded")])
def test_a_save_replaces_the_other_weight_layout(old, new, tmp_path):
    """A sharded save over a single-file one (and back, and the Admin form over either): the stock loader and
    admin_torch.from_pretrained read the new model only; no weight file of the old layout is left."""
    _save(old, tmp_path)
    _save(new, tmp_path)
    files = set(os.listdir(tmp_path))
    sharded = {f for f in files if f.startswith("model-") or f.endswith(".index.json")}
    assert ("model.safetensors" in files) != bool(sharded), files
    if new == "admin_form":
        model, x = _admin_form_model()
        with pytest.raises(Exception, match="Admin form"):
            transformers.AlbertForMaskedLM.from_pretrained(tmp_path)
    else:
        model, x = _folded_model(seed=4 if new == "fold_sharded" else 2)
        with torch.no_grad():
            want = model(**x).logits
            stock = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
            assert (stock(**x).logits - want).abs().max() <= 1e-5
    back = admin_torch.from_pretrained(transformers.AlbertForMaskedLM, tmp_path)
    own = model.state_dict()
    assert back.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("kind", ["fold", "admin_form"])
def test_save_into_a_file_is_refused_and_the_file_is_intact(kind, tmp_path):
    """save_pretrained(path) where path is a file: ValueError naming save_directory, the file unchanged, nothing
    written beside it (transformers itself only logs and returns None)."""
    model = _folded_model()[0] if kind == "fold" else _admin_form_model()[0]
    path = tmp_path / "a_file"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="save_directory must be a directory.*a_file"):
        model.save_pretrained(path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["a_file"]


@pytest.mark.parametrize("kind", ["fold", "admin_form"])
def test_other_files_of_the_directory_survive_and_only_the_main_process_writes(kind, tmp_path):
    """A tokenizer and a subdirectory saved first stay; is_main_process=False writes nothing."""
    model = _folded_model()[0] if kind == "fold" else _admin_form_model()[0]
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "events").write_text("e")
    model.save_pretrained(tmp_path / "x", is_main_process=False)
    assert not (tmp_path / "x").exists()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text() == "{}"
    assert (tmp_path / "runs" / "events").read_text() == "e"
    assert "config.json" in os.listdir(tmp_path)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_a_damaged_admin_form_config_is_named(content, tmp_path):
    """admin_torch.from_pretrained of an Admin-form save whose admin_torch_config.json is damaged: a ValueError
    naming the file and what to do, not a bare JSONDecodeError."""
    _admin_form_model()[0].save_pretrained(tmp_path)
    (tmp_path / hf_io.ADMIN_CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=r"admin_torch_config.json is not a valid config .*save the model again"):
        admin_torch.from_pretrained(transformers.AlbertForMaskedLM, tmp_path)


# ------------------------------------------------------------------ permissions, the working directory, concurrency


@pytest.fixture(scope="module")
def folded_model():
    return _folded_model()[0]


@pytest.fixture
def saved(tmp_path, folded_model):
    """``tmp_path/"ckpt"``: a checkpoint saved by the folded model, with a tokenizer beside its files."""
    path = tmp_path / "ckpt"
    folded_model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"tokens": 1}')
    return path


@pytest.fixture
def read_only():
    """``read_only(path)``: chmod ``path`` a-w; write permission comes back after the test."""
    done = []

    def make(path):
        os.chmod(path, os.stat(path).st_mode & 0o7555)
        done.append(path)
    yield make
    for path in done:
        os.chmod(path, os.stat(path).st_mode | 0o200)


@pytest.mark.parametrize("what", ["directory", "parent", "weights"])
def test_a_save_over_a_read_only_checkpoint_is_refused_and_leaves_it_untouched(saved, tmp_path, read_only,
                                                                                folded_model, what):
    """Formerly the save "succeeded" by swapping a fresh directory in and left the read-only old one beside it.
    Now PermissionError naming save_directory; the old checkpoint file for file, nothing beside it (for root
    too: a checkpoint with no write bit is protected)."""
    before = _snapshot(saved)
    read_only({"directory": saved, "parent": tmp_path, "weights": saved / "model.safetensors"}[what])
    with pytest.raises(PermissionError, match=r"save_directory .*ckpt.* is read-only .*nothing was written"):
        folded_model.save_pretrained(saved)
    assert _snapshot(saved) == before and os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("cwd", ["ckpt", "ckpt/sub"])
def test_saving_into_the_working_directory_or_one_above_it_is_refused(saved, tmp_path, monkeypatch, folded_model,
                                                                      cwd):
    """``save_pretrained(".")`` from inside the checkpoint used to delete the process's working directory."""
    (tmp_path / "ckpt" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    before = _snapshot(saved)
    with pytest.raises(ValueError, match=r"save_directory .* is the current working directory or contains it"):
        folded_model.save_pretrained("." if cwd == "ckpt" else "..")
    assert os.getcwd() == str(tmp_path / cwd) and os.path.isdir(".")
    assert _snapshot(saved) == before and os.listdir(tmp_path) == ["ckpt"]


def test_a_save_through_a_symlink_replaces_its_target_and_keeps_the_link(saved, tmp_path, folded_model):
    link = tmp_path / "latest"
    link.symlink_to(saved, target_is_directory=True)
    folded_model.save_pretrained(link)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["ckpt", "latest"]
    assert (saved / "tokenizer.json").exists() and (saved / "model.safetensors").exists()


#: another process saving into the same directory: holds the save lock while it waits for "go"
_HOLDER = """
import os, sys, time
from toolbox_core.files import publish_directory
target, sync = sys.argv[1:3]

def write(tmp):
    open(os.path.join(tmp, "config.json"), "w").write("{}")
    open(os.path.join(sync, "started"), "w").close()
    while not os.path.exists(os.path.join(sync, "go")):
        time.sleep(0.005)

publish_directory(target, write, tag="admin_torch-save")
"""


def test_a_second_save_into_one_directory_fails_cleanly_and_the_first_completes(saved, tmp_path, folded_model):
    """Formerly the second save deleted the first one's temporary directory and that save failed. Now the
    second raises BlockingIOError naming the first (its pid) before writing anything; the first completes."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sync = tmp_path.parent / f"{tmp_path.name}-sync"
    sync.mkdir()
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, str(saved), str(sync)], cwd=repo,
                             env={**os.environ, "PYTHONPATH": repo}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (sync / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        before = _snapshot(saved)
        with pytest.raises(BlockingIOError, match=rf"is being written by another save \(pid {first.pid} on "):
            folded_model.save_pretrained(saved)
        assert _snapshot(saved) == before
    finally:
        (sync / "go").touch()
        _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert os.listdir(saved) == ["config.json"]  # the first save, whole (it keeps nothing of the old)
    folded_model.save_pretrained(saved)  # and the next save works
    assert "model.safetensors" in os.listdir(saved) and os.listdir(tmp_path) == ["ckpt"]

"""The HuggingFace adapter: what [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold] add for a HuggingFace
``PreTrainedModel`` (`HuggingFaceAdapter`, one of `admin_torch.api.ADAPTERS`), and saving and reloading
converted models without a silent change. It sits above admin_torch's pure-torch core
(`admin_torch.conversion`, `admin_torch.folding`), which never imports it; it imports no transformers until
[`from_pretrained`][admin_torch.from_pretrained] runs, and recognises a HuggingFace model by its class names.

The mechanism: **fold on save, with the Admin form alongside**.

* [`admin_torch.convert`][admin_torch.convert] records its settings in ``model.config.admin_torch`` and gives every
  ``PreTrainedModel`` in the converted model a ``save_pretrained`` (an instance attribute) that calls
  [`save_pretrained`][admin_torch.save_pretrained] here.
* [`save_pretrained`][admin_torch.save_pretrained] writes the *folded* model (stock classes, the same function, see
  [`admin_torch.fold`][admin_torch.fold]) under the stock weight names, plus the Admin form of every tensor that
  folding changed and every omega under the prefix ``admin_torch.`` in the same weight file.
* A user following HuggingFace's habits, ``BertModel.from_pretrained(path)``, gets the folded model: the
  same function (≤ 1e-5 in float32); the ``admin_torch.*`` keys are reported as unexpected and are not
  needed for it. Training it further is plain Post-LN training (the Admin parametrisation is gone) --
  that is the trade-off. ``convert`` on it is refused (its config records that it was saved from an
  Admin model): converting would re-initialise the residuals and change the function.
* [`from_pretrained`][admin_torch.from_pretrained] (``admin_torch.from_pretrained(BertModel, path)``) restores the Admin form
  bit for bit (the same omegas, trained ``as_parameter=True`` vectors included, and the unfolded weights).
* ``Trainer(resume_from_checkpoint=...)`` calls ``model.load_state_dict`` on the converted model with
  that file: a load pre-hook installed by ``convert`` swaps the ``admin_torch.*`` tensors in, so the
  resumed model is the Admin model that was saved.

A model whose fold is impossible (shared ALBERT layers with per-feature omegas, FSMT's and Marian's sinusoidal positions, Funnel's
repeated blocks, DeBERTa-v2 with ``share_att_key``: see [`admin_torch.fold`][admin_torch.fold]) is saved in its **Admin form**
instead, so that Trainer's checkpointing keeps working:

* ``model.safetensors`` holds every tensor of the converted model under ``admin_torch.*`` and none under the
  stock names; the config is ``admin_torch_config.json``.
* ``config.json`` is there for the stock loader to *refuse*: its width field (``hidden_size``, ``d_model``
  or ``dim``) holds, instead of its number, the sentence saying how to load the directory, so
  ``AutoConfig`` / ``cls.from_pretrained(path)`` raise a validation error quoting it instead of building a
  model that computes something else (transformers would otherwise build one from defaults and random
  weights, with only a load report). A ``README.md`` in the directory says the same.
* [`from_pretrained`][admin_torch.from_pretrained] and Trainer's resume (the load pre-hook; Trainer reads ``config.json`` with the
  base config class, which accepts it) restore the model bit for bit.
"""

import copy
import json
import os
import re
from typing import Any, Callable, Dict

import torch
from torch import nn

from toolbox_core.files import _carry, _exchange, _fsync_dir, publish_directory  # noqa: F401 (former names here)

from . import hf_architectures  # registers HuggingFace's layer and stack descriptions
from .adapter import Adapter
from .conversion import convert_model
from .folding import fold_model

__all__ = ["save_pretrained", "from_pretrained", "HuggingFaceAdapter", "HUGGINGFACE", "PREFIX"]

#: prefix of the Admin-form tensors in a saved weight file
PREFIX = "admin_torch."
_CONFIG_KEY = "admin_torch"
_FORMAT = 1
#: the config file of an Admin-form save (a model that cannot be folded); its ``config.json`` refuses stock loading
ADMIN_CONFIG_NAME = "admin_torch_config.json"
#: the config field that carries the refusal in an Admin-form save's ``config.json`` (the first one present)
_WIDTH_FIELDS = ("hidden_size", "d_model", "dim")
_WEIGHTS_NAME = "model.safetensors"
_README = """# An admin_torch model saved in its Admin form

{cls} was converted with admin_torch.convert and cannot be folded into a stock model computing the same
function ({reason}). Its weights are in model.safetensors under the prefix "admin_torch." and its config in
admin_torch_config.json; config.json deliberately has this explanation in place of its "{field}", so the stock
{cls}.from_pretrained refuses this directory instead of loading a different function.

    import admin_torch, transformers
    model = admin_torch.from_pretrained(transformers.{cls}, "this directory")

transformers.Trainer(resume_from_checkpoint=...) on the converted model restores it too.
"""


def _is_hf(module: nn.Module) -> bool:
    cls_names = {c.__name__ for c in type(module).__mro__}
    return "PreTrainedModel" in cls_names and hasattr(module, "config")


def _record(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, _CONFIG_KEY, None) if config is not None else None


class _SavePretrained:
    """The ``save_pretrained`` of a converted HuggingFace model: [`save_pretrained`][admin_torch.save_pretrained] on it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return save_pretrained(self.model, save_directory, *args, **kwargs)


def _swap_admin_tensors(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
    """Load pre-hook of a converted model: a saved file's ``admin_torch.*`` tensors replace the folded
    ones of the same name (Trainer's resume loads that file with ``load_state_dict``)."""
    marked = [k for k in state_dict if k.startswith(prefix + PREFIX)]
    for key in marked:
        state_dict[prefix + key[len(prefix + PREFIX):]] = state_dict.pop(key)


class HuggingFaceAdapter(Adapter):
    """HuggingFace's steps in [`convert`][admin_torch.convert] and [`fold`][admin_torch.fold], for each
    ``PreTrainedModel`` in the model (none: nothing is done)."""

    def check_family(self, model: nn.Module) -> None:
        """ValueError for a model of a Pre-LN or unsupported family (`admin_torch.hf_architectures.refusal`)."""
        message = hf_architectures.refusal(model)
        if message is not None:
            raise ValueError(message)

    def check_convertible(self, model: nn.Module) -> None:
        """ValueError when ``model`` was loaded from an Admin save with stock ``from_pretrained`` (its config
        records it): converting it again would re-initialise residuals of trained weights."""
        for module in model.modules():
            record = _record(module) if _is_hf(module) else None
            if isinstance(record, dict) and record.get("folded"):
                raise ValueError(
                    f"{type(module).__name__} was saved from an Admin model (config.admin_torch is set) and loaded as "
                    "its folded, stock equivalent; convert would re-initialise its residuals and change its function. "
                    "Load it with admin_torch.from_pretrained(cls, path) to continue Admin training, use it as is, or "
                    "delete config.admin_torch to convert it on purpose. Nothing was changed.")

    def after_convert(self, model: nn.Module, *, output_change_scale: str, as_parameter: bool) -> None:
        """Record the settings in each HuggingFace config and install the save / load glue."""
        for module in model.modules():
            if not _is_hf(module):
                continue
            setattr(module.config, _CONFIG_KEY, {"format": _FORMAT, "output_change_scale": output_change_scale,
                                                 "as_parameter": as_parameter, "folded": False})
            # an instance attribute shadows the class's save_pretrained; deep-copied / pickled with the model
            module.__dict__["save_pretrained"] = _SavePretrained(module)
            hooks = module._load_state_dict_pre_hooks.values()
            if not any(getattr(h, "hook", h) is _swap_admin_tensors for h in hooks):
                module.register_load_state_dict_pre_hook(_swap_admin_tensors)

    def after_fold(self, folded: nn.Module, *, untied: bool) -> None:
        """The folded copy: no save / load glue, its config marked as folded (and untied when fold untied)."""
        for module in folded.modules():
            module.__dict__.pop("save_pretrained", None)
            for key, hook in list(module._load_state_dict_pre_hooks.items()):
                if getattr(hook, "hook", hook) is _swap_admin_tensors:
                    del module._load_state_dict_pre_hooks[key]
            record = _record(module) if _is_hf(module) else None
            if isinstance(record, dict):
                setattr(module.config, _CONFIG_KEY, dict(record, folded=True))
            if untied and _is_hf(module):
                # an embedding table that also feeds the output projection was scaled on its own: a reload
                # must not tie them again
                module.config.tie_word_embeddings = False
                if hasattr(module, "_tied_weights_keys"):
                    module._tied_weights_keys = None


#: the adapter instance [`convert`][admin_torch.convert], [`fold`][admin_torch.fold] and this module use
HUGGINGFACE = HuggingFaceAdapter()


def save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """Save a converted HuggingFace ``model``: the folded stock model plus the Admin form, or, where no
    stock model computes its function, the Admin form alone (see the module doc).

    Args and kwargs are those of ``PreTrainedModel.save_pretrained``; a ``state_dict=`` (Trainer passes
    ``model.state_dict()``) is ignored: the tensors are taken from ``model``. An Admin-form save writes one
    safetensors file and honours ``is_main_process``; it refuses ``push_to_hub=True``.

    Atomic as a whole: the save is written into a sibling temporary directory and published by one
    rename (an atomic exchange with an existing directory on Linux), so a reader of ``save_directory`` sees
    the old checkpoint or the new one, never a mix and never nothing. Files of ``save_directory`` that are
    not part of a model checkpoint (a tokenizer, Trainer's ``optimizer.pt``...) are kept; weight files of
    either layout (single file or sharded), ``config.json``, ``generation_config.json`` and an Admin-form
    save's files are replaced by the new save's. One save at a time per directory: a second one raises
    BlockingIOError naming the first, which completes (see
    [`publish_directory`][toolbox_core.files.publish_directory]).

    Raises:
        ValueError: ``save_directory`` is an existing file (left intact), not a path, or the current working
            directory or one above it (nothing written).
        PermissionError: ``save_directory``, a checkpoint file in it, or the directory above it is read-only
            (no write permission, or no write bit at all, also for root): left as it is, nothing written.
        BlockingIOError: another save into ``save_directory`` is under way (it is named; nothing written).
    """
    if not _is_hf(model):
        raise TypeError(f"model must be a converted HuggingFace PreTrainedModel, got {type(model).__name__}")
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise ValueError(f"save_directory must be a directory path (str or os.PathLike), got {save_directory!r}")
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise ValueError(f"save_directory must be a directory, got the file {os.fspath(save_directory)!r} "
                         "(left as it is; nothing was written)")
    kwargs.pop("state_dict", None)
    try:
        folded = fold_model(model, adapters=(HUGGINGFACE,))
    except ValueError as err:
        return _save_admin_form(model, save_directory, reason=str(err), **kwargs)
    stock = folded.state_dict()
    admin = model.state_dict()
    extra = {PREFIX + k: v.detach().clone().contiguous() for k, v in admin.items()
             if k not in stock or not torch.equal(stock[k], v)}
    state = {k: v.contiguous() for k, v in stock.items()}
    state.update(extra)
    if not kwargs.get("is_main_process", True):
        return None  # only the main process writes (transformers' own rule)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = os.path.basename(os.path.abspath(os.fspath(save_directory)))
    cls_save = type(folded).save_pretrained  # the class's method: the folded copy has no instance glue
    return _publish(save_directory, lambda tmp: cls_save(folded, tmp, *args, state_dict=state, **kwargs))


#: the files of a model checkpoint (replaced by a save; anything else in the directory is kept)
_CHECKPOINT_FILES = re.compile(
    r"(config\.json|generation_config\.json|" + re.escape(ADMIN_CONFIG_NAME) + r"|"
    r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?)")
_TMP_MARK = ".admin_torch-save-"


def _is_checkpoint_file(directory: str, name: str) -> bool:
    if _CHECKPOINT_FILES.fullmatch(name):
        return True
    path = os.path.join(directory, name)
    return name == "README.md" and os.path.isfile(path) and _is_ours(path)


def _carry_other_files(old: str, new: str) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that are not checkpoint files and that ``new``
    lacks: a tokenizer, Trainer's state, a user's notes stay where they were."""
    _carry(old, new, _keeps)


def _keeps(entry: str) -> bool:
    return not _is_checkpoint_file(*os.path.split(entry))


def _publish(save_directory, write: Callable[[str], Any]):
    """Run ``write(tmp)`` on a new sibling directory of ``save_directory`` and swap it in atomically
    ([`toolbox_core.files.publish_directory`][toolbox_core.files.publish_directory]: one writer at a time, a
    read-only checkpoint or the working directory refused untouched); the old directory's files that are not
    checkpoint files (a tokenizer, Trainer's state) are carried over. Temporary names:
    ``.<name>.admin_torch-save-<pid>-<random>``, the lock ``.<name>.admin_torch-save.lock``."""
    return publish_directory(save_directory, write, name="save_directory", tag=_TMP_MARK.strip(".-"),
                             keep=_keeps)


def _is_ours(readme: str) -> bool:
    with open(readme, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(_README.splitlines()[0])


def _is_admin_form(path: str) -> bool:
    """``path`` holds an Admin-form save: its config and a ``config.json`` whose width field is the refusal."""
    if not os.path.isfile(os.path.join(path, ADMIN_CONFIG_NAME)):
        return False
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return any(isinstance(config.get(k), str) for k in _WIDTH_FIELDS)


def _save_admin_form(model: nn.Module, save_directory, *, reason: str, is_main_process: bool = True,
                     push_to_hub: bool = False, **ignored) -> None:
    """Write ``model`` in its Admin form (module doc): every tensor under ``admin_torch.*`` in
    ``model.safetensors``, the config as ``admin_torch_config.json``, a ``config.json`` the stock loader
    refuses; the whole directory published at once (`_publish`)."""
    from safetensors.torch import save as safetensors_bytes
    cls = type(model).__name__
    if push_to_hub:
        raise ValueError(f"push_to_hub: {cls} cannot be folded ({reason}), so it is saved in its Admin form, which "
                         "is for admin_torch.from_pretrained and Trainer resumes only; not pushed")
    config = copy.deepcopy(model.config)
    setattr(config, _CONFIG_KEY, dict(getattr(config, _CONFIG_KEY), admin_form=True))
    refusing = json.loads(config.to_json_string())
    # the model width: the family's config class checks its type; the base class (Trainer's resume reads
    # config.json with it) neither checks it nor compares it with anything (it does vocab_size)
    field = next((k for k in _WIDTH_FIELDS if isinstance(refusing.get(k), int)), None)
    if field is None:
        raise ValueError(f"{cls}: its config has none of hidden_size, d_model, dim to mark as an Admin-form save; "
                         "nothing was written")
    refusing[field] = (f"not a stock checkpoint: saved by admin_torch in its Admin form ({cls} cannot be folded). "
                       f"Load it with admin_torch.from_pretrained(transformers.{cls}, path); see README.md here")
    if not is_main_process:
        return None
    # clones: tied weights share storage, which safetensors refuses; each key loads its own copy back
    state = {PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    generation = getattr(model, "generation_config", None)
    can_generate = generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate()

    def write_all(directory):
        def write(name, data, mode="w"):
            with open(os.path.join(directory, name), mode) as f:
                f.write(data)

        write("config.json", json.dumps(refusing, indent=2, sort_keys=True) + "\n")
        write(_WEIGHTS_NAME, safetensors_bytes(state, metadata={"format": "pt", "admin_torch": "admin_form"}), "wb")
        write(ADMIN_CONFIG_NAME, config.to_json_string())
        if can_generate:
            write("generation_config.json", generation.to_json_string())
        write("README.md", _README.format(cls=cls, reason=reason, field=field))

    _publish(save_directory, write_all)
    return None


def _admin_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The ``admin_torch.*`` tensors of a saved directory (single or sharded safetensors)."""
    from safetensors import safe_open
    files = []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for k, v in json.load(f)["weight_map"].items() if k.startswith(PREFIX)})
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = [os.path.join(path, "model.safetensors")]
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(PREFIX):
                    out[key[len(PREFIX):]] = f.get_tensor(key)
    return out


def from_pretrained(cls: Any, path, **kwargs) -> nn.Module:
    """Load a model saved from a converted model back in its Admin form: ``cls.from_pretrained`` (the
    folded weights), ``convert`` with the recorded settings, then the saved Admin tensors. An Admin-form save
    (a model that cannot be folded; its config is ``admin_torch_config.json``) is restored the same way, every
    tensor from the ``admin_torch.*`` ones.

    Raises:
        ValueError: ``path`` holds no Admin save (its config has no ``admin_torch`` record), or its Admin
            tensors do not match the converted model.
    """
    from transformers.utils import logging as hf_logging
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"path must be a local directory written by save_pretrained of a converted model, got {path!r}")
    admin_form = _is_admin_form(os.fspath(path))
    if admin_form and "config" not in kwargs:
        config_file = os.path.join(path, ADMIN_CONFIG_NAME)
        try:
            kwargs["config"] = cls.config_class.from_json_file(config_file)
        except (ValueError, TypeError, AttributeError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            raise ValueError(f"{config_file} is not a valid config ({type(err).__name__}: {err}): this Admin-form save "
                             "is damaged; save the model again with save_pretrained, or restore the file from a "
                             "copy of the checkpoint") from err
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the admin_torch.* keys are expected to be unexpected here
    try:
        model = cls.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    record = _record(model)
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{path}: config has no admin_torch record (not saved from a converted model); use "
                         f"{getattr(cls, '__name__', cls)}.from_pretrained and admin_torch.convert instead")
    for module in model.modules():
        if _is_hf(module) and hasattr(module.config, _CONFIG_KEY):
            delattr(module.config, _CONFIG_KEY)
    convert_model(model, output_change_scale=record["output_change_scale"], as_parameter=record["as_parameter"],
                  adapters=(HUGGINGFACE,))
    tensors = _admin_tensors(os.fspath(path))
    own = model.state_dict()
    missing = [k for k in own if (admin_form or "admin_omegas" in k) and k not in tensors]
    unknown = [k for k in tensors if k not in own]
    if missing or unknown:
        raise ValueError(f"{path}: the saved Admin tensors do not match the converted model (missing "
                         f"{missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))
    return model

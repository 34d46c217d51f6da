"""Fold a ``transformer_admin`` checkpoint into a checkpoint of fairseq's stock ``transformer``.

Command:

    python -m fairseq_plugins.fold_checkpoint IN.pt OUT.pt

``fairseq-generate`` then decodes OUT.pt without ``--user-dir`` and gives the same hypotheses
as IN.pt with ``--user-dir fairseq_plugins``: inference carries no Admin overhead.

How (see `admin_torch.folding`): every omega (Admin, profiled Admin, trainable vectors, or
DeepNorm's alpha, a scalar omega) is moved into the LayerNorm in front of its sublayer
([`admin_torch.fold_into_norm_`][admin_torch.fold_into_norm_]) and out of the linear maps that read that LayerNorm's
output ([`admin_torch.fold_into_linears_`][admin_torch.fold_into_linears_]: q, k, v of self-attention, q of cross-attention,
fc1). The first sublayer of each stack reads the embedding ``embed_scale * E[token] + P[pos]``,
which takes the factor instead ([`admin_torch.fold_into_embedding_`][admin_torch.fold_into_embedding_]). Because the encoder,
the decoder and the output projection need different factors and the stock sinusoidal positions
cannot be scaled, the folded model has unshared token embeddings (``share_all_embeddings`` and
``share_decoder_input_output_embed`` off; the output projection keeps the unscaled table) and
learned positional embeddings holding ``omega *`` the sinusoidal table; with
``--layernorm-embedding`` the factor goes into that LayerNorm and nothing else changes. The
compute per token is the stock transformer's.

The folded checkpoint keeps the model and task configuration (arch ``transformer``, the admin
arguments removed, ``user_dir`` cleared), stores the model arguments as a plain dict (so that it
loads with torch's ``weights_only=True`` without any allowlist) and drops the optimizer state.
"""

import argparse
import copy
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn

import admin_torch
from admin_torch.folding import fold_stack_
from fairseq.data import Dictionary
from toolbox_core.files import atomic_write, check_output_path
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.transformer import TransformerModel
from fairseq.modules import SinusoidalPositionalEmbedding

from fairseq.models.transformer_lm import TransformerLanguageModel

from .admin import ADMIN_ARGS
from .modules.layer_kinds import DECODER_LAYER, DECODER_ONLY_LAYER, ENCODER_LAYER
from .models.transformer_admin import TransformerAdminModel
from .models.transformer_lm_admin import TransformerLMAdmin

__all__ = ["NotAdminCheckpointError", "stock_args", "fold_admin_model", "fold_checkpoint", "main"]


class NotAdminCheckpointError(ValueError):
    """The checkpoint is not one of a ``transformer_admin`` model."""


def _omega(residual: nn.Module):
    if isinstance(residual, admin_torch.OmegaResidual):
        return residual
    if isinstance(residual, admin_torch.DeepNormResidual):
        return residual.alpha
    raise TypeError(f"not an Admin or DeepNorm residual: {type(residual).__name__}")


def _folds_into_embedding(args) -> bool:
    return not getattr(args, "layernorm_embedding", False)


def _as_namespace(args) -> argparse.Namespace:
    """A model configuration (Namespace, OmegaConf config or dict) as a plain argparse.Namespace."""
    if isinstance(args, argparse.Namespace):
        return copy.deepcopy(args)
    return argparse.Namespace(**_to_plain(args))


def stock_args(args, language_model: bool = False) -> argparse.Namespace:
    """The stock ``transformer`` (or, for ``language_model``, ``transformer_lm``) arguments of the folded
    model of a ``transformer_admin`` (``transformer_lm_admin``) model."""
    if isinstance(args, (str, bytes)) or not hasattr(args, "__dict__") and not isinstance(args, dict):
        raise TypeError(f"args must be the model's configuration (argparse.Namespace), got {type(args).__name__}")
    new = _as_namespace(args)
    for name in ADMIN_ARGS:
        if hasattr(new, name):
            delattr(new, name)
    stock = "transformer_lm" if language_model else "transformer"
    new.arch = stock
    if hasattr(new, "_name"):
        new._name = stock
    if _folds_into_embedding(new):
        # encoder, decoder and output projection get different factors (module docstring)
        if not language_model:
            new.share_all_embeddings = False
        new.share_decoder_input_output_embed = False
        if not getattr(new, "no_token_positional_embeddings", False):
            if not language_model:
                new.encoder_learned_pos = True
            new.decoder_learned_pos = True
    return new


# fairseq's Post-LN layers are described in modules/layer_kinds (ENCODER_LAYER, ...); the folding itself is
# admin_torch.folding.fold_stack_.


def _described(layer: nn.Module):
    """The description and the residual modules (in sublayer order) of one fairseq Admin layer."""
    residuals = list(layer.residuals)
    if len(residuals) == 2:
        return ENCODER_LAYER, residuals
    if layer.encoder_attn is None:
        return DECODER_ONLY_LAYER, [residuals[0], residuals[2]]
    return DECODER_LAYER, residuals


@torch.no_grad()
def fold_admin_model(model: TransformerAdminModel, task=None) -> TransformerModel:
    """A stock `fairseq.models.transformer.TransformerModel` computing what the Admin
    (or DeepNorm) ``model`` computes; ``model`` is not modified.

    Args:
        model: a built ``transformer_admin`` model.
        task: anything with ``source_dictionary`` / ``target_dictionary``; default: the model's own.

    Examples:
        >>> # needs a trained model and its batch (tests/fairseq_plugins/test_admin_fairseq_e2e.py runs this)
        >>> stock = fold_admin_model(admin_model).eval()  # doctest: +SKIP
        >>> stock(src_tokens, src_lengths, prev_output_tokens)[0]  # doctest: +SKIP
    """
    if not isinstance(model, (TransformerAdminModel, TransformerLMAdmin)):
        raise TypeError(f"model must be a transformer_admin or transformer_lm_admin model, got {type(model).__name__}")
    language_model = isinstance(model, TransformerLMAdmin)
    if any(admin_torch.has_qk_norm(m) for m in model.modules()):
        raise ValueError("model has qk-layernorm (--qk-norm); a stock fairseq transformer has no LayerNorm on queries "
                         "and keys, so it is not folded (evaluate it with --user-dir fairseq_plugins)")
    if task is None:
        source = model.decoder.dictionary if language_model else model.encoder.dictionary
        task = SimpleNamespace(source_dictionary=source, target_dictionary=model.decoder.dictionary)
    args = stock_args(getattr(model, "legacy_args", None) or model.args, language_model)
    stock_class = TransformerLanguageModel if language_model else TransformerModel
    stock = stock_class.build_model(copy.deepcopy(args), task)
    kinds = (admin_torch.OmegaResidual, admin_torch.DeepNormResidual)
    admin_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, kinds))
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not k.startswith(admin_prefixes) and k != "admin_profiled"}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    allowed_missing = {"encoder.embed_positions.weight", "decoder.embed_positions.weight"}
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"folding: unexpected state mismatch, missing {missing}, unexpected {unexpected}")
    # learned positions take the sinusoidal table of the Admin model
    pairs = [(model.decoder, stock.decoder)] + ([] if language_model else [(model.encoder, stock.encoder)])
    for src, dst in pairs:
        if isinstance(src.embed_positions, SinusoidalPositionalEmbedding) and dst.embed_positions is not None \
                and not isinstance(dst.embed_positions, SinusoidalPositionalEmbedding):
            table = dst.embed_positions.weight
            table.copy_(src.embed_positions.weights[: table.shape[0]].to(table))

    # each stack's omegas move into the stock model, layer by layer (admin_torch.folding.fold_stack_)
    stacks = [(model.decoder, stock.decoder)] + ([] if language_model else [(model.encoder, stock.encoder)])
    for src, dst in stacks:
        entries = []
        for admin_layer, stock_layer in zip(src.layers, dst.layers):
            kind, residuals = _described(admin_layer)
            entries.append((stock_layer, kind, [_omega(r) for r in residuals]))
        if dst.layernorm_embedding is not None:
            first, first_is_norm = [dst.layernorm_embedding], True
        else:
            # the stack's input: embed_scale * E[token] (through project_in_dim when the embedding is
            # narrower than the model) + positions
            project_in = getattr(dst, "project_in_dim", None)
            first = [project_in if project_in is not None else dst.embed_tokens]
            first += [dst.embed_positions] if dst.embed_positions is not None else []
            first_is_norm = False
        fold_stack_(entries, first, first_is_norm)
    return stock


def _dummy_dictionary(size: int) -> Dictionary:
    # building the model needs only the vocabulary size and the special symbols' indices
    d = Dictionary()
    i = 0
    while len(d) < size:
        d.add_symbol(f"<fold_placeholder_{i}>")
        i += 1
    if len(d) != size:
        raise ValueError(f"cannot rebuild a dictionary of {size} entries")
    return d


def _model_args(state) -> argparse.Namespace:
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        model_cfg = cfg["model"]
        return model_cfg if isinstance(model_cfg, argparse.Namespace) else argparse.Namespace(**dict(model_cfg))
    if state.get("args") is not None:
        return state["args"]
    raise NotAdminCheckpointError("checkpoint has no model configuration (neither cfg.model nor args)")


def _to_plain(obj):
    """OmegaConf / Namespace containers as plain python (what torch's weights_only loader accepts)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, argparse.Namespace):
        return {k: _to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def fold_checkpoint(in_path: str, out_path: str) -> Dict[str, float]:
    """Fold the ``transformer_admin`` (``transformer_lm_admin``) checkpoint ``in_path`` into a stock
    ``transformer`` (``transformer_lm``) checkpoint ``out_path``, written to a temporary name and
    renamed. Returns ``{residual module name: mean omega}`` of what was folded.

    Raises:
        NotAdminCheckpointError: ``in_path`` is not a ``transformer_admin`` checkpoint.
        ValueError: a mixture-of-experts checkpoint (``--moe-experts``): the stock models have no experts.
    """
    from fairseq import checkpoint_utils  # safe loading: a repair that importing fairseq_plugins installed

    if not os.path.isfile(in_path):
        raise ValueError(f"input {in_path} is {'a directory' if os.path.isdir(in_path) else 'not found'}; "
                         "give a transformer_admin checkpoint file")
    out_path = check_output_path(out_path, [in_path])
    state = checkpoint_utils.load_checkpoint_to_cpu(in_path)
    args = _model_args(state)
    arch = str(getattr(args, "arch", None) or getattr(args, "_name", None))
    language_model = arch.startswith("transformer_lm_admin")
    if getattr(args, "admin_init", None) is None or not (language_model or arch.startswith("transformer_admin")):
        raise NotAdminCheckpointError(
            f"{in_path}: not a transformer_admin or transformer_lm_admin checkpoint (arch {arch!r}); fold_checkpoint "
            "folds only checkpoints trained with --arch transformer_admin* or transformer_lm_admin* "
            "(--user-dir fairseq_plugins)"
        )
    experts = int(getattr(args, "moe_experts", 0) or 0)
    if experts > 0:
        # a stock transformer has one dense FFN per layer: E experts and a router have no place in it
        raise ValueError(
            f"{in_path}: trained with --moe-experts {experts}; a stock fairseq transformer has no experts, so a "
            "mixture-of-experts model is not folded (evaluate it with --user-dir fairseq_plugins)")
    if getattr(args, "qk_norm", False):
        # a stock fairseq transformer has no qk-layernorm: its LayerNorms cannot be folded into anything
        raise ValueError(
            f"{in_path}: trained with --qk-norm; a stock fairseq transformer has no LayerNorm on queries and keys, "
            "so the model is not folded (evaluate it with --user-dir fairseq_plugins)")
    sd = state["model"]
    if language_model:
        src = tgt = _dummy_dictionary(sd["decoder.embed_tokens.weight"].shape[0])
    else:
        src = _dummy_dictionary(sd["encoder.embed_tokens.weight"].shape[0])
        tgt = src if getattr(args, "share_all_embeddings", False) else \
            _dummy_dictionary(sd["decoder.embed_tokens.weight"].shape[0])
    task = SimpleNamespace(source_dictionary=src, target_dictionary=tgt)
    args = _as_namespace(args)
    args.admin_profile = None  # the checkpoint holds the omegas; do not read or write a profile file
    # as fairseq's models.build_model: the --arch function fills the defaults (a flag newer than the checkpoint),
    # then the model only builds
    ARCH_CONFIG_REGISTRY[arch](args)
    model = (TransformerLMAdmin if language_model else TransformerAdminModel).build_model(args, task)
    model.load_state_dict(sd, strict=True)
    model.eval()
    folded = fold_admin_model(model, task)
    omegas = {n: float(getattr(m, "omega", getattr(m, "alpha", None)).detach().double().mean())
              for n, m in model.named_modules() if isinstance(m, (admin_torch.OmegaResidual, admin_torch.DeepNormResidual))}

    new_args = stock_args(_model_args(state), language_model)
    out = {k: v for k, v in state.items() if k not in ("last_optimizer_state",)}
    out["model"] = folded.state_dict()
    out["args"] = None
    cfg = _to_plain(state["cfg"])
    cfg["model"] = _to_plain(new_args)
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    out["cfg"] = cfg
    out["last_optimizer_state"] = None
    out["extra_state"] = _to_plain(state.get("extra_state"))
    with atomic_write(out_path, "wb") as f:  # never a half-written checkpoint, never the input
        torch.save(out, f)
    return omegas


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_plugins.fold_checkpoint",
        description="Fold a transformer_admin checkpoint into a stock fairseq transformer checkpoint "
                    "(decodable with fairseq-generate without --user-dir).",
    )
    parser.add_argument("input", help="transformer_admin checkpoint (.pt)")
    parser.add_argument("output", help="where to write the stock transformer checkpoint (.pt)")
    a = parser.parse_args(argv)
    try:
        omegas = fold_checkpoint(a.input, a.output)
    except (ValueError, OSError) as err:  # not an Admin checkpoint, bad paths, unreadable or unsafe file
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    values = list(omegas.values())
    print(f"folded {len(values)} residual omegas (min {min(values):.4g}, max {max(values):.4g}) into {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""admin_torch's public surface: the root's ``__all__``, the names earlier releases exported there (found in their
modules now), and admin_torch.api, whose convert / fold are the pure-torch core with the HuggingFace adapter."""

import copy
import importlib
import warnings

import pytest
import torch

import admin_torch
from admin_torch import api, hf_io
from admin_torch.conversion import convert_model

from benchmarks import hf_families as H


#: what users need from the root (README, docs, recipes, fairseq_plugins, benchmarks), and nothing else
USER_API = {
    # admin-torch 0.1.0
    "calculate_init", "OmegaResidual", "as_module", "as_buffer", "as_parameter", "OUTPUT_CHANGE_SCALES",
    # DeepNorm
    "DeepNormInit", "deepnorm_init", "deepnorm_scale_", "DeepNormResidual", "DEEPNORM_SCALED_PROJECTIONS",
    # profiled Admin
    "profile_omegas", "apply_omegas", "save_profile", "load_profile",
    # output change
    "output_change", "residual_betas", "make_stack", "ResidualStack", "AddResidual",
    # any model
    "TransformerEncoderLayer", "TransformerDecoderLayer", "convert", "fold", "LAYER_KINDS", "LayerKind", "Sublayer",
    "StackKind",
    # HuggingFace
    "save_pretrained", "from_pretrained",
    # qk-layernorm
    "QKNorm", "QKNormMultiheadAttention", "QKNormLinear", "add_qk_norm", "has_qk_norm", "qk_norm_projections_",
    # folding, one module at a time
    "fold_into_norm_", "fold_into_linears_", "fold_into_embedding_",
}


def test_public_api_exported():
    for name in ["calculate_init", "OmegaResidual", "as_module", "as_buffer", "as_parameter", "deepnorm_init",
                 "deepnorm_scale_", "DeepNormResidual", "profile_omegas", "apply_omegas", "save_profile",
                 "load_profile", "output_change", "make_stack", "fold", "fold_into_norm_", "fold_into_linears_",
                 "fold_into_embedding_"]:
        assert name in admin_torch.__all__ and hasattr(admin_torch, name)


def test_all_is_the_user_api_once_each():
    assert len(admin_torch.__all__) == len(set(admin_torch.__all__))
    assert set(admin_torch.__all__) == USER_API
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of them is a deprecated name
        for name in admin_torch.__all__:
            getattr(admin_torch, name)


@pytest.mark.parametrize("name", sorted(admin_torch._MOVED))
def test_a_name_earlier_releases_exported_is_found_in_its_module_with_a_warning(name):
    module, attr = admin_torch._MOVED[name]
    assert name not in admin_torch.__all__
    with pytest.warns(DeprecationWarning, match=rf"admin_torch\.{name} .*\(from admin_torch\.{module} import {attr}\b"):
        value = getattr(admin_torch, name)
    assert value is getattr(importlib.import_module(f"admin_torch.{module}"), attr)
    with pytest.warns(DeprecationWarning):
        exec(f"from admin_torch import {name}", {})


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        admin_torch.no_such_name


def test_the_public_convert_and_fold_are_the_core_with_the_huggingface_adapter():
    assert api.ADAPTERS == (hf_io.HUGGINGFACE,) and isinstance(hf_io.HUGGINGFACE, hf_io.HuggingFaceAdapter)
    assert admin_torch.convert is api.convert and admin_torch.fold is api.fold


def test_without_the_adapter_a_huggingface_model_converts_as_pure_torch():
    pytest.importorskip("transformers")
    model, x, _ = H.build("bert")
    core, public = copy.deepcopy(model), model
    convert_model(core)
    admin_torch.convert(public)
    with torch.no_grad():
        torch.testing.assert_close(H.output(core(**x)), H.output(public(**x)), rtol=0, atol=0)
    # the adapter's part: the config record and the save glue, on the public convert only
    assert not hasattr(core.config, "admin_torch") and "save_pretrained" not in core.__dict__
    assert public.config.admin_torch == {"format": 1, "output_change_scale": "default", "as_parameter": False,
                                         "folded": False}
    assert isinstance(public.__dict__["save_pretrained"], hf_io._SavePretrained)
    folded = admin_torch.fold(public)
    assert folded.config.admin_torch["folded"] and "save_pretrained" not in folded.__dict__

"""admin_torch.adapter: the core (conversion.convert_model, folding.fold_model) calls the adapters it is given at
fixed points, and without adapters it is pure torch: no framework's steps."""

import copy

import pytest
import torch
from torch import nn

from admin_torch import OmegaResidual, TransformerEncoderLayer, make_stack
from admin_torch.adapter import Adapter
from admin_torch.conversion import convert_model
from admin_torch.folding import fold_model


class Recorder(Adapter):
    """Records each step with what it saw; ``refuse``: check_convertible raises."""

    def __init__(self, refuse=False):
        self.calls, self.refuse = [], refuse

    def check_convertible(self, model):
        converted = any(isinstance(m, TransformerEncoderLayer) for m in model.modules())
        self.calls.append(("check", model, converted))
        if self.refuse:
            raise ValueError("refused by the adapter")

    def after_convert(self, model, *, output_change_scale, as_parameter):
        converted = all(isinstance(m, TransformerEncoderLayer) for m in model.layers)
        self.calls.append(("after_convert", model, converted, output_change_scale, as_parameter))

    def after_fold(self, folded, *, untied):
        self.calls.append(("after_fold", folded, untied))


def encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                 enable_nested_tensor=False)


def test_the_base_adapter_does_nothing():
    model = encoder()
    before = copy.deepcopy(model.state_dict())
    a = Adapter()
    assert a.check_convertible(model) is None and a.after_fold(model, untied=True) is None
    assert a.after_convert(model, output_change_scale="default", as_parameter=False) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_convert_checks_with_the_adapters_before_any_change_and_tells_them_after():
    model, first, second = encoder(), Recorder(), Recorder()
    assert convert_model(model, output_change_scale="O(1)", as_parameter=True, adapters=[first, second]) is model
    for rec in (first, second):
        assert rec.calls == [("check", model, False), ("after_convert", model, True, "O(1)", True)]


def test_an_adapter_refusal_leaves_the_model_unchanged_and_later_adapters_uncalled():
    model, refusing, later = encoder(), Recorder(refuse=True), Recorder()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="refused by the adapter"):
        convert_model(model, qk_norm=True, adapters=[refusing, later])
    assert [c[0] for c in refusing.calls] == ["check"] and later.calls == []
    assert not any(isinstance(m, (TransformerEncoderLayer, OmegaResidual)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_core_refuses_before_asking_the_adapters():
    rec = Recorder()
    with pytest.raises(ValueError, match="no supported Post-LN layer"):
        convert_model(nn.Linear(4, 4), adapters=[rec])
    with pytest.raises(ValueError, match="Pre-LN layer"):
        convert_model(nn.TransformerEncoderLayer(16, 2, 32, norm_first=True), adapters=[rec])
    assert rec.calls == []


def test_fold_tells_the_adapters_about_the_folded_copy_only():
    model = convert_model(encoder())
    emb = nn.Embedding(10, 16)
    whole = nn.Sequential(emb, model)
    rec = Recorder()
    folded = fold_model(whole, embedding=emb, adapters=[rec])
    assert rec.calls == [("after_fold", folded, False)] and folded is not whole
    with pytest.raises(ValueError, match="pass embedding="):
        fold_model(whole, adapters=[rec])  # refused: no step runs
    assert len(rec.calls) == 1
    fold_model(make_stack("admin", depth=2, dim=8, seed=0), adapters=[rec])  # a reference stack: no step either
    assert len(rec.calls) == 1


def test_fold_reports_an_untied_embedding():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.enc, self.out = nn.Embedding(10, 16), encoder(), nn.Linear(16, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.enc(self.emb(ids)))

    model = Tied()
    convert_model(model)
    rec = Recorder()
    folded = fold_model(model, embedding=model.emb, adapters=[rec])
    assert rec.calls == [("after_fold", folded, True)]
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(folded.eval()(ids), model.eval()(ids), atol=1e-5, rtol=1e-5)

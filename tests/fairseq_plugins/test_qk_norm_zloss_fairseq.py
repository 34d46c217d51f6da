"""fairseq remedies: ``--qk-norm`` on the project's architectures (in process against the written-out formula,
then real fairseq-train), and the z-loss criteria (formula; ``--z-loss 0`` is the stock criterion exactly;
bad flag: one line, exit 2; fold refuses qk-norm)."""

import argparse
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fairseq_plugins  # noqa: F401  (registers models and criteria)
from admin_torch import QKNormLinear
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq_helpers import PLUGINS_DIR, check_run, lm_data_case, run_tools_batch
from fairseq_plugins.criterions.zloss import CrossEntropyZLoss, LabelSmoothedCrossEntropyZLoss, check_z_loss_flags
from fairseq_plugins.flags import FlagError
from fairseq_plugins.models.transformer_admin import TransformerAdminModel, apply_qk_norm

VOCAB = 20


def _ln(x, norm):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def build(*extra):
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    TransformerAdminModel.add_args(parser)
    argv = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--share-all-embeddings"]
    args = parser.parse_args(argv + list(extra))
    args.arch = "transformer_admin"
    ARCH_CONFIG_REGISTRY["transformer_admin"](args)
    d = Dictionary()
    for i in range(VOCAB - len(d)):
        d.add_symbol(f"w{i}")
    return TransformerAdminModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def test_fairseq_attention_with_qk_norm_matches_the_formula():
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4, self_attention=True)
    holder = torch.nn.ModuleList([attn])
    assert apply_qk_norm(holder) == 1 and apply_qk_norm(holder) == 0   # once
    for proj in (attn.q_proj, attn.k_proj):
        assert isinstance(proj, QKNormLinear)
        with torch.no_grad():
            proj.qk_norm.norm.weight.uniform_(0.5, 1.5)
            proj.qk_norm.norm.bias.normal_(0, 0.3)
    x = torch.randn(5, 2, 16)   # time-first
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    out, _ = attn(x, x, x, key_padding_mask=pad)
    q = _ln((x @ attn.q_proj.weight.T + attn.q_proj.bias).view(5, 2, 4, 4), attn.q_proj.qk_norm.norm)
    k = _ln((x @ attn.k_proj.weight.T + attn.k_proj.bias).view(5, 2, 4, 4), attn.k_proj.qk_norm.norm)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).double().view(5, 2, 4, 4)
    logits = torch.einsum("tbhd,sbhd->bhts", q, k) / 2.0
    logits = logits.masked_fill(pad.view(2, 1, 1, 5), float("-inf"))
    y = torch.einsum("bhts,sbhd->tbhd", logits.softmax(-1), v).reshape(5, 2, 16)
    want = y @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_transformer_admin_qk_norm_flag_builds_every_attention_with_it():
    model = build("--qk-norm")
    attns = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    assert len(attns) == 6   # 2 encoder self, 2 decoder self, 2 cross
    assert all(isinstance(a.q_proj, QKNormLinear) and isinstance(a.k_proj, QKNormLinear) for a in attns)
    plain = build()
    assert not any(isinstance(m, QKNormLinear) for m in plain.modules())
    from fairseq_plugins.fold_checkpoint import fold_admin_model
    with pytest.raises(ValueError, match="qk-layernorm"):
        fold_admin_model(model)


class _StubModel(torch.nn.Module):
    """What a criterion asks of a fairseq model: normalized probabilities and targets."""

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0].float(), -1) if log_probs else F.softmax(net_output[0].float(), -1)

    def get_targets(self, sample, net_output):
        return sample["target"]


def _written_out(logits, target, pad, weight, eps=0.0):
    total = 0.0
    for row, y in zip(logits.double().reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()):
        if y == pad:
            continue
        lz = math.log(sum(math.exp(v) for v in row.tolist()))
        lp = [v - lz for v in row.tolist()]
        nll = -lp[y]
        smooth = -sum(lp) / len(lp)
        total += (1 - eps) * nll + eps * smooth + weight * lz * lz
    return total


@pytest.mark.parametrize("label_smoothing", [None, 0.1])
def test_zloss_criteria_match_the_formula_and_zero_is_stock(label_smoothing):
    torch.manual_seed(1)
    d = Dictionary()
    task = SimpleNamespace(target_dictionary=d)
    logits = torch.randn(2, 4, 9) * 3
    target = torch.randint(4, 9, (2, 4))
    target[1, 3] = d.pad()
    sample = {"target": target}
    model = _StubModel()
    for weight in (0.0, 1e-4, 0.5):
        if label_smoothing is None:
            crit = CrossEntropyZLoss(task, False, z_loss=weight)
            loss, _ = crit.compute_loss(model, (logits,), sample)
            eps = 0.0
        else:
            crit = LabelSmoothedCrossEntropyZLoss(task, False, label_smoothing, z_loss=weight)
            loss, _ = crit.compute_loss(model, (logits,), sample)
            eps = label_smoothing
        eps_i = eps / (9 - 1) * 9 if eps else 0.0  # fairseq's smoothing spreads eps/(V-1) over the vocabulary
        assert loss.item() == pytest.approx(_written_out(logits, target, d.pad(), weight, eps_i), rel=1e-5)
        if weight == 0.0:
            stock = (CrossEntropyZLoss.__mro__[2] if label_smoothing is None else
                     LabelSmoothedCrossEntropyZLoss.__mro__[2])
            ref = stock.compute_loss(crit, model, (logits,), sample)[0]
            assert torch.equal(loss, ref)


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    """(the binarized directory, the fairseq-preprocess run that makes it): the test runs it in its batch."""
    return lm_data_case(tmp_path_factory.mktemp("lm_zloss"), sizes=(120, 20, 20))


TINY_LM = ["--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "32",
           "--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
           "--decoder-attention-heads", "2", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "200",
           "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
           "--num-workers", "0", "--max-update", "3", "--no-epoch-checkpoints", "--no-save-optimizer-state",
           "--user-dir", PLUGINS_DIR, "--arch", "transformer_lm_admin"]


def _train_losses(log):
    return re.findall(r"\| loss ([\d.]+) \|", log)


@pytest.mark.slow
def test_fairseq_train_qk_norm_and_zloss(lm_corpus, tmp_path, capsys):
    lm_data, preprocess = lm_corpus
    # every fairseq-train run of this test in one process (fairseq's start-up paid once; each run seeds itself)
    good = [["--criterion", "cross_entropy", "--save-dir", tmp_path / "a"],
            ["--criterion", "cross_entropy_zloss", "--z-loss", "0", "--save-dir", tmp_path / "b"],
            ["--criterion", "cross_entropy_zloss", "--z-loss", "1e-4", "--qk-norm", "--save-dir", tmp_path / "c"]]
    # bad flags: one line naming the flag, exit 2, before the data loads
    bad = [[*flags, "--save-dir", tmp_path / "d"] for flags, _ in BAD_FLAGS]
    preprocessed, *runs = run_tools_batch([preprocess, *[("train", [lm_data, *TINY_LM, *args]) for args in good + bad]])
    check_run(preprocessed)
    stock, zero, both = (check_run(run).stdout for run in runs[:len(good)])
    runs = runs[len(good):]
    assert _train_losses(stock) and _train_losses(zero) == _train_losses(stock)   # z-loss 0: nothing changes
    assert "z_loss" in both and _train_losses(both) != _train_losses(stock)
    state = torch.load(tmp_path / "c" / "checkpoint_last.pt", weights_only=False)
    keys = [k for k in state["model"] if k.endswith("q_proj.qk_norm.norm.weight")]
    assert len(keys) == 2 and any(k.endswith("k_proj.qk_norm.norm.bias") for k in state["model"])
    from fairseq_plugins.fold_checkpoint import main as fold_main
    assert fold_main([str(tmp_path / "c" / "checkpoint_last.pt"), str(tmp_path / "folded.pt")]) == 2
    assert "trained with --qk-norm" in capsys.readouterr().err and not (tmp_path / "folded.pt").exists()
    for (flags, needle), run in zip(BAD_FLAGS, runs):
        last = run.stdout.strip().splitlines()[-1]
        assert run.returncode == 2 and "Traceback" not in run.stdout, (flags, run.stdout[-2000:])
        assert last.startswith("fairseq-train: error: " + needle), (flags, last)
        assert not any("loaded" in line and "examples" in line for line in run.stdout.splitlines()), flags
    assert not (tmp_path / "d").exists()


LS = ["--criterion", "label_smoothed_cross_entropy_zloss"]
BAD_FLAGS = [
    (["--criterion", "cross_entropy_zloss", "--z-loss", "-1"], "--z-loss must be a finite real number >= 0"),
    (LS + ["--label-smoothing", "1.5"], "--label-smoothing must be a finite real number in [0, 1], got 1.5"),
    (LS + ["--label-smoothing", "nan"], "--label-smoothing must be a finite real number in [0, 1], got nan"),
    (["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "-0.1"], "--label-smoothing"),
    (LS + ["--ignore-prefix-size", "-1"], "--ignore-prefix-size must be an integer >= 0"),
    (["--criterion", "cross_entropy_zloss", "--adaptive-softmax-cutoff", "10"], "--adaptive-softmax-cutoff"),
]


def _ns(criterion, **kw):
    return argparse.Namespace(criterion=criterion, **kw)


@pytest.mark.parametrize("args, flag", [
    (_ns("cross_entropy_zloss", z_loss=-1e-4), "--z-loss"),
    (_ns("cross_entropy_zloss", z_loss=float("inf")), "--z-loss"),
    (_ns("label_smoothed_cross_entropy_zloss", z_loss=1e-4, label_smoothing=1.5), "--label-smoothing"),
    (_ns("label_smoothed_cross_entropy_zloss", z_loss=1e-4, label_smoothing=float("nan")), "--label-smoothing"),
    (_ns("label_smoothed_cross_entropy", label_smoothing=-0.1), "--label-smoothing"),
    (_ns("label_smoothed_cross_entropy_zloss", label_smoothing=0.1, ignore_prefix_size=-1), "--ignore-prefix-size"),
    (_ns("cross_entropy_zloss", adaptive_softmax_cutoff="10,20"), "--adaptive-softmax-cutoff"),
])
def test_flag_checks_name_the_flag(args, flag):
    with pytest.raises(FlagError) as err:
        check_z_loss_flags(args)
    assert str(err.value).startswith(flag)


def test_good_and_unrelated_flags_pass():
    check_z_loss_flags(_ns("label_smoothed_cross_entropy_zloss", z_loss=0.0, label_smoothing=1.0, ignore_prefix_size=1))
    check_z_loss_flags(_ns("cross_entropy_zloss", z_loss=1e-4, adaptive_softmax_cutoff=None))
    check_z_loss_flags(_ns("cross_entropy", label_smoothing=1.5, z_loss=-1))  # flags its criterion does not read


def test_constructors_refuse_bad_values_before_anything_is_set_up():
    task = SimpleNamespace(target_dictionary=Dictionary())
    for kw, flag in ((dict(label_smoothing=1.5), "--label-smoothing"),
                     (dict(label_smoothing=-0.5), "--label-smoothing"),
                     (dict(label_smoothing=0.1, z_loss=-1.0), "--z-loss"),
                     (dict(label_smoothing=0.1, ignore_prefix_size=-2), "--ignore-prefix-size")):
        with pytest.raises(ValueError, match=flag):
            LabelSmoothedCrossEntropyZLoss(task, False, **kw)
    with pytest.raises(ValueError, match="--z-loss"):
        CrossEntropyZLoss(task, False, z_loss=float("nan"))


@pytest.mark.parametrize("criterion", ["ce", "ls"])
def test_an_all_padding_sample_adds_nothing_and_half_logits_are_scored_in_float32(criterion):
    d = Dictionary()
    task = SimpleNamespace(target_dictionary=d)
    crit = (CrossEntropyZLoss(task, False, z_loss=1.0) if criterion == "ce" else
            LabelSmoothedCrossEntropyZLoss(task, False, 0.1, z_loss=1.0))
    logits = (torch.randn(2, 3, 9) * 3).requires_grad_()
    pad = torch.full((2, 3), d.pad())
    loss = crit.compute_loss(_StubModel(), (logits,), {"target": pad})[0]
    assert loss.item() == 0.0
    grad, = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))
    big = (torch.randn(2, 3, 9) + 200).half()  # log(Z)^2 ~ 4e4 per position: past float16 when summed
    target = torch.randint(4, 9, (2, 3))
    term = crit._z_term(_StubModel(), (big,), {"target": target})
    want = big.double().logsumexp(-1).pow(2).sum()
    assert term.dtype == torch.float32 and term.item() == pytest.approx(want.item(), rel=1e-5)

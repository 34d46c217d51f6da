"""Mixture-of-experts FFNs in fairseq (``--moe-*``): the model surgery and the criteria in process, then the
real fairseq-train / -generate / -eval-lm on tiny data: logging, exact resume, fold refusal, bad flags."""

import argparse
import re
from types import SimpleNamespace

import pytest
import torch

import fairseq_plugins  # noqa: F401  (registers models and criteria)
import reinmax
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq_helpers import PLUGINS_DIR, check_run, lm_data_case, run_tools_batch, translation_data_case
from fairseq_plugins.criterions.moe import LabelSmoothedCrossEntropyMoE
from fairseq_plugins.models.transformer_admin import TransformerAdminModel

VOCAB = 20


def build(*extra, layers=2, dim=16):
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    TransformerAdminModel.add_args(parser)
    argv = ["--encoder-layers", str(layers), "--decoder-layers", str(layers), "--encoder-embed-dim", str(dim),
            "--decoder-embed-dim", str(dim), "--encoder-ffn-embed-dim", str(2 * dim),
            "--decoder-ffn-embed-dim", str(2 * dim), "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--share-all-embeddings"]
    args = parser.parse_args(argv + [str(a) for a in extra])
    args.arch = "transformer_admin"
    ARCH_CONFIG_REGISTRY["transformer_admin"](args)
    d = Dictionary()
    for i in range(VOCAB - len(d)):
        d.add_symbol(f"w{i}")
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    return TransformerAdminModel.build_model(args, task), task


def sample(bsz=3, length=6):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (bsz, length), generator=g)
    target = torch.randint(4, VOCAB, (bsz, length), generator=g)
    prev = torch.cat([torch.full((bsz, 1), 2), target[:, :-1]], 1)
    return {"net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), length),
                          "prev_output_tokens": prev},
            "target": target, "ntokens": bsz * length, "nsentences": bsz}


# ------------------------------------------------------------------ in process


def test_dense_by_default_and_every_ffn_routed_with_moe():
    dense, _ = build()
    assert not list(reinmax.moe_layers(dense))
    model, _ = build("--moe-experts", 3, "--moe-router", "switch")
    layers = list(model.encoder.layers) + list(model.decoder.layers)
    assert all(isinstance(layer.fc1, reinmax.RoutedFeedForward) for layer in layers)
    moe = layers[0].fc1
    assert moe.num_experts == 3 and moe.router_name == "switch" and tuple(moe.fc1_weight.shape) == (3, 32, 16)
    # a token's active FFN parameters equal the dense FFN's
    assert moe.fc1_weight[0].numel() + moe.fc2_weight[0].numel() == \
        dense.encoder.layers[0].fc1.weight.numel() + dense.encoder.layers[0].fc2.weight.numel()


def test_criterion_adds_the_weighted_balance_loss_and_logs_the_load():
    model, task = build("--moe-experts", 4, "--moe-balance-weight", 0.1, "--dropout", 0)
    task.target_dictionary = task.source_dictionary
    stock = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    moe = LabelSmoothedCrossEntropyMoE(task, sentence_avg=False, label_smoothing=0.1)
    torch.manual_seed(3)
    loss, size, log = moe(model, sample())
    torch.manual_seed(3)
    base, _, base_log = stock(model, sample())
    balances = [m.stats.balance_loss for m in reinmax.moe_layers(model)]
    assert len(balances) == 4 and all(1.0 <= float(b.detach()) <= 4.0 for b in balances)
    torch.testing.assert_close(loss, base + 0.1 * size * torch.stack(balances).sum())
    assert float(log["loss"]) == pytest.approx(float(base_log["loss"]))  # the logged loss stays the stock one
    loads = torch.stack([log[f"moe_load{i}"] for i in range(4)]) / size
    assert float(loads.sum()) == pytest.approx(1.0)
    model.eval()
    eval_loss, _, _ = moe(model, sample())
    stock_eval, _, _ = stock(model, sample())
    assert torch.equal(eval_loss, stock_eval)  # no balance term outside training


def test_deepnorm_initializes_every_expert():
    model, _ = build("--moe-experts", 2, "--admin-init", "deepnorm", layers=6, dim=32)
    moe = model.encoder.layers[0].fc1
    beta = 0.87 * (6 ** 4 * 6) ** (-1 / 16)  # DeepNet's encoder beta, N = M = 6
    for w in (moe.fc1_weight[0], moe.fc1_weight[1], moe.fc2_weight[1]):
        expected = beta * (2 / sum(w.shape)) ** 0.5  # xavier_normal with gain beta
        assert float(w.detach().std()) == pytest.approx(expected, rel=0.15)


def test_capacity_factor_beyond_the_experts_is_the_no_drop_model():
    """Regression: --moe-capacity-factor 1e308 overflowed (math.ceil of inf) in the first forward, after data loaded."""
    torch.manual_seed(0)
    plain, _ = build("--moe-experts", 3, "--moe-router", "switch", "--dropout", 0)
    huge, _ = build("--moe-experts", 3, "--moe-router", "switch", "--dropout", 0, "--moe-capacity-factor", 1e308)
    huge.load_state_dict(plain.state_dict())
    assert all(m.capacity_factor == 1e308 for m in reinmax.moe_layers(huge))
    net = sample()["net_input"]
    torch.testing.assert_close(huge(**net)[0], plain(**net)[0])
    assert all(float(m.stats.dropped) == 0.0 for m in reinmax.moe_layers(huge))


@pytest.mark.parametrize("seed", range(3))
def test_layerdrop_skipped_layers_add_nothing(seed):
    """Regression: with --decoder-layerdrop a skipped layer's stale balance loss was summed again; its graph had
    been freed by the previous backward ("Trying to backward through the graph a second time")."""
    model, task = build("--moe-experts", 2, "--moe-balance-weight", 0.1, "--dropout", 0, "--encoder-layerdrop", 0.5,
                        "--decoder-layerdrop", 0.5, layers=4)
    task.target_dictionary = task.source_dictionary
    stock = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    moe = LabelSmoothedCrossEntropyMoE(task, sentence_avg=False, label_smoothing=0.1)
    layers = list(reinmax.moe_layers(model))
    ran = set()
    for layer in layers:
        layer.register_forward_hook(lambda m, args, out: ran.add(id(m)))
    counts = set()
    for step in range(6):
        ran.clear()
        torch.manual_seed(100 * seed + step)
        loss, size, log = moe(model, sample())
        loss.backward()
        with_stats = [m for m in layers if m.stats is not None]
        assert {id(m) for m in with_stats} == ran
        counts.add(len(ran))
        torch.manual_seed(100 * seed + step)
        base, _, _ = stock(model, sample())
        expected = base + 0.1 * size * sum((m.stats.balance_loss for m in with_stats), torch.zeros(()))
        torch.testing.assert_close(loss.detach(), expected.detach())
        if with_stats:
            mean = torch.stack([m.stats.balance_loss for m in with_stats]).mean()
            torch.testing.assert_close(log["moe_balance"] / size, mean.detach())
        model.zero_grad()
    assert len(counts) > 1 and min(counts) < len(layers)  # layers were really skipped, in varying numbers


# ------------------------------------------------------------------ the real tools


TINY_LM = ["--task", "language_modeling", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
           "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
           "--decoder-attention-heads", "2", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "400",
           "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--num-workers", "0",
           "--no-epoch-checkpoints", "--arch", "transformer_lm_admin", "--user-dir", PLUGINS_DIR]


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    """(the binarized directory, the fairseq-preprocess run that makes it: the first case of ``lm_runs``)."""
    return lm_data_case(tmp_path_factory.mktemp("moe_lm"))


@pytest.fixture(scope="module")
def lm_data(lm_corpus, lm_runs):
    """The binarized corpus (made by ``lm_runs``' first case)."""
    return lm_corpus[0]


LM_MOE = ["--moe-experts", "4", "--moe-router", "sparsemixer", "--criterion", "cross_entropy_moe"]
LAYERDROP_MOE = ["--moe-experts", "2", "--moe-router", "switch", "--criterion", "cross_entropy_moe",
                 "--decoder-layers", "4", "--decoder-layerdrop", "0.5", "--moe-capacity-factor", "1e308"]
# the tests that read lm_runs stay on one worker under `pytest --dist loadgroup` (make test): one batch
LM_RUNS = pytest.mark.xdist_group("fairseq_moe_lm_runs")


@pytest.fixture(scope="module")
def lm_runs(lm_corpus, tmp_path_factory):
    """fairseq-preprocess, then every single-process fairseq run of the language-model tests below, in ONE process
    (``run_tools_batch``: fairseq's start-up is paid once; each run seeds itself from --seed): {name: (result, its
    directory)}."""
    lm_data, preprocess = lm_corpus
    root = tmp_path_factory.mktemp("moe_lm_runs")
    runs = {  # name: (tool, args, directory)
        "straight": ("train", [*LM_MOE, "--max-update", "8"], "a"),
        "first_half": ("train", [*LM_MOE, "--max-update", "4"], "b"),
        "resumed": ("train", [*LM_MOE, "--max-update", "8"], "b"),
        "dense": ("train", ["--max-update", "1"], "c"),
        "layerdrop": ("train", [*LAYERDROP_MOE, "--max-update", "6", "--log-interval", "1"], "layerdrop"),
        "bad_criterion": ("train", ["--moe-experts", "2", "--criterion", "cross_entropy"], "bad_criterion"),
        "tiny_tau": ("train", ["--moe-experts", "2", "--moe-router", "reinmax", "--moe-tau", "1e-40",
                               "--criterion", "cross_entropy_moe"], "tiny_tau"),
        "ep_not_dividing": ("train", ["--moe-experts", "4", "--moe-expert-parallel-size", "2",
                                      "--criterion", "cross_entropy_moe"], "ep_not_dividing"),
    }
    cases = [(tool, [lm_data, *TINY_LM, *args, "--save-dir", root / d]) for tool, args, d in runs.values()]
    cases.append(("eval-lm", [lm_data, "--path", root / "a" / "checkpoint_last.pt", "--user-dir", PLUGINS_DIR,
                              "--cpu", "--max-tokens", "400", "--num-workers", "0", "--sample-break-mode", "eos",
                              "--tokens-per-sample", "64", "--gen-subset", "valid"]))
    dirs = [root / d for _, _, d in runs.values()] + [None]
    preprocessed, *results = run_tools_batch([preprocess, *cases])
    check_run(preprocessed)
    return dict(zip([*runs, "eval_lm"], zip(results, dirs)))


@pytest.mark.slow
@LM_RUNS
def test_lm_trains_logs_resumes_exactly_scores_and_refuses_folding(lm_runs, tmp_path):
    straight = check_run(lm_runs["straight"][0]).stdout
    assert re.search(r"train \| .*moe_load0 [\d.]+ \| moe_load1 .*moe_load3 [\d.]+ \| moe_balance [\d.]+", straight)
    check_run(lm_runs["first_half"][0])
    resumed = check_run(lm_runs["resumed"][0]).stdout
    assert "Loaded checkpoint" in resumed and "num_updates 8" in resumed
    a_dir, b_dir = lm_runs["straight"][1], lm_runs["resumed"][1]
    a = torch.load(a_dir / "checkpoint_last.pt", weights_only=False)["model"]
    b = torch.load(b_dir / "checkpoint_last.pt", weights_only=False)["model"]
    assert a["decoder.layers.0.fc1.router.weight"].shape == (4, 32)
    for key in a:  # the routing samples, the experts and the router continue exactly
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    out = check_run(lm_runs["eval_lm"][0]).stdout
    assert re.search(r"Perplexity: [\d.]+", out)

    from fairseq_plugins.fold_checkpoint import main as fold_main
    proc, c_dir = lm_runs["dense"]
    assert proc.returncode == 0  # dense, for contrast: folds
    assert fold_main([str(c_dir / "checkpoint_last.pt"), str(tmp_path / "dense.pt")]) == 0
    assert fold_main([str(a_dir / "checkpoint_last.pt"), str(tmp_path / "moe.pt")]) == 2
    assert not (tmp_path / "moe.pt").exists()


@pytest.mark.slow
def test_translation_with_experts_trains_and_generates(tmp_path_factory, tmp_path):
    router = "reinmax"  # the dense path; the LM test runs a sparse one
    data, preprocess = translation_data_case(tmp_path_factory.mktemp(f"moe_mt_{router}"), sizes=(200, 30, 30))
    args = [data.bin, "--user-dir", PLUGINS_DIR, "--arch", "transformer_admin", "--encoder-layers", "2",
            "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--share-all-embeddings", "--optimizer", "adam", "--lr", "1e-3",
            "--max-tokens", "500", "--max-update", "6", "--cpu", "--no-progress-bar", "--log-format", "simple",
            "--num-workers", "0", "--no-epoch-checkpoints", "--save-dir", tmp_path,
            "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", "0.1",
            "--moe-experts", "2", "--moe-router", router, "--moe-tau", "1.3"]
    _, train, gen = map(check_run, run_tools_batch([  # one fairseq process
        preprocess,
        ("train", args),
        ("generate", [data.bin, "--path", tmp_path / "checkpoint_last.pt", "--user-dir", PLUGINS_DIR,
                      "--cpu", "--beam", "2", "--max-tokens", "500", "--num-workers", "0"])]))
    log, gen = train.stdout, gen.stdout
    assert "moe_balance" in log and "num_updates 6" in log
    assert len(re.findall(r"^H-\d+\t", gen, flags=re.M)) == 30  # every test sentence decoded


#: bad values of the --moe-* flags themselves: refused whether or not --moe-experts turns the feature on
BAD_MOE_VALUES = [
    (dict(moe_experts=-1), "--moe-experts must be an integer >= 0, got -1"),
    (dict(moe_experts=2.5), "--moe-experts must be an integer >= 0, got 2.5"),
    (dict(moe_tau=0.0), "--moe-tau must be a finite real number > 0, got 0.0"),
    (dict(moe_tau=-1.0), "--moe-tau must be a finite real number > 0, got -1.0"),
    (dict(moe_balance_weight=float("nan")), "--moe-balance-weight must be a finite real number >= 0, got nan"),
    (dict(moe_capacity_factor=-1.0), "--moe-capacity-factor must be a finite real number >= 0"),
    (dict(moe_router="reinmax", moe_capacity_factor=1.25), "--moe-capacity-factor must be 0 with --moe-router reinmax"),
    (dict(moe_router="reinmax", moe_tau=1e-40), "--moe-tau must be a finite real number >= 1e-30 with --moe-router reinmax"),
    (dict(moe_router="gumbel_softmax", moe_tau=1e-31), "--moe-tau must be a finite real number >= 1e-30 with --moe-router"),
    (dict(moe_capacity_factor=float("inf")), "--moe-capacity-factor must be a finite real number >= 0, got inf"),
]
#: settings that are wrong only together with experts (the dense model accepts them)
BAD_WITH_EXPERTS = [
    (dict(scale_fc=True), "--scale-fc is not accepted with --moe-experts"),
    (dict(criterion="label_smoothed_cross_entropy"), "--criterion label_smoothed_cross_entropy ignores"),
]


@pytest.mark.parametrize("flags, message", BAD_MOE_VALUES + BAD_WITH_EXPERTS)
@pytest.mark.parametrize("experts", [0, 2])
def test_bad_moe_flags_are_refused(flags, message, experts):
    from fairseq_plugins.flags import FlagError
    from fairseq_plugins.moe_ffn import check_moe_args

    args = argparse.Namespace(**{"moe_experts": experts, **flags})
    if experts == 0 and (flags, message) in BAD_WITH_EXPERTS:
        check_moe_args(args)  # the dense model: the setting concerns the experts only
        return
    with pytest.raises(FlagError, match=re.escape(message)):
        check_moe_args(args)


@pytest.mark.slow
@LM_RUNS
def test_bad_moe_flag_ends_fairseq_train_with_one_line(lm_runs):
    proc = lm_runs["bad_criterion"][0]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "fairseq-train: error: --criterion cross_entropy ignores the load-balancing loss of --moe-experts; "
        "use --criterion cross_entropy_moe")


@pytest.mark.slow
@LM_RUNS
def test_layerdrop_and_a_huge_capacity_factor_train_with_the_real_tool(lm_runs):
    """Regression: --decoder-layerdrop with cross_entropy_moe died in the second update's backward, and
    --moe-capacity-factor 1e308 with an OverflowError after the data had loaded."""
    out = check_run(lm_runs["layerdrop"][0]).stdout  # LAYERDROP_MOE, 6 updates
    assert "num_updates 6" in out and re.search(r"moe_balance [\d.]+", out)
    assert re.search(r"moe_dropped 0(\.0+)? ", out)


@pytest.mark.slow
@LM_RUNS
def test_tau_below_the_floor_ends_fairseq_train_with_one_line(lm_runs):
    proc = lm_runs["tiny_tau"][0]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: --moe-tau must be a finite real number >= 1e-30"), last
    assert "loaded" not in proc.stdout.lower()  # refused before any data is read


# ------------------------------------------------------------------ expert parallelism (--moe-expert-parallel-size)

#: (flags, message): refused at argument parsing, before any process group forms or data loads
BAD_EXPERT_PARALLEL = [
    (dict(moe_expert_parallel_size=0), "--moe-expert-parallel-size must be an integer >= 1, got 0"),
    (dict(moe_expert_parallel_size=3), "--moe-expert-parallel-size 3 must divide --moe-experts 4"),
    (dict(moe_experts=0), "--moe-expert-parallel-size 2 needs --moe-experts"),
    (dict(moe_router="reinmax"), "--moe-expert-parallel-size 2 is not accepted with --moe-router reinmax"),
    (dict(distributed_world_size=3), "--moe-expert-parallel-size 2 must divide the world size (3 ranks"),
    (dict(ddp_backend="legacy_ddp"), "--moe-expert-parallel-size 2 needs --ddp-backend c10d or pytorch_ddp"),
    (dict(ddp_backend="fully_sharded"), "got --ddp-backend fully_sharded"),
    (dict(zero_sharding="os"), "--moe-expert-parallel-size 2 is not accepted with --zero-sharding os"),
    (dict(distributed_backend="mpi"), "--moe-expert-parallel-size 2 needs --distributed-backend gloo or nccl"),
    (dict(decoder_layerdrop=0.1), "--moe-expert-parallel-size 2 is not accepted with --decoder-layerdrop > 0"),
    (dict(encoder_layerdrop=0.2), "--moe-expert-parallel-size 2 is not accepted with --encoder-layerdrop > 0"),
    (dict(fp16=True), "--moe-expert-parallel-size 2 is not accepted with --fp16"),
    (dict(bf16=True), "--moe-expert-parallel-size 2 is not accepted with --bf16"),
    (dict(memory_efficient_fp16=True), "is not accepted with --memory-efficient-fp16"),
    (dict(amp=True), "--moe-expert-parallel-size 2 is not accepted with --amp"),
]


@pytest.mark.parametrize("flags, message", BAD_EXPERT_PARALLEL)
def test_bad_expert_parallel_combinations_are_refused(flags, message, monkeypatch):
    from fairseq_plugins.flags import FlagError
    from fairseq_plugins.moe_ffn import check_moe_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    good = dict(moe_experts=4, moe_router="switch", moe_expert_parallel_size=2, distributed_world_size=4,
                ddp_backend="c10d", zero_sharding="none", distributed_backend="gloo", criterion="cross_entropy_moe")
    check_moe_args(argparse.Namespace(**good))  # the good combination passes
    with pytest.raises(FlagError, match=re.escape(message)):
        check_moe_args(argparse.Namespace(**{**good, **flags}))


def test_a_model_configuration_without_the_world_size_is_accepted(monkeypatch):
    """fairseq checks the model's own configuration again when it builds the model (and a checkpoint's, in one
    process for fairseq-generate): that configuration has no world size, which then cannot be refused."""
    from fairseq_plugins.moe_ffn import check_moe_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_moe_args(argparse.Namespace(moe_experts=4, moe_router="switch", moe_expert_parallel_size=2))


@pytest.mark.slow
@LM_RUNS
def test_expert_parallel_size_not_dividing_the_world_is_one_line_before_data(lm_runs):
    proc = lm_runs["ep_not_dividing"][0]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: --moe-expert-parallel-size 2 must divide the world size "
                           "(1 ranks"), last
    assert "loaded" not in proc.stdout.lower()


@pytest.mark.slow
@LM_RUNS  # lm_data comes from lm_runs' batch
def test_expert_parallel_on_two_cpu_ranks_resumes_and_equals_data_parallel(lm_data, tmp_path):
    """c10d on 2 gloo ranks, each holding 2 of the 4 experts: resumed from the data-parallel run's checkpoint at
    update 2 (every expert, in one file) and trained to 4, saving at update 3 on the way (the save gathers every
    expert and its optimizer state and must leave the live ones alone), it equals the plain data-parallel run
    (every expert on both ranks) of 4 updates: model and optimizer state, and its checkpoint holds every expert
    like the data-parallel one (so it loads at any P, or in one process). Two launches: the expert-parallel
    checkpoint equals the data-parallel one, which the expert-parallel run resumes from."""
    from fairseq_helpers import run_ranks

    moe = [lm_data, *TINY_LM, "--moe-experts", "4", "--moe-router", "sparsemixer", "--criterion", "cross_entropy_moe",
           "--disable-validation", "--clip-norm", "0.5"]
    runs = {}
    for tag, extra in (("dp", ["--save-interval-updates", "2"]),
                       ("ep", ["--moe-expert-parallel-size", "2", "--save-interval-updates", "1",
                               "--restore-file", tmp_path / "dp" / "checkpoint_1_2.pt"])):
        codes, logs = run_ranks([[*moe, "--max-update", 4, "--save-dir", tmp_path / tag, *extra]] * 2,
                                tmp_path, timeout=300, ddp_backend="c10d")
        assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        runs[tag] = logs[0]
    assert "Loaded checkpoint" in runs["ep"] and "(epoch 1 @ 2 updates)" in runs["ep"]
    midway = torch.load(tmp_path / "ep" / "checkpoint_1_3.pt", weights_only=False)  # it saved on the way
    assert midway["model"]["decoder.layers.0.fc1.fc1_weight"].shape == (4, 64, 32)
    ep = torch.load(tmp_path / "ep" / "checkpoint_last.pt", weights_only=False)
    dp = torch.load(tmp_path / "dp" / "checkpoint_last.pt", weights_only=False)
    assert ep["optimizer_history"][-1]["num_updates"] == 4
    assert ep["model"]["decoder.layers.0.fc1.fc1_weight"].shape == (4, 64, 32)  # every expert, gathered
    assert set(ep["model"]) == set(dp["model"])
    for key in dp["model"]:
        torch.testing.assert_close(ep["model"][key], dp["model"][key], rtol=0, atol=2e-5, msg=key)
    assert set(ep["last_optimizer_state"]["state"]) == set(dp["last_optimizer_state"]["state"])
    for index, state in dp["last_optimizer_state"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(ep["last_optimizer_state"]["state"][index][name], value, rtol=0, atol=2e-5)
    # the logged gradient norm counts every expert (the clipping is the same on both ranks and as without experts
    # split): the same as the data-parallel run's
    norms = [re.findall(r"gnorm ([\d.]+)", runs[k]) for k in ("ep", "dp")]
    assert norms[0] and norms[0][-1] == norms[1][-1]

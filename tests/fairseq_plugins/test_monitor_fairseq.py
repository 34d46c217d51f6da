"""``fairseq-train --stability-monitor DIR``: the flags, the layer descriptions, and real training runs."""

import argparse
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

import fairseq_plugins  # noqa: F401  (installs the repairs)
from fairseq_plugins import monitor as fm
from fairseq_plugins.flags import FlagError
from fairseq_plugins.repairs import _wrap, train_step, training_flags
from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, TINY_TRANSFORMER_ARGS, free_port, make_lm_data, run_tool, tool_env
from stability_toolbox import StabilityMonitor


def _args(**kw):
    return argparse.Namespace(**{"stability_monitor": None, "stability_monitor_interval": fm.DEFAULT_INTERVAL, **kw})


def test_flag_checks_name_the_flag(tmp_path):
    for bad, flag in [(_args(stability_monitor=str(tmp_path), stability_monitor_interval="0"),
                       "--stability-monitor-interval"),
                      (_args(stability_monitor=str(tmp_path), stability_monitor_interval="x"),
                       "--stability-monitor-interval"),
                      (_args(stability_monitor=str(tmp_path / "no" / "such")), "--stability-monitor"),
                      (_args(stability_monitor=""), "--stability-monitor"),
                      (_args(stability_monitor_interval="5"), "--stability-monitor-interval")]:
        with pytest.raises(FlagError, match=flag):
            fm.check_monitor_flags(bad)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FlagError, match="not a directory"):
        fm.check_monitor_flags(_args(stability_monitor=str(f)))
    environ = dict(os.environ)
    args = _args(stability_monitor=os.path.relpath(tmp_path / "mon"), stability_monitor_interval="7")
    fm.check_monitor_flags(args)  # the parsed values are written back on the arguments
    assert (args.stability_monitor, args.stability_monitor_interval) == (str((tmp_path / "mon").resolve()), 7)
    fm.check_monitor_flags(args)  # fairseq checks a model's configuration again: the parsed values pass
    fm.check_monitor_flags(_args())
    assert dict(os.environ) == environ  # nothing goes through the environment


@pytest.mark.parametrize("value", ["1", "7", "0", "-3", "1.5", "x", "1e3"])
def test_the_interval_bound_is_the_librarys(tmp_path, value):
    """--stability-monitor-interval accepts exactly the integers StabilityMonitor's ``every`` accepts (the library
    owns the bound; the plugin only parses the command line's string as a base-10 integer and names the flag)."""
    try:
        StabilityMonitor(torch.nn.LayerNorm(2), every=int(value, 10), signal_rules=[]).remove()
        library = None
    except ValueError as err:  # int() of a non-integer string, or the library's bound
        library = str(err)
    args = _args(stability_monitor=str(tmp_path / "m"), stability_monitor_interval=value)
    if library is None:
        fm.check_monitor_flags(args)
        assert args.stability_monitor_interval == int(value)
    else:
        with pytest.raises(FlagError, match=r"^--stability-monitor-interval must be an integer >= 1, got"):
            fm.check_monitor_flags(args)


def test_parser_has_the_flags_and_train_step_is_wrapped_once():
    from fairseq import options
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    assert any("--stability-monitor-interval" in a.option_strings for a in parser._actions)
    assert list(train_step._WRAPPERS) == ["stability_monitor", "stability_guard"]  # the monitor's outermost
    training_flags.install()  # idempotent
    train_step.install()
    assert _wrap.wrapped_by(Trainer.train_step) == {"fairseq_plugins.repairs.train_step._wrap_train_step"}
    assert not _wrap.wrapped_by(Trainer.train_step.__wrapped__)
    parser = options.get_training_parser()
    assert sum("--stability-monitor-interval" in a.option_strings for a in parser._actions) == 1


def test_the_flags_travel_on_fairseqs_configuration(tmp_path):
    """A dataclass-configured model (listops_tree: fairseq keeps no Namespace of the command line): the checked
    flags reach ``cfg.common`` through fairseq's own conversion, and the settings are read from there."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(tmp_path), "--task", "listops", "--arch", "listops_tree",
                                                "--criterion", "listops_cross_entropy", "--optimizer", "adam",
                                                "--stability-monitor", str(tmp_path / "mon"),
                                                "--stability-monitor-interval", "3"])
    cfg = convert_namespace_to_omegaconf(args)
    assert not isinstance(cfg.model, argparse.Namespace) and "stability_monitor" not in cfg.model
    assert fm.monitor_settings(cfg) == {"dir": str((tmp_path / "mon").resolve()), "interval": 3}
    assert fm.monitor_settings(OmegaConf.create({"common": {"seed": 1}})) is None  # a configuration without it


@pytest.mark.parametrize("pre_ln", [False, True])
def test_fairseq_layers_are_described(pre_ln):
    """A stock fairseq transformer (Post-LN or Pre-LN) is read through the fold descriptions, and the
    ratio of its first encoder sublayer matches a hand computation."""
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 16, 32, 2
    cfg.encoder.normalize_before = pre_ln
    cfg.dropout = cfg.attention_dropout = 0.0
    torch.manual_seed(0)
    stack = torch.nn.ModuleList([TransformerEncoderLayerBase(cfg) for _ in range(2)])

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = stack

        def forward(self, x):
            for layer in self.layers:
                x = layer(x, None)
            return x

    model = Enc()
    mon = StabilityMonitor(model, every=1)
    assert mon.mechanism == "layer descriptions"
    assert mon.sites[:2] == ["layers.0.self_attn_layer_norm", "layers.0.final_layer_norm"]
    x = torch.randn(5, 3, 16)  # time-first, as fairseq
    with mon.step():
        model(x).sum().backward()
    layer = model.layers[0]
    with torch.no_grad():
        h = layer.self_attn_layer_norm(x) if pre_ln else x
        f, _ = layer.self_attn(h, h, h, need_weights=False)
        s = x + f
        q = layer.self_attn.q_proj(h).view(5, 3, 2, 8).permute(1, 2, 0, 3)
        k = layer.self_attn.k_proj(h).view(5, 3, 2, 8).permute(1, 2, 0, 3)
        logit = (q @ k.transpose(-1, -2)).abs().max().item() / 8 ** 0.5
    rec = mon.history[0]["quantities"]
    want = (f.var(unbiased=False) / s.var(unbiased=False)).item()
    assert rec["beta"]["layers.0.self_attn_layer_norm"] == pytest.approx(want, rel=1e-5)
    assert rec["attn_logit_max"]["layers.0.self_attn"] == pytest.approx(logit, rel=1e-5)
    mon.close()


@pytest.mark.slow
def test_fairseq_train_bad_interval_is_one_line_exit_2(tiny_translation_data, tmp_path):
    proc = run_tool("train", tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *TINY_TRANSFORMER_ARGS,
                    "--max-update", "1", "--no-save", "--stability-monitor", tmp_path / "mon",
                    "--stability-monitor-interval", "0", check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stdout.splitlines() if "error:" in x]
    assert lines == ["fairseq-train: error: --stability-monitor-interval must be an integer >= 1, got 0"], proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", [["--arch", "transformer"], ["--arch", "transformer_admin"],
                                  ["--arch", "transformer", "--encoder-normalize-before",
                                   "--decoder-normalize-before"]], ids=["post_ln", "admin", "pre_ln"])
def test_fairseq_train_writes_under_dir(tiny_translation_data, tmp_path, arch):
    mon_dir = tmp_path / "mon"
    args = [a for a in TINY_TRANSFORMER_ARGS]
    args[args.index("--arch") + 1] = arch[1]
    proc = run_tool("train", tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *args, *arch[2:],
                    "--max-update", "6", "--no-save", "--stability-monitor", mon_dir,
                    "--stability-monitor-interval", "2")
    assert "stability monitor: 10 sublayers via" in proc.stdout  # 2 x 2 encoder + 2 x 3 decoder
    records = [json.loads(x) for x in (mon_dir / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    q = records[-1]["quantities"]
    assert len(q["beta"]) == 10 and all(0 <= v <= 1.5 for v in q["beta"].values())
    assert q["grad_norm"]["encoder.layers.0"] > 0 and q["update_ratio"]["decoder.layers.1"] > 0
    assert len(q["attn_logit_max"]) == 2 * 1 + 2 * 2  # encoder self, decoder self + cross
    assert records[-1]["loss"] > 0
    # the output logits reach the monitor (feed_output_logits): log Z of a (batch, time, vocabulary) output
    assert all(r["log_z_rms"] >= abs(r["log_z"]) > 0 for r in records)
    assert (mon_dir / "summary.md").exists() and (mon_dir / "heatmap_beta.png").exists()
    assert any((mon_dir / "tb").iterdir())


def test_output_logits_of_a_fairseq_style_model_reach_the_monitor():
    """feed_output_logits: the (logits, extra) output of a training forward on a logged update gives log Z
    (written out: mean and RMS over positions of logsumexp); evaluation passes are left out."""
    torch.manual_seed(0)

    class LM(torch.nn.Module):  # a fairseq decoder's output: (logits (batch, time, vocabulary), extra)
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                                                batch_first=True)])
            self.out = torch.nn.Linear(8, 7)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.out(x), {"attn": None}

    model = LM()
    mon = StabilityMonitor(model, every=2)
    handle = fm.feed_output_logits(model, mon)
    xs = [torch.randn(2, 3, 8) for _ in range(3)]
    seen = []
    for x in xs:
        with mon.step():
            logits, _ = model(x)
            logits.sum().backward()
            model.eval()
            model(torch.randn(2, 3, 8))  # an evaluation pass in between: not observed
            model.train()
        seen.append(logits.detach())
    lz = [v for row in seen[0].logsumexp(-1).tolist() for v in row]
    rec = mon.history[0]
    assert rec["log_z"] == pytest.approx(sum(lz) / len(lz), rel=1e-5)
    assert rec["log_z_rms"] == pytest.approx((sum(v * v for v in lz) / len(lz)) ** 0.5, rel=1e-5)
    assert [r["step"] for r in mon.history] == [0, 2] and "log_z" in mon.history[1]
    handle.remove()
    mon.close()


#: fairseq-train with fairseq's own spawning: distributed_utils.call_main starts min(GPUs, world size) ranks with
#: torch.multiprocessing.spawn and hands each the configuration; on a CPU machine the driver reports as many
#: devices as ranks so that fairseq spawns them (the spawned ranks do not see this: they run on the CPU, gloo)
_SPAWNING_TRAIN = r"""
import sys, torch
ranks = int(sys.argv[1])
torch.cuda.device_count = lambda: ranks
from fairseq_cli.train import cli_main
sys.argv = ["fairseq-train", *sys.argv[2:]]
cli_main()
"""


@pytest.mark.slow
def test_spawned_ranks_of_a_dataclass_model_get_the_flags_from_fairseqs_configuration(tmp_path):
    """Two ranks spawned by fairseq itself, a dataclass-configured model (``transformer_lm_admin_deep``: fairseq
    keeps no Namespace of the command line, and applies the --arch function and the flag checks to the model's
    configuration again when it builds it): both ranks monitor (``DIR/rank<R>``) and guard with the flags given,
    which reached them on the configuration; the environment holds none of them."""
    import subprocess
    import sys

    data = make_lm_data(tmp_path / "lm", sizes=(60, 10, 10))
    mon = tmp_path / "mon"
    args = [data, "--user-dir", PLUGINS_DIR, "--task", "language_modeling", "--sample-break-mode", "eos",
            "--tokens-per-sample", "32", "--arch", "transformer_lm_admin_deep", "--decoder-layers", "2",
            "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
            "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "200", "--cpu", "--seed", "1",
            "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", "--num-workers", "0",
            "--max-update", "4", "--no-save", "--stability-monitor", mon, "--stability-monitor-interval", "2",
            "--stability-guard", "--stability-guard-snapshot-every", "3",
            "--distributed-world-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    env = {k: v for k, v in tool_env().items() if not k.startswith("FAIRSEQ_STABILITY")}
    proc = subprocess.run([sys.executable, "-c", _SPAWNING_TRAIN, "2", *map(str, args)], cwd=REPO_ROOT, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "distributed init (rank 1)" in proc.stdout  # fairseq spawned the second rank
    assert "stability monitor: 4 sublayers via" in proc.stdout and "stability guard: on Adam, snapshots every 3" \
        in proc.stdout
    for rank in (0, 1):
        records = [json.loads(x) for x in (mon / f"rank{rank}" / "monitor.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 2], rank
        assert len(records[-1]["quantities"]["beta"]) == 4
    assert not any(k.startswith("FAIRSEQ_STABILITY") for k in os.environ)


class _StepOnlyTrainer:
    """What `monitored_step` reads of a fairseq Trainer (its update counter and the model) around a real training
    step of a small LM: forward, backward, the gradients scaled by ``grad_scale(update)`` (as fairseq's
    normalization and clipping change them in place), an Adam step; the logging output's loss is ``loss(update)``."""

    def __init__(self, grad_scale, loss):
        torch.manual_seed(0)
        from admin_torch import make_stack

        self.model = torch.nn.Sequential(torch.nn.Embedding(11, 8), make_stack("pre_ln", depth=2, dim=8, heads=2,
                                                                               seed=0, causal=True),
                                         torch.nn.Linear(8, 11))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.grad_scale, self.loss, self.updates = grad_scale, loss, 0
        self.data = torch.Generator().manual_seed(1)

    def get_num_updates(self):
        return self.updates

    def train_step(self, samples, raise_oom=False):
        self.opt.zero_grad()  # fairseq zeroes at the start of its step: the gradients outlive it
        x = torch.randint(0, 11, (2, 5), generator=self.data)
        torch.nn.functional.cross_entropy(self.model(x).reshape(-1, 11), x.reshape(-1)).backward()
        for p in self.model.parameters():
            p.grad.mul_(self.grad_scale(self.updates))
        self.opt.step()
        out = {"loss": self.loss(self.updates)}
        self.updates += 1
        return out


def _collapse_rules():
    from stability_toolbox import SignalRule

    return [SignalRule("grad_rms_eps_min", 4.0, "falling", baseline=10, lag=2, smooth=1, persist=2, start=5),
            SignalRule("loss", 2.0, "rising", baseline=10, lag=2, smooth=1, persist=2, start=5)]


@pytest.mark.parametrize("signal, at", [("grad_rms_eps_min", 30), ("loss", 40)])
def test_the_per_update_rules_run_between_logged_updates_as_in_a_plain_loop(signal, at):
    """`monitored_step` hands every update (not only the logged ones) to the per-update rules: the same warnings,
    at the same updates, as the monitor around the same steps in a plain loop."""
    grad_scale = (lambda u: 1e-3 if u >= at else 1.0) if signal == "grad_rms_eps_min" else (lambda u: 1.0)
    loss = (lambda u: 5.0 if u >= at else 1.0) if signal == "loss" else (lambda u: 1.0)
    warned = []
    for loop in ("fairseq", "plain"):
        trainer = _StepOnlyTrainer(grad_scale, loss)
        mon = StabilityMonitor(trainer.model, every=1000, signal_rules=_collapse_rules())
        for _ in range(60):
            if loop == "fairseq":
                trainer._stability_monitor = mon
                fm.monitored_step(trainer, trainer.train_step, [])
            else:
                mon.begin_step(trainer.get_num_updates())
                out = trainer.train_step([])
                mon.capture_grads()
                mon.end_step(out["loss"])
        mon.close()
        warned.append([(w["signal"], w["update"]) for w in mon.warnings if "signal" in w])
    assert warned[0] == warned[1]
    assert [s for s, _ in warned[0]] == [signal] and at <= warned[0][0][1] <= at + 5, warned

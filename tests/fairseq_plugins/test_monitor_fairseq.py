"""``fairseq-train --stability-monitor DIR``: the flags, the layer descriptions, and real training runs."""

import argparse
import json

import pytest
import torch

import fairseq_plugins  # noqa: F401  (installs the repairs)
from fairseq_plugins import monitor as fm
from fairseq_plugins.flags import FlagError
from fairseq_plugins.repairs import monitor_flags, monitor_train_step
from fairseq_helpers import PLUGINS_DIR, TINY_TRANSFORMER_ARGS, run_tool
from stability_toolbox import StabilityMonitor


def _args(**kw):
    return argparse.Namespace(**{"stability_monitor": None, "stability_monitor_interval": fm.DEFAULT_INTERVAL, **kw})


def test_flag_checks_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV, raising=False)
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
    fm.check_monitor_flags(_args(stability_monitor=str(tmp_path / "mon"), stability_monitor_interval="7"))
    assert json.loads(__import__("os").environ[fm.ENV])["interval"] == 7
    fm.check_monitor_flags(_args())
    assert fm.ENV not in __import__("os").environ


def test_parser_has_the_flags_and_train_step_is_wrapped_once():
    from fairseq import options
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    assert any("--stability-monitor-interval" in a.option_strings for a in parser._actions)
    assert Trainer.train_step._stability_monitor
    monitor_flags.install()  # idempotent
    monitor_train_step.install()
    assert not getattr(Trainer.train_step.__wrapped__, "_stability_monitor", False)
    parser = options.get_training_parser()
    assert sum("--stability-monitor-interval" in a.option_strings for a in parser._actions) == 1


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

"""benchmarks.stability_grid: the separation and failure rules, the LR sensitivity formula, and a real
(tiny) run that is saved once and skipped when the sweep is run again."""

import json
import math
from argparse import Namespace

import pytest

from benchmarks import stability_grid as sg


def test_separation_is_the_first_update_past_five_percent():
    ref = [5.0] * 40
    run = [5.0] * 20 + [5.0 * 1.2] * 20
    # smoothed over 10 updates: the mean passes 5.25 once 3 of the 10 are 6.0 (5.3) -> update 22
    assert sg.separation(run, ref) == 22
    assert sg.separation(ref, ref) is None
    assert sg.separation([float("nan")] * 15, [5.0] * 15) == 10   # non-finite counts as diverged


def _fake_run(work, name, group, variant, role, seed, valid, losses, hist):
    d = work / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"group": group, "variant": variant, "role": role, "seed": seed,
                                               "valid_loss": valid, "losses": losses}))
    (d / "monitor.jsonl").write_text("\n".join(json.dumps(h) for h in hist) + "\n")


def test_judge_counts_hits_lead_and_false_alarms(tmp_path):
    quiet = [{"step": 10 * i, "quantities": {"grad_ratio": {"a": 0.5, "b": 0.5}}} for i in range(6)]
    falling = [{"step": 10 * i, "quantities": {"grad_ratio": {"a": v, "b": v}}}
               for i, v in enumerate([0.5, 0.4, 0.1, 0.02, 0.004, 0.001])]
    good = [4.0] * 60
    bad = [4.0] * 35 + [6.0] * 25
    _fake_run(tmp_path, "deep_postln__admin__s1", "deep_postln", "admin", "remedy", 1, 3.6, good, quiet)
    _fake_run(tmp_path, "deep_postln__post_ln__s1", "deep_postln", "post_ln", "candidate", 1, 5.0, bad, falling)
    _fake_run(tmp_path, "deep_postln__pre_ln__s1", "deep_postln", "pre_ln", "control", 1, 3.7, good, falling)
    rows = {r["variant"]: r for r in sg.judge_grid(tmp_path)}
    post = rows["post_ln"]
    # grad_ratio falls >= 3x per log to <= 0.01 in 2 rows at the 5th log (step 40); loss separates at 36
    assert post["failed"] and post["first_warning"] == 40 and post["separation"] == 36 and post["lead"] == -4
    assert not rows["pre_ln"]["failed"] and rows["pre_ln"]["first_warning"] == 40   # a false alarm
    (s,) = [x for x in sg.summarize_grid(list(rows.values())) if x["mechanism"] == "deep_postln"]
    assert (s["runs"], s["failed"], s["hits"], s["warned_late"], s["false_alarms"]) == (3, 1, 0, 1, 1)
    assert sg.summarize_grid(list(rows.values()))[-1]["runs"] == 3   # the "all" row


def test_lr_sensitivity_is_wortsmans_formula(tmp_path):
    init = math.log(sg.VOCAB)
    for lr, v in ((1e-3, 4.0), (1e-2, 3.5), (1e-1, float("nan"))):
        d = tmp_path / f"lr__pre_ln__d2__lr{lr:g}__s1"
        d.mkdir()
        (d / "result.json").write_text(json.dumps({"variant": "pre_ln", "lr": lr, "valid_loss": v, "seed": 1}))
    d = tmp_path / "lr__pre_ln__d2__lr0.001__s2"   # an interrupted second seed: left out
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"variant": "pre_ln", "lr": 1e-3, "valid_loss": 9.0, "seed": 2}))
    t = sg.lr_sensitivity(tmp_path)["pre_ln"]
    # mean over rates of min(loss, init) - best; a diverged run counts as the loss at initialisation
    assert t["sensitivity"] == pytest.approx(((4.0 - 3.5) + 0 + (init - 3.5)) / 3)
    assert t["best_lr"] == 1e-2


def test_a_tiny_real_run_is_saved_and_skipped_when_run_again(tmp_path, capsys, shared_data):  # Multi30k
    a = Namespace(work=tmp_path, budget_min=5.0, updates=4, warmup=2, interval=2)
    jobs = [("g__tiny__s1", dict(kind="pre_ln", depth=1, lr=1e-3, qk_norm=True, z_loss=1e-4), 1,
             {"group": "g", "variant": "tiny", "role": "control"})]
    sg.run_all(jobs, a)
    r = json.loads((tmp_path / "g__tiny__s1" / "result.json").read_text())
    assert len(r["losses"]) == 4 and r["losses"][0] == pytest.approx(math.log(sg.VOCAB), abs=0.5)
    hist = sg.read_history(tmp_path / "g__tiny__s1")
    assert [h["step"] for h in hist] == [0, 2] and "log_z_rms" in hist[0]
    capsys.readouterr()
    sg.run_all(jobs, a)
    assert "g__tiny__s1" not in capsys.readouterr().out   # done before: not run again

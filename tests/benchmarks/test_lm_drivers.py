"""The LM sweeps' drivers (admin_lm_stability, moe_lm, bench_monitor evidence) run their jobs through
sweep.run_jobs: every job once, results in job order, one progress line each. The recipe runs are faked."""

import json
import re
from pathlib import Path


def _save_dir(cmd) -> Path:
    cmd = [str(c) for c in cmd]
    return Path(cmd[cmd.index("--save") + 1])


def _seed(save: Path) -> int:
    return int(re.search(r"-s(\d+)$", save.name).group(1))


def test_lm_stability_runs_every_job_once_in_job_order(tmp_path, monkeypatch, capsys):
    from benchmarks import admin_lm_stability as lm

    calls = []

    def fake_run(cmd, log, env):
        save, script = _save_dir(cmd), Path(str(cmd[0])).name
        calls.append((script, save.name))
        if script == "train.sh":
            (save / "checkpoint_best.pt").write_text("")
        else:  # evaluate.sh: a perplexity that names the run's seed
            (save / "valid.ppl").write_text(f"Loss (base 2): 3.0, Perplexity: {_seed(save)}.5")
        return 0

    monkeypatch.setattr(lm, "run", fake_run)
    monkeypatch.setattr(lm, "prepare_english", lambda *a, **k: None)
    lm.main(["--data", str(tmp_path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
             "--models", "postln,admin", "--seeds", "1,2,3", "--jobs", "2"])
    assert sorted(c[0] for c in calls) == ["evaluate.sh"] * 6 + ["train.sh"] * 6
    rows = json.loads((tmp_path / "out" / "lm_stability.json").read_text())["rows"]
    assert [r["per_seed"] for r in rows] == [[1.5, 2.5, 3.5]] * 2
    out = capsys.readouterr().out
    assert "[runs 6/6" in out and "admin lr 2e-3 seed 3: 3.5" in out


def test_moe_lm_runs_every_job_once_in_job_order(tmp_path, monkeypatch, capsys):
    from benchmarks import moe_lm

    def fake_run(cmd, log, env):
        save = _save_dir(cmd)
        (save / "train.log").write_text(f'epoch 001 | {{"valid_loss": "{_seed(save)}.25", "train_wps": "1000"}}\n')
        return 0

    monkeypatch.setattr(moe_lm, "run", fake_run)
    monkeypatch.setattr(moe_lm, "prepare_english", lambda *a, **k: None)
    monkeypatch.setattr(moe_lm, "router_share", lambda args, e, r: {"config": moe_lm.name(e, r), "step_ms": 2.0,
                                                                    "routing_ms": 0.1, "share": 0.05})
    moe_lm.main(["--data", str(tmp_path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
                 "--experts", "4", "--routers", "switch", "--seeds", "1,2", "--jobs", "2"])
    rows = json.loads((tmp_path / "out" / "moe_lm.json").read_text())["rows"]
    assert [(r["config"], r["per_seed"]) for r in rows] == [("dense", [1.25, 2.25]), ("switch-E4", [1.25, 2.25])]
    assert "[runs 4/4" in capsys.readouterr().out


def test_monitor_evidence_runs_every_job_once(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_monitor

    monkeypatch.setattr(bench_monitor, "_lm_run", lambda a, model, seed: f"lm {model} s{seed}: exit 0")
    bench_monitor.main(["evidence", "--which", "lm", "--lm-models", "postln,admin", "--seeds", "1,2", "--jobs", "2",
                        "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("[monitored runs ") == 4 and "lm admin s2: exit 0" in out


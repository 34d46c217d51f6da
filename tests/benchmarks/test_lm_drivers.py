"""The LM sweeps' drivers (admin_lm_stability, moe_lm, bench_monitor evidence) run their jobs through
sweep.run_jobs: every job once, results in job order, one progress line each. The recipe runs are faked."""

import json
import re
from pathlib import Path

import pytest


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


def test_moe_lm_ep_launches_p_ranks_with_their_share_of_the_batch_and_resumes(tmp_path, monkeypatch, capsys):
    from benchmarks import moe_lm

    launches = []

    def fake_launch(cmds, logs, env, timeout):
        cmds = [[str(c) for c in cmd] for cmd in cmds]
        launches.append(cmds)
        save = _save_dir(cmds[0])
        (save / "train.log").write_text(f'valid | {{"valid_loss": "{len(cmds)}.{_seed(save.parent)}"}}\n')
        return [0] * len(cmds)

    monkeypatch.setattr(moe_lm, "launch_ranks", fake_launch)
    monkeypatch.setattr(moe_lm, "prepare_english", lambda *a, **k: None)
    argv = ["ep", "--data", str(tmp_path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
            "--parallel", "2,1", "--seeds", "1,2", "--reference", str(tmp_path / "none.json")]
    moe_lm.main(argv)
    assert [len(cmds) for cmds in launches] == [2, 2, 1, 1]
    two = launches[0]
    for rank, cmd in enumerate(two):
        assert cmd[cmd.index("--max-tokens") + 1] == "512" and cmd[cmd.index("--tokens-per-update") + 1] == "512"
        assert cmd[cmd.index("--moe-expert-parallel-size") + 1] == "2"
        assert cmd[cmd.index("--distributed-rank") + 1] == str(rank)
    assert "--moe-expert-parallel-size" not in launches[2][0] and "1024" in launches[2][0]
    table = (tmp_path / "out" / "ep_lm.md").read_text()
    assert "| 2 | 2 | 2.200 |" in table and "| 1 | 1 | 1.100 |" in table
    moe_lm.main(argv)  # resumed: every run is cached in the work directory
    assert len(launches) == 4
    with pytest.raises(SystemExit):
        moe_lm.main([*argv, "--parallel", "3"])  # 3 divides neither 8 experts nor 1024 tokens
    assert "--parallel: each P must be >= 1 and divide --experts 8" in capsys.readouterr().err


def test_monitor_evidence_runs_every_job_once(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_monitor

    monkeypatch.setattr(bench_monitor, "_lm_run", lambda a, model, seed: f"lm {model} s{seed}: exit 0")
    bench_monitor.main(["evidence", "--which", "lm", "--lm-models", "postln,admin", "--seeds", "1,2", "--jobs", "2",
                        "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("[monitored runs ") == 4 and "lm admin s2: exit 0" in out


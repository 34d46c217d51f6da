"""benchmarks.reinmax_listops's run bookkeeping, with fairseq replaced by a stub: a killed run is trained again
(fairseq resumes it from checkpoint_last.pt), a finished one is not; no run starts after the time budget."""

import json
import time
from types import SimpleNamespace

import pytest

from benchmarks import reinmax_listops as lo


def _args(tmp_path, deadline=float("inf")):
    return SimpleNamespace(work=tmp_path, hidden_dim=8, max_update=20, device="cpu", save_interval_updates=5,
                           deadline=deadline)


def _stub(calls, fail_first=False):
    def sh(cmd, log):
        calls.append((str(cmd[1]).rsplit("/", 1)[-1], log.name))
        if "train.py" in str(cmd[1]):
            assert "--save-interval-updates" in [str(c) for c in cmd]
            if fail_first and len(calls) == 1:
                log.write_text("killed\n")
                return 137
            log.write_text("| train | epoch 001 | loss 2 | num_updates 20 | train_wall 7\n")
        else:
            out = cmd[cmd.index("--json") + 1]
            out.write_text(json.dumps({"accuracy": 41.0, "examples": 10, "accuracy_by_length": {}}))
        return 0
    return sh


def test_a_killed_training_run_is_continued_and_a_finished_one_is_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lo, "sh", _stub(calls, fail_first=True))
    with pytest.raises(RuntimeError, match="training failed"):
        lo.one_run("reinmax", 0.5, 1, "test", _args(tmp_path))
    r = lo.one_run("reinmax", 0.5, 1, "test", _args(tmp_path))
    assert [c[1] for c in calls] == ["train.0.log", "train.1.log", "eval_test.log"]
    assert r["accuracy"] == 41.0 and r["updates"] == 20 and r["train_wall_s"] == 7
    assert lo.one_run("reinmax", 0.5, 1, "test", _args(tmp_path)) == r and len(calls) == 3


def test_no_run_starts_after_the_time_budget(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lo, "sh", _stub(calls))
    assert lo.one_run("gumbel_rao", 0.5, 2, "test", _args(tmp_path, deadline=time.time() - 1)) is None
    assert calls == []


@pytest.mark.parametrize("fixed", ["reinmax=1.0", "reinmax=x,gumbel_softmax=1", "nope=1,reinmax=1",
                                   "reinmax=0,gumbel_softmax=1"])
def test_fixed_taus_must_name_every_estimator_with_a_positive_tau(fixed, capsys):
    with pytest.raises(SystemExit) as e:
        lo.main(["--estimators", "reinmax,gumbel_softmax", "--fixed-taus", fixed])
    assert e.value.code == 2 and "--fixed-taus" in capsys.readouterr().err

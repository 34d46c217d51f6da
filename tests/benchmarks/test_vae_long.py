"""The resumable long VAE run (benchmarks.reinmax_vae_long): a run stopped anywhere continues to the same result."""

import json

import pytest
import torch

from benchmarks import reinmax_vae_long as long
from benchmarks.reinmax_vae_long import Member, summarize, train_members


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(300, 784, generator=gen), torch.rand(50, 784, generator=gen)


def _members(work, names=("reinmax", "gumbel_rao"), seeds=(1, 2)):
    return [Member("8x4", n, s, work, snapshot_epochs=(0, 2)) for s in seeds for n in names]


def _weights(members):
    return [torch.cat([p.detach().flatten() for p in m.model.parameters()]) for m in members]


def test_a_killed_run_continues_where_it_stopped_and_ends_as_the_unbroken_run(tmp_path, monkeypatch):
    train, test = _data()
    unbroken = _members(tmp_path / "a")
    assert train_members(unbroken, train, test, 2, float("inf"), log=lambda *a, **k: None).startswith("done")

    # the second run dies in the middle of its 6th member-epoch (after 5 saved ones)
    calls = {"n": 0}
    real = Member.train_epoch

    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == 6:
            self.model.neg_elbo(train[:100], self.name, self.tau, self.gen)  # draws, then dies mid-epoch
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(Member, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_members(_members(tmp_path / "b"), train, test, 2, float("inf"), log=lambda *a, **k: None)
    monkeypatch.setattr(Member, "train_epoch", real)
    resumed = _members(tmp_path / "b")
    assert sorted(m.epoch for m in resumed) == [1, 1, 1, 2]  # continues, does not restart
    train_members(resumed, train, test, 2, float("inf"), log=lambda *a, **k: None)
    for a, b in zip(_weights(unbroken), _weights(resumed)):
        assert torch.equal(a, b)
    assert [m.history for m in resumed] == [[{**r, "wall_s": h["wall_s"]} for r, h in zip(m.history, m2.history)]
                                          for m, m2 in zip(unbroken, resumed)]
    assert (tmp_path / "b" / "8x4" / "reinmax-s1" / "e2.pt").exists()


def test_members_advance_evenly_and_the_budget_stops_before_an_epoch_that_would_overrun(tmp_path):
    train, test = _data()
    members = _members(tmp_path, seeds=(1,))
    train_members(members, train, test, 1, float("inf"), log=lambda *a, **k: None)
    # 0 s left: the next epoch (known to take > 0 s) is not started
    why = train_members(members, train, test, 3, 1e-9, log=lambda *a, **k: None)
    assert why.startswith("time budget spent") and [m.epoch for m in members] == [1, 1]
    order = []
    train_members(members, train, test, 3, float("inf"), log=lambda msg, **k: order.append(msg.split()[2]))
    assert order == ["reinmax", "gumbel_rao", "reinmax", "gumbel_rao"]


def test_same_seed_same_init_across_estimators_and_paper_settings(tmp_path):
    a, b = _members(tmp_path, seeds=(3,))
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert (a.lr, a.tau, a.opt_name) == (5e-4, 1.3, "adam") and (b.lr, b.tau) == (5e-4, 0.5)


def test_summary_is_at_the_epoch_every_run_reached(tmp_path):
    train, test = _data()
    members = _members(tmp_path, seeds=(1, 2))
    train_members(members, train, test, 1, float("inf"), log=lambda *a, **k: None)
    members[0].train_epoch(train, test)  # reinmax seed 1 one epoch ahead
    rows = summarize(long.collect(tmp_path, "8x4"))
    r = {row["estimator"]: row for row in rows}
    assert r["reinmax"]["epoch"] == 1 and r["reinmax"]["epochs_reached"] == [2, 1]
    hist = json.loads((tmp_path / "8x4" / "reinmax-s1" / "history.json").read_text())
    assert r["reinmax"]["per_seed_test"][0] == hist["history"][0]["test"]
    assert r["gumbel_rao"]["seeds"] == [1, 2]
    only2 = long.collect(tmp_path, "8x4", seeds=[2])
    assert [h["seed"] for h in only2["reinmax"]] == [2] and summarize(only2)[0]["epoch"] == 1

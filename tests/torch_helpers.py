"""Small helpers shared by tests (``tests/`` is on sys.path, see conftest.py).

`saved_bytes` lives in `benchmarks.memory` (the benchmarks measure with it too); tests may import from
``benchmarks``, never the other way round. `optimizer_snapshot` / `assert_optimizer_unchanged`: the check that a
refused call changed nothing, for any optimizer.
"""

import copy

import torch

from benchmarks.memory import saved_bytes

__all__ = ["saved_bytes", "optimizer_snapshot", "assert_optimizer_unchanged"]


def optimizer_snapshot(opt, params):
    """Copies of ``params``, of every state tensor of ``opt`` and of its param groups' hyper-parameters."""
    return {"params": [p.detach().clone() for p in params],
            "state": {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                      for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def assert_optimizer_unchanged(snapshot, opt, params):
    """Assert that ``params`` and ``opt`` (state tensors, which parameters have state, hyper-parameters) are as
    ``snapshot`` (`optimizer_snapshot`) recorded them."""
    for p, before in zip(params, snapshot["params"]):
        assert torch.equal(p.detach(), before)
    assert {id(p) for p in opt.state} == set(snapshot["state"])
    for p, s in opt.state.items():
        assert set(s) == set(snapshot["state"][id(p)])
        for k, v in s.items():
            before = snapshot["state"][id(p)][k]
            assert torch.equal(v, before) if torch.is_tensor(v) else v == before, k
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == snapshot["groups"]

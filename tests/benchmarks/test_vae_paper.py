"""The batched paper-budget VAE: each stacked member is one independent run of the single-run script."""

import pytest
import torch

from benchmarks.reinmax_vae_mnist import VAE
from benchmarks.reinmax_vae_paper import PAPER, MemberwiseAdam, StackedVAE, main


@pytest.mark.parametrize("rule", ["adam", "radam"])
def test_memberwise_adam_is_torch_optim_per_member(rule):
    """Each member with its own lr follows torch.optim.Adam / RAdam run on that member alone (RAdam over its
    first steps too, where rho_t <= 5 and it takes plain momentum steps)."""
    lrs = [1e-3, 5e-4, 7e-4]
    stacked = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    singles = [torch.nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    opt = MemberwiseAdam([stacked], torch.tensor(lrs, dtype=torch.float64), torch.tensor([rule == "radam"] * 3))
    peers = [(torch.optim.Adam if rule == "adam" else torch.optim.RAdam)([p], lr=lr) for p, lr in zip(singles, lrs)]
    for step in range(12):
        grads = torch.randn(3, 4, 5, dtype=torch.float64)
        stacked.grad = grads.clone()
        opt.step()
        for i, (p, peer) in enumerate(zip(singles, peers)):
            p.grad = grads[i].clone()
            peer.step()
    for i, p in enumerate(singles):
        torch.testing.assert_close(stacked[i].detach(), p.detach(), rtol=1e-12, atol=1e-12)


def test_mixed_rules_in_one_stack():
    lr = torch.tensor([1e-3, 1e-3], dtype=torch.float64)
    stacked = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    opt = MemberwiseAdam([stacked], lr, torch.tensor([False, True]))
    stacked.grad = torch.ones(2, 3, dtype=torch.float64)
    opt.step()
    # first step: Adam moves by lr (m_hat / sqrt(v_hat) = 1), RAdam (rho_1 <= 5) by lr * m_hat = lr
    torch.testing.assert_close(stacked.detach(), -1e-3 * torch.ones(2, 3, dtype=torch.float64))


def test_each_member_starts_as_the_single_run_model_of_its_seed():
    model = StackedVAE(8, 4, [3, 7], "cpu")
    x = torch.rand(5, 784)
    logits = model._mlp(x.expand(2, 5, 784), 0)
    for i, seed in enumerate([3, 7]):
        torch.manual_seed(seed)
        torch.testing.assert_close(logits[i], VAE(8, 4).encoder(x))


def test_paper_settings_cover_every_config_and_estimator():
    assert set(PAPER) == {"8x4", "4x24", "8x16", "16x12", "64x8", "10x30"}
    for cfg, table in PAPER.items():
        assert set(table) == {"reinmax", "straight_through", "gumbel_softmax", "gapped_straight_through", "gumbel_rao"}
        assert all(opt in ("adam", "radam") and lr > 0 and tau > 0 for lr, tau, opt in table.values())
    assert PAPER["8x4"]["reinmax"] == (5e-4, 1.3, "adam") and PAPER["8x16"]["gumbel_rao"] == (7e-4, 0.7, "radam")


@pytest.mark.parametrize("argv, flag", [(["--configs", "9x9"], "--configs"), (["--estimators", "nope"], "--estimators"),
                                        (["--steps", "0"], "--steps"), (["--time-budget", "0"], "--time-budget")])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_missing_data_is_a_skip_with_its_reason(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path)]) == []
    assert "skipped: MNIST not found" in capsys.readouterr().out

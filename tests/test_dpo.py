"""fk.dpo_loss against TRL's published formulas (DPOTrainer / CPOTrainer; tests/oracle.py), in float64."""

import math

import oracle
import pytest
import torch

import fdiv_kernels as fk


@pytest.mark.parametrize("kind", tuple(fk.DPO_LOSS_TYPES))
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_matches_trl_formulas_in_float64(kind, ls):
    if kind in ("hinge", "ipo") and ls:
        pytest.skip("no label smoothing in TRL's hinge/ipo")
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(16, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    pc.requires_grad_()
    beta, gamma = 0.3, 0.6
    out = fk.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=ls, gamma=gamma)
    want = oracle.dpo_losses(kind, pc, pr, rc, rr, beta=beta, label_smoothing=ls, gamma=gamma)
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, want.mean())
    (ga,) = torch.autograd.grad(out.loss, pc)
    (gb,) = torch.autograd.grad(want.mean(), pc)
    torch.testing.assert_close(ga, gb)
    if kind != "simpo":
        torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc).detach())
        assert out.accuracy.item() == pytest.approx(((pc - rc) > (pr - rr)).double().mean().item())


@pytest.mark.parametrize("kind", tuple(fk.DPO_LOSS_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_extreme_log_ratios(kind, dtype):
    pc = torch.tensor([-1e4, 0.0, -3e4, -5.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([0.0, -1e4, -1.0, -3e4], dtype=dtype)
    rc = torch.tensor([0.0, -2e4, -1e3, 0.0], dtype=dtype)
    rr = torch.tensor([-3e4, 0.0, 0.0, -1e3], dtype=dtype)
    out = fk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=kind, label_smoothing=0.1 if kind in ("sigmoid", "robust", "simpo") else 0.0)
    (g,) = torch.autograd.grad(out.loss, pc)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()


def test_sequence_logp_feeds_dpo():
    x = oracle.make_inputs((4,), 6, 8, 20, seed=1, weight_scale=1.0, ignore_prefix=2, ref_scale=None)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    seq = fk.sequence_logp(hidden, weight, labels)
    want = oracle.sequence_logp(oracle.token_stats(hidden, weight, labels), labels)[0].float()
    torch.testing.assert_close(seq.sum, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq.mean, want / 4, atol=1e-5, rtol=1e-5)
    assert seq.count.tolist() == [4, 4, 4, 4]


def test_bad_dpo_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type="):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="orpo")
    with pytest.raises(ValueError, match="needs ref_chosen"):
        fk.dpo_loss(x, x, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        fk.dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        fk.dpo_loss(x, torch.zeros(4), x, x, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        fk.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    assert math.isfinite(fk.dpo_loss(x, x, beta=2.0, loss_type="simpo", gamma=1.0).loss.item())

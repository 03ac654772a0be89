"""Primal per-token losses, TRL's f-divergence DPO, and the entropy output, against float64 math."""

import mpmath as mp
import oracle
import pytest
import torch
import torch.nn.functional as F

import fdiv_kernels as fk
from fdiv_kernels import TRL_F_DIVERGENCES
from fdiv_kernels.formulas.primal import L0, PRIMAL_LOSSES

mp.mp.dps = 40
GEN = {  # generators, written independently of the package
    "kl": lambda x: x * mp.log(x) if x > 0 else mp.mpf(0),
    "tv": lambda x: abs(x - 1) / 2,
    "pearson": lambda x: (x - 1) ** 2,
    "squared_hellinger": lambda x: (mp.sqrt(x) - 1) ** 2,
    "js": lambda x: (x * mp.log(x) if x > 0 else 0) - (1 + x) * mp.log((1 + x) / 2),
    "alpha": lambda x, a=mp.mpf(1.5): (x ** a - 1 - a * (x - 1)) / (a * (a - 1)),
}


def primal_ref(name, lp):
    """D_f(onehot(y) || p) = p f(1/p) + (1 - p) f(0) from the definition, p = exp(l)."""
    p = mp.exp(mp.mpf(lp))
    return p * GEN[name](1 / p) + (1 - p) * GEN[name](mp.mpf(0))


@pytest.mark.parametrize("name", sorted(GEN))
def test_primal_matches_definition_in_mpmath(name):
    loss = PRIMAL_LOSSES[name]
    for lp in [-18.0, -7.0, -2.0, -0.5, -1e-3, 0.0]:
        want = primal_ref(name, lp)
        got = float(loss.value(torch.tensor(lp, dtype=torch.float64), 1.5))
        assert got == pytest.approx(float(want), rel=1e-10, abs=1e-12), (name, lp)
        if lp == 0.0:
            continue  # p_y = 1 is the edge of the domain (tv has its kink there)
        dwant = mp.diff(lambda x: primal_ref(name, x), mp.mpf(lp))
        dgot = float(loss.grad(torch.tensor(lp, dtype=torch.float64), 1.5))
        assert dgot == pytest.approx(float(dwant), rel=1e-8, abs=1e-12), (name, lp)


def test_unbounded_forms_continue_linearly_below_the_floor():
    for name in ("pearson", "alpha"):
        loss = PRIMAL_LOSSES[name]
        lp = torch.tensor([L0 - 1e-9, L0, L0 + 1e-9, L0 - 100.0], dtype=torch.float64)
        v, g = loss.value(lp, 1.5), loss.grad(lp, 1.5)
        assert abs(v[0] - v[1]) <= 2e-9 * abs(g[1]) and abs(g[0] - g[2]) < 1e-3 * abs(g[1])  # C1 at the floor
        assert v[3] == pytest.approx(float(v[1] - 100.0 * g[1]), rel=1e-9)


@pytest.mark.parametrize("name", sorted(PRIMAL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_primal_finite_for_any_logp(name, dtype):
    lp = torch.tensor([-1e4, -300.0, -90.0, -20.0, -1.0, 0.0], dtype=dtype, requires_grad=True)
    v = PRIMAL_LOSSES[name](lp, 1.5)
    (g,) = torch.autograd.grad(v.sum(), lp)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()


def test_primal_loss_matches_closed_forms():
    x = oracle.make_inputs((3,), 7, 16, 20, seed=0, ignore_at=((0, 0), (0, 1)), ref_scale=None)
    logits, labels = (x.hidden @ x.weight.T).requires_grad_(), x.labels
    kl = fk.primal_loss(logits=logits, labels=labels, divergence="kl")
    ce = F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))
    torch.testing.assert_close(kl.loss, ce)
    st = oracle.stats(logits.double(), labels)
    tv = fk.primal_loss(logits=logits, labels=labels, divergence="tv")
    torch.testing.assert_close(tv.loss.double(), oracle.fdiv_loss(st, labels, divergence="tv", form="primal"),
                               atol=1e-6, rtol=1e-6)
    a = fk.primal_loss(logits=logits, labels=labels, divergence="alpha", alpha=0.5)
    torch.testing.assert_close(a.loss.double(), oracle.fdiv_loss(st, labels, divergence="alpha", alpha=0.5,
                                                                 form="primal"), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no primal form"):
        fk.primal_loss(logits=logits, labels=labels, divergence="neyman")
    with pytest.raises(TypeError, match="ref_logp"):
        fk.primal_loss(logits=logits, labels=labels, divergence="tv", ref_logp=torch.zeros(3, 7))


@pytest.mark.parametrize("f", ["forward_kl", "js", "alpha"])
def test_f_divergence_dpo_matches_trl_where_finite(f):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(32, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    out = fk.dpo_loss(pc, pr, rc, rr, beta=0.2, divergence=TRL_F_DIVERGENCES.get(f, f), alpha=0.7)
    torch.testing.assert_close(out.losses, oracle.dpo_losses("sigmoid", pc, pr, rc, rr, beta=0.2, f_divergence=f,
                                                             f_alpha=0.7))


@pytest.mark.parametrize("f", ["forward_kl", "js", "alpha"])
def test_f_divergence_dpo_finite_where_trl_is_not(f):
    pc = torch.tensor([-3e4, -5.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-5.0, -3e4]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    trl = oracle.dpo_losses("sigmoid", pc.detach(), pr, rc, rr, beta=0.1, f_divergence=f,
                            f_alpha=1.5 if f == "alpha" else 0.5)
    out = fk.dpo_loss(pc, pr, rc, rr, beta=0.1, divergence=TRL_F_DIVERGENCES.get(f, f), alpha=1.5 if f == "alpha" else 0.5)
    (grad,) = torch.autograd.grad(out.loss, pc)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
    if f == "forward_kl":
        assert not torch.isfinite(trl).all()


def test_entropy_output_matches_float64():
    x = oracle.make_inputs((2,), 5, 6, 13, seed=2, weight_scale=1.0, ignore_at=((1, 0),), ref_scale=None)
    hidden, weight, _ = x.leaves()
    labels = x.labels
    out = fk.loss(hidden, weight, labels, return_entropy=True)
    ent = oracle.token_stats(hidden, weight, labels).entropy
    torch.testing.assert_close(out.entropy.double(), ent, atol=1e-5, rtol=1e-5)
    (gh,) = torch.autograd.grad(out.entropy.sum(), hidden)
    (gr,) = torch.autograd.grad(ent.sum(), hidden)
    torch.testing.assert_close(gh.double(), gr.double(), atol=1e-5, rtol=1e-4)

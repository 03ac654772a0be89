"""The specs' closed-form coefficients (what the fused one-pass kernels use, with no autograd)
against torch autograd on the same specs' terms, in float64, for every loss the specs describe.

For a spec and a chunk of rows, :meth:`coefficients` is the derivative of the chunk's target
(``terms.lme`` for the log-mean-exp losses, else ``terms.linear``) with respect to ``logp``,
``lse`` and the references. Rows are drawn with masks (empty rows, one-token rows, full rows),
references (per token, per row, ``-inf`` somewhere) and rewards far in the tails, so every branch
of the stable formulas is crossed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.specs import DPOSpec, FDivSpec, KTOSpec, PrimalSpec, Rows, cpo_spec, orpo_spec

R, T = 6, 7


def _rows(seed: int, *, ref: str, scale: float = 4.0, pairs: bool = False) -> Rows:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(R, T, generator=g) > 0.35
    mask[0] = False                 # a row with nothing supervised
    mask[1] = False
    mask[1, 3] = True               # a row with one token
    mask[2] = True                  # a full row
    if pairs:  # pair 0 = rows (0, 3): chosen empty, rejected not
        mask[3, 0] = True
    logp = torch.where(mask, -torch.rand(R, T, generator=g, dtype=torch.float64) * scale, 0.0)
    logp[2, 1] = -60.0              # a long tail (pearson's linear continuation, the exp knees)
    lse = torch.where(mask, torch.randn(R, T, generator=g, dtype=torch.float64) * 3, 0.0)
    ref_tok = torch.zeros((), dtype=torch.float64)
    ref_seq = None
    if ref == "token":
        ref_tok = torch.where(mask, -torch.rand(R, T, generator=g, dtype=torch.float64) * scale, 0.0)
    elif ref == "row":
        ref_seq = -torch.rand(R, generator=g, dtype=torch.float64) * scale * T
    return Rows(logp, lse, mask, ref_tok, ref_seq)


def _autograd(spec, rows: Rows, norms=None):
    """The target's gradients by torch autograd on :meth:`terms` (``norms``: the spec's of the rows)."""
    leaves = {"logp": rows.logp.clone().requires_grad_(), "lse": rows.lse.clone().requires_grad_()}
    if rows.ref_tok.dim():
        leaves["ref_tok"] = rows.ref_tok.clone().requires_grad_()
    if rows.ref_seq is not None:
        leaves["ref_seq"] = rows.ref_seq.clone().requires_grad_()
    if rows.mean_logit is not None:
        leaves["mean_logit"] = rows.mean_logit.clone().requires_grad_()
    r = rows._replace(logp=leaves["logp"], lse=leaves["lse"], ref_tok=leaves.get("ref_tok", rows.ref_tok),
                      ref_seq=leaves.get("ref_seq", rows.ref_seq), mean_logit=leaves.get("mean_logit"))
    norms = spec.normalizers(rows.mask) if norms is None else norms
    terms = spec.terms(r, norms)
    target = terms.lme if spec.uses_lme else terms.linear
    grads = torch.autograd.grad(target, list(leaves.values()), allow_unused=True)
    out = {k: (torch.zeros_like(v) if gr is None else gr) for (k, v), gr in zip(leaves.items(), grads)}
    return out, norms


def _check(spec, rows: Rows, norms=None):
    want, norms = _autograd(spec, rows, norms)
    got = spec.coefficients(rows, norms)
    for name in ("logp", "lse"):
        torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for name in ("ref_tok", "ref_seq", "mean_logit"):
        if name in want:
            mine = getattr(got, name)
            mine = torch.zeros_like(want[name]) if mine is None else mine
            torch.testing.assert_close(mine, want[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


FDIV_CASES = [
    dict(level=level, values=values, z_loss=z, length_normalize=ln, reduction=red)
    for level, values, z, ln, red in itertools.product(("token", "sequence"), ("drop", "detach", "free"),
                                                       (0.0, 0.3), (False, True), ("mean", "sum"))
    if not (ln and level == "token")
]


@pytest.mark.parametrize("divergence", sorted(fk.DIVERGENCES))
@pytest.mark.parametrize("case", range(len(FDIV_CASES)))
def test_fdiv_coefficients_are_the_autograd_gradients(divergence, case):
    opts = FDIV_CASES[case]
    spec = FDivSpec(divergence, beta=0.7, **opts)
    for seed, ref in enumerate(("none", "token", "row") if opts["level"] == "sequence" else ("none", "token")):
        _check(spec, _rows(seed, ref=ref))


@pytest.mark.parametrize("divergence", sorted(fk.DIVERGENCES))
def test_fdiv_coefficients_in_the_tails(divergence):
    """Rewards of +-200 nats (beta 5): the softplus branches, the log-mean-exp softmax, pearson's flat part."""
    for seed, level in enumerate(("token", "sequence")):
        _check(FDivSpec(divergence, beta=5.0, level=level), _rows(seed + 10, ref="token", scale=40.0))


@pytest.mark.parametrize("divergence", sorted(n for n, d in fk.DIVERGENCES.items() if d.aggregate == "mean"))
@pytest.mark.parametrize("eps,reduction", [(0.0, "mean"), (0.1, "mean"), (0.3, "sum"), (1.0, "mean")])
def test_class_options_coefficients_are_the_autograd_gradients(divergence, eps, reduction):
    """Class weights (``Rows.weight``, ``Norms.weight``) and label smoothing (``Rows.mean_logit``,
    ``Rows.class_mean``), with a z-loss: the coefficients of ``logp``, ``lse``, the reference and
    the mean logit."""
    spec = FDivSpec(divergence, beta=0.7, reduction=reduction, label_smoothing=eps, z_loss=0.2)
    for seed, ref in enumerate(("none", "token")):
        rows = _rows(seed, ref=ref)
        g = torch.Generator().manual_seed(seed + 50)
        w = torch.where(rows.mask, torch.rand(R, T, generator=g, dtype=torch.float64) * 2, 0.0)
        ml = torch.where(rows.mask, torch.randn(R, T, generator=g, dtype=torch.float64), 0.0) if eps else None
        rows = rows._replace(weight=w, mean_logit=ml, class_mean=torch.tensor(0.8, dtype=torch.float64) if eps else None)
        _check(spec, rows, spec.normalizers(rows.mask)._replace(weight=w.sum()))


@pytest.mark.parametrize("name", fk.divergence_names("primal"))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_primal_coefficients_are_the_autograd_gradients(name, reduction):
    for alpha, z in ((0.5, 0.0), (1.5, 0.2), (2.0, 0.0)):
        _check(PrimalSpec(name, alpha=alpha, z_loss=z, reduction=reduction), _rows(3, ref="none"))


DPO_CASES = [
    dict(loss_type="sigmoid", label_smoothing=0.1), dict(loss_type="sigmoid"), dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="hinge"), dict(loss_type="ipo"), dict(loss_type="simpo", gamma=0.5, label_smoothing=0.1),
    dict(loss_type="sigmoid", length_normalize=True), dict(loss_type="ipo", length_normalize=False),
] + [dict(loss_type=t, divergence=d, alpha=a) for t in ("sigmoid", "robust", "hinge", "ipo")
     for d, a in (("reverse_kl", 1.0), ("js", 1.0), ("alpha", 0.5), ("alpha", 1.5))] + [
    # TRL 1.16's other DPOTrainer loss types, DiscoPOP's exponential tail, ORPO, the sft (NLL) term
    dict(loss_type="exo_pair", label_smoothing=1e-3), dict(loss_type="exo_pair", label_smoothing=0.2),
    dict(loss_type="nca_pair"), dict(loss_type="bco_pair"), dict(loss_type="sppo_hard"),
    dict(loss_type="aot"), dict(loss_type="aot", label_smoothing=0.1), dict(loss_type="aot_unpaired", label_smoothing=0.1),
    dict(loss_type="apo_zero"), dict(loss_type="apo_down"), dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=3.0), dict(loss_type="sigmoid_norm"), dict(loss_type="orpo"),
    dict(loss_type="sft"), dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7)),
    dict(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0), nll_tokens=5.0),
    dict(loss_type=("aot", "apo_down", "sft"), loss_weights=(0.5, 2.0, 0.3)),
    dict(loss_type=("orpo", "sft")), dict(loss_type=("ipo", "hinge"), length_normalize=True),
    dict(loss_type="sigmoid", reference_free=True), dict(loss_type="nca_pair", reference_free=True),
] + [dict(loss_type=t, divergence=d, alpha=a, label_smoothing=0.1)
     for t in ("exo_pair", "discopop", "sigmoid_norm", "simpo") for d, a in (("reverse_kl", 1.0), ("alpha", 0.5))]


@pytest.mark.parametrize("case", range(len(DPO_CASES)))
def test_dpo_coefficients_are_the_autograd_gradients(case):
    """Rows laid out as the fused pass sees them: (chosen_0, rejected_0, chosen_1, ...)."""
    spec = DPOSpec(beta=0.3, **DPO_CASES[case])
    for seed in range(3):
        rows = _rows(seed + 20, ref="row" if spec.needs_reference else "none", pairs=True)
        _check(spec, rows)


@pytest.mark.parametrize("spec", [cpo_spec("sigmoid", beta=0.4, label_smoothing=0.1), cpo_spec("ipo", cpo_alpha=0.5),
                                  cpo_spec("simpo", alpha=0.3), cpo_spec("alphapo", alpha=-0.5), orpo_spec(beta=0.5)],
                         ids=["cpo_sigmoid", "cpo_ipo", "cpo_simpo_alpha", "alphapo", "orpo"])
def test_cpo_and_orpo_coefficients_are_the_autograd_gradients(spec):
    for seed in range(3):
        _check(spec, _rows(seed + 40, ref="none", pairs=True))


@pytest.mark.parametrize("opts", [dict(), dict(loss_type="apo_zero_unpaired", desirable_weight=1.5),
                                  dict(loss_type=("kto", "sft"), loss_weights=(1.0, 0.4), undesirable_weight=0.5),
                                  dict(length_normalize=True, beta=2.0)])
@pytest.mark.parametrize("ref", ["row", "none"])
def test_kto_coefficients_are_the_autograd_gradients(opts, ref):
    """KTO rows, desirable or not, as a chunk at row 3 of a 9-row batch (the flags read from ``start``)."""
    flags = (True, False, False, True, True, False, True, False, True)
    spec = KTOSpec(beta=opts.pop("beta", 0.3), desirable=flags, **opts)
    for seed in range(3):
        rows = _rows(seed + 50, ref=ref, pairs=False)
        batch = torch.cat([torch.ones(3, T, dtype=torch.bool), rows.mask])  # the chunk's rows are rows 3..8
        _check(spec, rows._replace(start=3), spec.normalizers(batch))
        _check(dataclasses.replace(spec, desirable=flags[3:]), rows)


def test_dpo_coefficients_past_the_exp_knees():
    """Log-ratios past the exp knees (50; 30 for ipo): the linear / logarithmic continuations."""
    for t in ("sigmoid", "ipo"):
        for d in ("reverse_kl", "alpha"):
            spec = DPOSpec(loss_type=t, beta=0.05, divergence=d, alpha=2.0)
            rows = _rows(30, ref="row", scale=1.0, pairs=True)
            rows = rows._replace(ref_seq=rows.ref_seq * 0 + torch.tensor([-120.0, 80.0, -1.0, 60.0, -90.0, 0.0],
                                                                          dtype=torch.float64))
            _check(spec, rows)


def test_a_log_mean_exp_chunk_without_finite_terms_has_zero_coefficients():
    """Every reward +inf (ref_logp = -inf everywhere): lme = -inf, no gradient, no NaN."""
    rows = _rows(4, ref="token")
    rows = rows._replace(ref_tok=torch.where(rows.mask, -math.inf, 0.0).double())
    spec = FDivSpec("kl", beta=1.0)
    coef = spec.coefficients(rows, spec.normalizers(rows.mask))
    assert torch.equal(coef.logp, torch.zeros_like(coef.logp)) and not torch.isnan(coef.lse).any()


# ---------------------------------------------------------------------------------------------
# DistillSpec: the epilogue's closed-form coefficient against autograd on its token terms
# ---------------------------------------------------------------------------------------------

DISTILL_CASES = [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.5}), ("js", {"beta": 0.15}), ("js", {"beta": 0.0}),
                 ("js", {"beta": 1.0}), ("tv", {}), ("squared_hellinger", {}), ("pearson", {}), ("neyman", {}),
                 ("alpha", {"alpha": 0.3}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 1.0}),
                 ("alpha", {"alpha": 1.0 + 1e-4}), ("alpha", {"alpha": 2.5}), ("alpha", {"alpha": 0.0}),
                 ("alpha", {"alpha": -0.4})]


@pytest.mark.parametrize("case", range(len(DISTILL_CASES)))
def test_distill_coefficients_are_the_autograd_gradients(case):
    """``d(sum_n wt_n (kappa D_n + w NLL_n)) / d zs_raw`` in closed form (what every backend's epilogue
    writes) equals autograd on :meth:`DistillSpec.token_terms`, in float64: temperatures, T^2 scaling,
    a hard label, logits 30 nats apart, and columns masked in the teacher only (where the divergence is
    finite there) and in both models."""
    name, opts = DISTILL_CASES[case]
    g = torch.Generator().manual_seed(case)
    n, v = 5, 13
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    zt[0, 2], zs[1, 4] = 30.0, -30.0
    form = fk.DistillSpec(name, **opts).form
    c = fk.DistillSpec(name, **opts).param
    if math.isfinite(form.f0(c)):
        zt[2, 5] = -math.inf                  # the teacher alone masks a token
    zt[3, 7] = zs[3, 7] = -math.inf           # both mask one
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = 0
    wt = torch.rand(n, generator=g, dtype=torch.float64)
    for temperature, t2, hard in ((1.0, False, 0.0), (0.6, True, 0.4), (2.5, False, 1.0)):
        spec = fk.DistillSpec(name, temperature=temperature, t2_scaling=t2, hard_label_weight=hard, **opts)
        leaf = zs.clone().requires_grad_()
        total = (wt * spec.token_terms(zt, leaf, y)).sum()
        want, = torch.autograd.grad(total, leaf)
        div, nll, coef = spec.epilogue(zt, zs, y, wt)
        torch.testing.assert_close(coef, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(spec.kappa * div + hard * nll, spec.token_terms(zt, zs, y), rtol=1e-12, atol=1e-12)

"""fk.dpo_loss against TRL 1.16: its loss functions transcribed (tests/oracle.py) per pair, and
TRL's own ``DPOTrainer._compute_loss`` on the same per-token log-probs, in float64, value and
gradient; every loss type, the weighted combinations, the sft (NLL) term, f-divergence scores."""

import math

import oracle
import pytest
import torch

import fdiv_kernels as fk

KINDS = tuple(fk.DPO_LOSS_TYPES)


def _pairs(b=16, seed=0, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(b, generator=g, dtype=torch.float64) * scale for _ in range(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_matches_trl_formulas_in_float64(kind, ls):
    if ls and not fk.DPO_LOSS_TYPES[kind].uses_label_smoothing:
        pytest.skip(f"{kind} reads no label smoothing (TRL's neither)")
    opts = {**oracle.dpo_kind_options(kind, ls), "beta": 0.3}
    pc, pr, rc, rr = _pairs()
    if kind == "orpo":
        pc, pr = pc / 40, pr / 40  # mean log-probs
    n = torch.randint(1, 9, (16,), generator=torch.Generator().manual_seed(3))
    pc.requires_grad_()
    extra = {"chosen_tokens": n} if kind == "sft" else {}
    out = fk.dpo_loss(pc, pr, rc, rr, loss_type=kind, **opts, **extra)
    nll = -pc.sum() / n.sum() if kind == "sft" else None
    want = oracle.dpo_losses(kind, pc, pr, rc, rr, nll=nll, **opts)
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, want.mean())
    (ga,) = torch.autograd.grad(out.loss, pc)
    (gb,) = torch.autograd.grad(want.mean(), pc)
    torch.testing.assert_close(ga, gb)
    if fk.DPO_LOSS_TYPES[kind].needs_reference:
        torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc).detach())
        assert out.accuracy.item() == pytest.approx(((pc - rc) > (pr - rr)).double().mean().item())


def _trl_case(kind, opts, f="reverse_kl", loss_weights=None, seed=1):
    """The same batch through TRL's own DPOTrainer._compute_loss and fk.dpo_loss (per-token
    log-probs -> sums or means), value and gradient w.r.t. the per-token log-probs."""
    g = torch.Generator().manual_seed(seed)
    b, L = 6, 7
    mask = torch.rand(2 * b, L, generator=g) > 0.3
    mask[:, 0] = True
    tok = (-torch.rand(2 * b, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 15
    kinds = [kind] if isinstance(kind, str) else list(kind)
    # TRL's alpha_divergence has no float64 branch (a float32 clamp table): it runs in float32
    low = f == "alpha_divergence"
    t_in = tok.detach().float().requires_grad_() if low else tok
    want = oracle.trl_dpo_loss(t_in, mask, ref[:b].to(t_in.dtype), ref[b:].to(t_in.dtype), loss_type=kinds,
                               loss_weights=loss_weights, f_divergence_type=f, f_alpha_divergence_coef=0.5, **opts)
    (gw,) = torch.autograd.grad(want, t_in)
    want, gw = want.double(), gw.double()
    masked = torch.where(mask, tok, 0.0)
    s, n = masked.sum(1), mask.sum(1)
    spec = fk.DPOSpec(loss_type=tuple(kinds), loss_weights=loss_weights, divergence=fk.TRL_F_DIVERGENCES[f],
                      alpha=0.5, **{k: v for k, v in opts.items() if k != "beta"}, beta=opts["beta"])
    seq = s / n if spec.length_normalize else s
    rseq = ref / n if spec.length_normalize else ref  # the reference in the loss's normalisation
    out = fk.dpo_loss(seq[:b], seq[b:], rseq[:b], rseq[b:], loss_type=tuple(kinds), loss_weights=loss_weights,
                      divergence=fk.TRL_F_DIVERGENCES[f], alpha=0.5, chosen_tokens=n[:b] if "sft" in kinds else None,
                      **opts)
    (ga,) = torch.autograd.grad(out.loss, tok)
    # TRL builds exo_pair's epsilon as a float32 tensor: its log(eps), log1p(-eps) carry float32
    # rounding (the float64 transcription agrees to 1e-12: test_matches_trl_formulas_in_float64)
    tol = 1e-6 if "exo_pair" in kinds else 1e-5 if low else 1e-12
    torch.testing.assert_close(out.loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(ga, gw, rtol=max(tol, 1e-10), atol=1e-13 if tol < 1e-6 else 1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_trl_own_compute_loss(kind):
    """TRL 1.16's sigmoid reads no label_smoothing (fk's sigmoid is cDPO with it): 0 for sigmoid."""
    if kind in ("simpo", "orpo"):
        pytest.skip("not a DPOTrainer loss type (CPO / ORPO: tests/test_preference_peers.py)")
    opts = {**oracle.dpo_kind_options(kind, 0.0 if kind == "sigmoid" else 0.1), "beta": 0.3}
    opts.pop("gamma")
    _trl_case(kind, opts)


@pytest.mark.parametrize("kinds,weights,ls", [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO
                                              (["sigmoid", "sft"], [1.0, 0.5], 0.0),                  # RPO
                                              (["apo_zero", "nca_pair", "sppo_hard"], None, 0.05),
                                              (["aot", "robust", "exo_pair"], [0.5, 1.5, 2.0], 0.05),
                                              (["ipo", "sigmoid_norm"], [1.0, 0.3], 0.05)])
def test_weighted_combinations_match_trl(kinds, weights, ls):
    """(TRL 1.16's sigmoid reads no label_smoothing, fk's does: 0 with sigmoid.)"""
    _trl_case(kinds, {"beta": 0.2, "label_smoothing": ls, "discopop_tau": 0.05}, loss_weights=weights)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "robust", "exo_pair", "discopop", "sft"])
@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores_match_trl(kind, f):
    """TRL's f-DPO for its scored types (ipo and sigmoid_norm normalise TRL's scores, fk the log-probs:
    the same for reverse_kl only, tested above)."""
    opts = {**oracle.dpo_kind_options(kind, 0.0 if kind == "sigmoid" else 0.1), "beta": 0.3}
    opts.pop("gamma")
    _trl_case(kind, opts, f=f)


def test_sft_term_is_the_chosen_tokens_mean_nll():
    """``sft`` alone is ``-sum chosen log-probs / chosen tokens`` (TRL's per-token mean), whatever the
    normalisation of the inputs; ``nll_tokens`` replaces the count."""
    pc, pr, _, _ = _pairs(4)
    n = torch.tensor([3, 1, 5, 2])
    out = fk.dpo_loss(pc, pr, beta=0.1, loss_type="sft", chosen_tokens=n)
    assert float(out.loss) == pytest.approx(float(-pc.sum() / n.sum()), rel=1e-12)
    means = fk.dpo_loss(pc / n, pr, beta=0.1, loss_type="sft", chosen_tokens=n, length_normalize=True)
    assert float(means.loss) == pytest.approx(float(out.loss), rel=1e-12)
    glob = fk.dpo_loss(pc, pr, beta=0.1, loss_type="sft", chosen_tokens=n, nll_tokens=100.0)
    assert float(glob.loss) == pytest.approx(float(-pc.sum() / 100), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_extreme_log_ratios(kind, dtype):
    pc = torch.tensor([-1e4, -1e-3 if kind == "orpo" else 0.0, -3e4, -5.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e-3 if kind == "orpo" else 0.0, -1e4, -1.0, -3e4], dtype=dtype)
    rc = torch.tensor([0.0, -2e4, -1e3, 0.0], dtype=dtype)
    rr = torch.tensor([-3e4, 0.0, 0.0, -1e3], dtype=dtype)
    extra = {"chosen_tokens": torch.tensor([2, 3, 4, 5])} if kind == "sft" else {}
    out = fk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=kind, **oracle.dpo_kind_options(kind), **extra)
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
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="needs ref_chosen"):
        fk.dpo_loss(x, x, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        fk.dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        fk.dpo_loss(x, torch.zeros(4), x, x, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        fk.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair' needs label_smoothing > 0"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_weights must give one weight per loss_type"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights must be a finite number"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type=["sigmoid"], loss_weights=[math.nan])
    with pytest.raises(ValueError, match="pass length_normalize=True or False"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type=["sigmoid", "ipo"])
    with pytest.raises(ValueError, match="needs their token counts"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="read by the sft term only"):
        fk.dpo_loss(x, x, x, x, beta=0.1, chosen_tokens=torch.ones(3))
    with pytest.raises(ValueError, match="discopop_tau"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="f-DPO scores: it applies to"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="bco_pair", divergence="js")
    with pytest.raises(ValueError, match="nll_tokens"):
        fk.dpo_loss(x, x, x, x, beta=0.1, loss_type="sft", chosen_tokens=torch.ones(3), nll_tokens=0.0)
    assert math.isfinite(fk.dpo_loss(x, x, beta=2.0, loss_type="simpo", gamma=1.0).loss.item())
    assert math.isfinite(fk.dpo_loss(x, x, beta=2.0, loss_type="bco_pair", reference_free=True).loss.item())

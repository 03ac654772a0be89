"""fk.loss against cross-entropy, plain float64 formulas and autograd's gradcheck."""

import oracle
import pytest
import torch
import torch.nn.functional as F

import fdiv_kernels as fk

NAMES = sorted(fk.DIVERGENCES)


def batch(seed=0, scale=1.0):
    """``(logits [3, 9, 31], labels, ref)`` from the suite's builder: a few ignored positions per row."""
    x = oracle.make_inputs((3,), 9, 16, 31, seed=seed, scale=scale, ref_scale=2.0,
                           ignore_at=((0, 0), (0, 1), (0, 2), (1, -2), (1, -1), (2, 4)))
    return x.hidden @ x.weight.T, x.labels, x.ref


def plain_loss(name, logits, labels, ref, beta, level, values="drop", length_normalize=False):
    return oracle.fdiv_loss(oracle.stats(logits.double(), labels), labels, divergence=name, ref_logp=ref, beta=beta,
                            level=level, values=values, length_normalize=length_normalize)


def test_sft_equals_cross_entropy_values_and_grads():
    x = oracle.make_inputs((4,), 13, 24, 97, seed=0, weight_scale=1.0, ignore_prefix=5, ref_scale=None)
    hidden, weight, _ = x.leaves()
    labels = x.labels
    out = fk.loss(hidden, weight, labels, divergence="sft", beta=1.0)
    ce = F.cross_entropy((hidden @ weight.T).reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - ce.item()) <= 1e-6 * max(1.0, abs(ce.item()))
    ga = torch.autograd.grad(out.loss, (hidden, weight))
    gb = torch.autograd.grad(ce, (hidden, weight))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    logits = (hidden @ weight.T).detach().requires_grad_()
    out2 = fk.loss(logits=logits, labels=labels)
    assert abs(out2.loss.item() - ce.item()) <= 1e-6 * max(1.0, abs(ce.item()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("values", ["drop", "detach"])
def test_loss_matches_plain_float64_formula(name, level, values):
    logits, labels, ref = batch()
    beta = 0.3 if level == "sequence" else 0.8
    got = fk.loss(logits=logits, labels=labels, divergence=name, ref_logp=ref, beta=beta, level=level, values=values)
    want = plain_loss(name, logits, labels, ref, beta, level, values)
    assert got.loss.dtype == torch.float32
    assert abs(got.loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (got.loss.item(), want.item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("values", ["drop", "free"])
def test_gradcheck_float64(name, level, values):
    """Analytic gradients equal finite differences ("detach" is excluded: by design it is not the full gradient)."""
    x = oracle.make_inputs((2,), 5, 4, 6, dtype=torch.float64, seed=1, weight_scale=1.0, ignore_at=((0, 0),))
    hidden, weight, _ = x.leaves()
    labels, ref = x.labels, x.ref.double()

    def f(h, w):
        return fk.loss(h, w, labels, divergence=name, ref_logp=ref, beta=0.7, level=level, values=values,
                       z_loss=0.01 if values == "free" else 0.0).loss

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_hidden_path_equals_logits_path_for_every_divergence():
    x = oracle.make_inputs((3,), 7, 8, 19, seed=2, weight_scale=1.0, ref_scale=None)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    for name in NAMES:
        for level in ("token", "sequence"):
            a = fk.loss(hidden, weight, labels, divergence=name, level=level, beta=0.5)
            b = fk.loss(logits=hidden @ weight.T, labels=labels, divergence=name, level=level, beta=0.5)
            torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_value_gauge_modes(level):
    """drop: invariant to a per-state logit shift; detach: shift gets no gradient; free: it does."""
    logits, labels, ref = batch(seed=4)
    shift = torch.zeros(labels.shape, requires_grad=True)
    results = {}
    for mode in ("drop", "detach", "free"):
        out = fk.loss(logits=logits + shift[..., None], labels=labels, divergence="js", ref_logp=ref,
                      level=level, values=mode)
        (gs,) = torch.autograd.grad(out.loss, shift)
        results[mode] = (out, gs)
    base = fk.loss(logits=logits + 3.0 * torch.randn(labels.shape)[..., None], labels=labels, divergence="js",
                   ref_logp=ref, level=level, values="drop")
    torch.testing.assert_close(base.loss, results["drop"][0].loss)
    assert results["drop"][1].abs().max() < 1e-6
    assert results["detach"][1].abs().max() < 1e-6
    assert results["free"][1].abs().max() > 1e-3


def test_z_loss_pulls_lse_towards_zero():
    logits, labels, _ = batch(seed=5)
    shift = torch.full(labels.shape, 4.0, requires_grad=True)
    out = fk.loss(logits=logits + shift[..., None], labels=labels, values="free", z_loss=0.1)
    (gs,) = torch.autograd.grad(out.loss, shift)
    assert gs[labels != -100].sum() > 0  # raising all logits raises the loss: lse is pushed down


def test_token_rewards_sum_to_sequence_reward_and_value_s0():
    logits, labels, ref = batch(seed=6)
    tok = fk.loss(logits=logits, labels=labels, ref_logp=ref, beta=0.4, level="token", values="detach")
    seq = fk.loss(logits=logits, labels=labels, ref_logp=ref, beta=0.4, level="sequence", values="detach")
    torch.testing.assert_close(tok.reward.sum(-1), seq.reward, atol=1e-5, rtol=1e-5)
    lse = oracle.stats(logits.double(), labels).lse.float()
    first = (labels != -100).float().argmax(-1)
    torch.testing.assert_close(seq.value_s0, lse.gather(1, first[:, None]).squeeze(1))


def test_sequence_level_options():
    logits, labels, ref = batch(seed=7)
    per_row_ref = (ref * (labels != -100)).sum(-1)
    a = fk.loss(logits=logits, labels=labels, ref_logp=ref, level="sequence", divergence="pearson", beta=0.1)
    b = fk.loss(logits=logits, labels=labels, ref_logp=per_row_ref, level="sequence", divergence="pearson", beta=0.1)
    torch.testing.assert_close(a.loss, b.loss)
    n = fk.loss(logits=logits, labels=labels, ref_logp=ref, level="sequence", divergence="js", beta=0.5,
                length_normalize=True)
    want = plain_loss("js", logits, labels, ref, 0.5, "sequence", length_normalize=True)
    assert abs(n.loss.item() - want.item()) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_reductions_sum_and_none(name):
    logits, labels, ref = batch(seed=8)
    mean = fk.loss(logits=logits, labels=labels, ref_logp=ref, divergence=name, beta=0.5)
    total = fk.loss(logits=logits, labels=labels, ref_logp=ref, divergence=name, beta=0.5, reduction="sum")
    none = fk.loss(logits=logits, labels=labels, ref_logp=ref, divergence=name, beta=0.5, reduction="none")
    n = (labels != -100).sum()
    assert none.loss.shape == labels.shape and (none.loss[labels == -100] == 0).all()
    if fk.DIVERGENCES[name].aggregate == "mean":
        torch.testing.assert_close(total.loss, none.loss.sum())
        torch.testing.assert_close(mean.loss, none.loss.sum() / n)
    else:  # log of the mean / sum of psi = -phi + offset
        psi = none.loss[labels != -100] + fk.DIVERGENCES[name].psi_offset
        torch.testing.assert_close(total.loss, torch.log(psi.sum()))
        torch.testing.assert_close(mean.loss, torch.log(psi.mean()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_ignored_rows_contribute_nothing(name, level):
    logits, labels, ref = batch(seed=9)
    labels2 = labels.clone()
    labels2[1] = -100
    keep = torch.tensor([0, 2])
    full = fk.loss(logits=logits, labels=labels2, ref_logp=ref, divergence=name, level=level, beta=0.5)
    sub = fk.loss(logits=logits[keep], labels=labels[keep], ref_logp=ref[keep], divergence=name, level=level, beta=0.5)
    torch.testing.assert_close(full.loss, sub.loss)
    lg = logits.clone().requires_grad_()
    everything_ignored = torch.full_like(labels, -100)
    out = fk.loss(logits=lg, labels=everything_ignored, ref_logp=ref, divergence=name, level=level)
    (g,) = torch.autograd.grad(out.loss, lg)
    assert out.loss.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all()

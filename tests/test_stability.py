"""Finite losses and gradients for every input a real run can produce; literal paper forms fail."""

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.reference import paper_forms

NAMES = sorted(fk.DIVERGENCES)


def extreme_batch(dtype, b=3, t=12, h=16, v=40, seed=0):
    """Logits of magnitude ~1e4, a fully ignored row, reference log-probs ~1e3 nats away."""
    x = oracle.make_inputs((b,), t, h, v, dtype=dtype, seed=seed, scale=25.0, weight_scale=25.0, ignore_rows=(1,),
                           ignore_at=((0, 0), (0, 1), (0, 2), (0, 3)), ref_scale=1.0)
    hidden, weight, _ = x.leaves()
    ref = torch.where(x.ref < -0.5, torch.tensor(-1000.0), torch.tensor(-0.01))  # half of them far away
    return hidden, weight, x.labels, ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", ["drop", "free"])
def test_finite_loss_and_grads_on_extreme_inputs(name, level, dtype, values):
    hidden, weight, labels, ref = extreme_batch(dtype)
    logits = (hidden.float() @ weight.float().T)
    assert logits.abs().max() > 5e3  # the regime the product promises to handle
    out = fk.loss(hidden, weight, labels, divergence=name, ref_logp=ref, beta=1.0, level=level,
                  values=values, z_loss=1e-4 if values == "free" else 0.0)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    assert torch.isfinite(out.loss), (name, level, out.loss)
    assert torch.isfinite(gh.float()).all() and torch.isfinite(gw.float()).all()
    assert (gh[1] == 0).all()  # the all-ignored row gets no gradient


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_finite_on_a_32k_token_sequence(name, level):
    x = oracle.make_inputs((1,), 32768, 8, 64, dtype=torch.bfloat16, seed=1, scale=4.0, weight_scale=1.0,
                           ignore_prefix=100, ref_scale=10.0)
    hidden, weight, _ = x.leaves()
    labels, ref = x.labels, x.ref
    out = fk.loss(hidden, weight, labels, divergence=name, ref_logp=ref, beta=1.0, level=level)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    # the sequence log-prob here is around -1e5 nats: exp() of it is 0 in any float format
    assert torch.isfinite(out.loss) and torch.isfinite(gh.float()).all() and torch.isfinite(gw.float()).all()


@pytest.mark.parametrize("name", ["kl", "squared_hellinger", "pearson", "js"])
def test_fp32_matches_float64_where_float64_is_finite(name):
    """Rewards near -300 nats: the naive fp32 form overflows, float64 does not; fk.loss in fp32 agrees."""
    x = oracle.make_inputs((2,), 6, 16, 30, seed=2, ref_scale=300.0)
    logits, labels, ref = x.hidden @ x.weight.T, x.labels, -x.ref  # references 0 .. +300 nats: rewards near -300
    out = fk.loss(logits=logits, labels=labels, divergence=name, ref_logp=ref, level="token")
    want = oracle.fdiv_loss(oracle.stats(logits.double(), labels), labels, divergence=name, ref_logp=ref)
    assert torch.isfinite(want)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * abs(want.item())


def _seq_inputs(logp_val, ref_val, v0, vt):
    f = lambda x: torch.tensor([x, -1.0], dtype=torch.float32)  # noqa: E731
    logp = f(logp_val).requires_grad_()
    return logp, f(ref_val), f(v0), f(vt)


@pytest.mark.parametrize("form,args", [
    ("squared_hellinger", (-300.0, -5.0, 0.0, 0.0)),   # sqrt(exp(logp)) underflows: NaN gradient
    ("js", (-5.0, -5.0, 200.0, 0.0)),                  # exp(log pi_ref + dV) overflows: inf loss
    ("pearson", (-5.0, -5.0, 150.0, 0.0)),             # exp(dV) overflows: -inf loss
])
def test_table4_literal_forms_break_where_fk_loss_does_not(form, args):
    logp, ref, v0, vt = _seq_inputs(*args)
    lit = paper_forms.literal_loss(form, logp, ref, v0, vt)
    (g,) = torch.autograd.grad(lit, logp, allow_unused=True) if lit.requires_grad else (None,)
    broken = (not torch.isfinite(lit)) or (g is not None and not torch.isfinite(g).all())
    assert broken, f"the literal {form} form was expected to overflow or give NaN here"
    # the same sequence statistics through fk.loss (sequence level, values with gradient)
    logits, labels = _logits_with_sequence_stats(args[0], args[2], args[3])
    out = fk.loss(logits=logits, labels=labels, divergence=form, ref_logp=torch.tensor([args[1]]),
                  level="sequence", values="free", z_loss=1e-3)
    (gl,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(gl).all()


@pytest.mark.parametrize("naive,r", [("kl", -150.0), ("js", -5.0)])  # exp overflow; clipped: zero gradient
def test_naive_kl_and_js_break_where_fk_loss_does_not(naive, r):
    logp = torch.tensor([r], requires_grad=True)
    zero = torch.zeros(1)
    lit = paper_forms.literal_loss(naive, logp, zero, zero, zero, naive=True)
    (g,) = torch.autograd.grad(lit, logp)
    assert (not torch.isfinite(lit)) or (not torch.isfinite(g).all()) or g.abs().max() > 1e5 or g.abs().max() == 0
    logits, labels = _logits_with_sequence_stats(r, 0.0, 0.0)
    out = fk.loss(logits=logits, labels=labels, divergence=naive, level="sequence")
    (gl,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(gl).all() and gl.abs().max() <= 1.0 + 1e-6


def _logits_with_sequence_stats(logp_total, v0, vt, t=4, v=16):
    """Logits for one row of t tokens whose label log-probs sum to logp_total, lse[0]=v0, lse[-1]=vt."""
    per = logp_total / t
    # two-level logits: label logit a, others 0 => logp = a - log(e^a + v - 1); solve for a given per
    import math
    p = math.exp(per)
    a = math.log(p * (v - 1) / (1 - p)) if p < 1 - 1e-12 else 30.0
    z = torch.zeros(1, t, v, dtype=torch.float64)
    z[..., 0] = a
    lse = torch.logsumexp(z, -1)
    shift = torch.zeros(1, t, dtype=torch.float64)
    shift[0, 0], shift[0, -1] = v0 - lse[0, 0], vt - lse[0, -1]
    logits = (z + shift[..., None]).float().requires_grad_()
    return logits, torch.zeros(1, t, dtype=torch.long)

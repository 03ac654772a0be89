"""Issue 16: every input class a real run can produce, one test group per class (each failed
before its fix; see the commit messages). The contract these tests pin is the table in
docs/math.md ("Input classes"); tests/test_properties.py draws the classes at random.
"""

from __future__ import annotations

import math

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels import TRL_F_DIVERGENCES
from fdiv_kernels.kernels import available_backends, cuda_backend, lowp, triton_backend

BACKENDS = [b for b in ("torch", "cpu") if available_backends("cpu").get(b) == "available"]
TRITON = (["triton"] if triton_backend.interpret_mode() and available_backends("cpu").get("triton") == "available"
          else [])
IGNORE = -100


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# 1. cpu backend gradients at large logits (the two-pass backward recomputed z with another rounding)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("scale,temperature,softcap", [(1e4, 0.7, None), (1e6, 0.7, None), (1e4, 1e-3, None),
                                                       (1e6, 1e-12, None), (1e4, 1.0, 1e8)],
                         ids=["1e4-T0.7", "1e6-T0.7", "1e4-T1e-3", "1e6-T1e-12", "1e4-cap1e8"])
@pytest.mark.parametrize("path", ["two_pass", "one_pass", "recompute"])
def test_gradients_match_float64_at_large_logits(backend, scale, temperature, softcap, path):
    x = oracle.make_inputs((), 16, 8, 50, seed=1, scale=scale / 8 ** 0.5, ref_scale=None)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    (h64,) = oracle.leaves64(hidden)
    st64 = oracle.token_stats(h64, weight, labels, softcap=softcap, temperature=temperature)
    logp64 = st64.logp
    want = torch.autograd.grad((-logp64).sum() + (0.5 * logp64.sum() if path == "recompute" else 0.0), h64)[0]
    h = hidden.clone().requires_grad_()
    if path == "two_pass":
        out = -fk.token_stats(h, weight, labels, backend=backend, softcap=softcap, temperature=temperature).logp.sum()
    else:
        res = fk.loss(h, weight, labels, backend=backend, softcap=softcap, temperature=temperature, reduction="sum")
        out = res.loss + (0.5 * res.logp.sum() if path == "recompute" else 0.0)
    (got,) = torch.autograd.grad(out, h)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-6, rel_err(got, want)  # the torch backend: ~6e-8; before the fix 2e-4 .. inf
    if path == "two_pass":  # the statistics too (triton's tanh lost relative accuracy for small arguments)
        st = fk.token_stats(hidden, weight, labels, backend=backend, softcap=softcap, temperature=temperature)
        assert rel_err(st.lse, st64.lse) < 1e-6


# ---------------------------------------------------------------------------------------------
# 2. masked vocabularies (-inf logits through the bias)
# ---------------------------------------------------------------------------------------------

def _masked(dtype=torch.float32, v=23, seed=2):
    """Five vocabulary columns masked with a -inf bias (N(0, 1) weights and bias), no label on them."""
    x = oracle.make_inputs((2,), 5, 6, v, dtype=dtype, seed=seed, weight_scale=1.0, bias_scale=1.0,
                           mask=(0, 1, 2, 9, 17), ignore_at=((1, 0),), ref_scale=None)
    return x.hidden, x.weight, x.bias, x.labels, x.masked


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_entropy", [False, True], ids=["entropy-unused", "entropy-in-loss"])
def test_masked_vocabulary_entropy_and_gradients_match_float64(backend, dtype, use_entropy):
    hidden, weight, bias, labels, masked = _masked(dtype)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    st = fk.token_stats(h, w, labels, bias=b, return_entropy=True, backend=backend)
    total = st.logp.sum() + (0.3 * st.entropy.sum() if use_entropy else 0.0)
    grads = torch.autograd.grad(total, (h, w, b))
    h64, w64, b64 = oracle.leaves64(hidden, weight, bias)
    logp, _, ent = oracle.token_stats(h64, w64, labels, b64)
    want = torch.autograd.grad(logp.sum() + (0.3 * ent.sum() if use_entropy else 0.0), (h64, w64, b64))
    assert torch.isfinite(st.entropy).all()
    torch.testing.assert_close(st.entropy.double(), ent.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.all(grads[1][masked] == 0) and torch.all(grads[2][masked] == 0)


def test_masked_vocabulary_from_logits():
    hidden, weight, bias, labels, masked = _masked()
    z = (hidden @ weight.T + bias).requires_grad_()
    st = fk.token_stats_from_logits(z, labels, return_entropy=True)
    (gz,) = torch.autograd.grad(st.entropy.sum() + st.logp.sum(), z)
    assert torch.isfinite(st.entropy).all() and torch.isfinite(gz).all()
    assert torch.all(gz[..., masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("api", ["loss", "token_stats", "sequence_logp", "logits"])
def test_fully_masked_vocabulary_or_masked_label_is_an_error(backend, api):
    hidden, weight, bias, labels, masked = _masked()

    def call(b, y):
        if api == "loss":
            return fk.loss(hidden, weight, y, bias=b, backend=backend).loss
        if api == "token_stats":
            return fk.token_stats(hidden, weight, y, bias=b, backend=backend).logp
        if api == "sequence_logp":
            return fk.sequence_logp(hidden, weight, y, bias=b, backend=backend).sum
        return fk.loss(logits=hidden @ weight.T + b, labels=y).loss

    with pytest.raises(ValueError, match=r"every logit at position \(0, 0\) is -inf .*bias"):
        call(torch.full_like(bias, -math.inf), labels)
    bad = labels.clone()
    bad[0, 3] = 9  # a masked column
    with pytest.raises(ValueError, match=r"labels\[0, 3\] = 9 is a masked token"):
        call(bias, bad)
    # a fully masked row at an ignored position is harmless
    ok = labels.clone()
    ok[1, :] = IGNORE
    assert torch.isfinite(call(bias, ok)).all()


# ---------------------------------------------------------------------------------------------
# 3. non-finite inputs: references, soft-cap, temperature
# ---------------------------------------------------------------------------------------------

def _small(seed=3, rows=2, t=5, v=17):
    x = oracle.make_inputs((rows,), t, 6, v, seed=seed, weight_scale=0.5, ref_scale=3.0)
    return x.hidden, x.weight, x.labels, x.ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", sorted(fk.DIVERGENCES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "+inf"])
def test_invalid_reference_is_an_error_and_harmless_where_ignored(backend, divergence, level, value):
    """NaN, or +inf (not a log-probability), at a supervised position: an error (NaN gave a NaN
    loss, or a finite loss with NaN gradients for Pearson); at an ignored position: no effect."""
    hidden, weight, labels, ref = _small()
    bad = ref.clone()
    bad[0, 1] = value
    h = hidden.clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"ref_logp is {value} at supervised position \(0, 1\)"):
        fk.loss(h, weight, labels, divergence=divergence, ref_logp=bad, level=level, beta=0.5, backend=backend)
    y = labels.clone()
    y[0, 1] = IGNORE
    out = fk.loss(h, weight, y, divergence=divergence, ref_logp=bad, level=level, beta=0.5, backend=backend)
    want = fk.loss(h, weight, y, divergence=divergence, ref_logp=ref, level=level, beta=0.5, backend=backend)
    (g1,) = torch.autograd.grad(out.loss, h)
    (g2,) = torch.autograd.grad(want.loss, h)
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(g1, g2)
    if level == "sequence":
        with pytest.raises(ValueError, match=f"ref_logp is {value} for row 1"):
            fk.loss(h, weight, labels, divergence=divergence, ref_logp=torch.tensor([0.0, value]),
                    level=level, backend=backend)


#: sup phi(u) as u -> +inf, the loss contribution of a token whose reference is -inf
LIMITS = {"pearson": 1.0, "js": math.log(2.0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", sorted(fk.DIVERGENCES))
def test_minus_inf_reference_is_the_limit_or_an_error(backend, divergence):
    """pi_ref = 0 at a supervised token: the reward is +inf. Bounded objectives take their limit
    (finite loss, zero gradient from that token); unbounded ones (tv, reverse_kl, neyman) raise."""
    hidden, weight, labels, ref = _small()
    bad = ref.clone()
    bad[0, 1] = -math.inf
    h = hidden.clone().requires_grad_()
    run = lambda r, y=labels: fk.loss(h, weight, y, divergence=divergence, ref_logp=r, beta=0.5,  # noqa: E731
                                      backend=backend)
    if divergence in ("tv", "reverse_kl", "neyman"):
        with pytest.raises(ValueError, match=r"ref_logp is -inf at supervised position \(0, 1\).*"
                                             rf"divergence '{divergence}' has no finite limit"):
            run(bad)
        return
    out = run(bad)
    (grad,) = torch.autograd.grad(out.loss, h)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    y = labels.clone()
    y[0, 1] = IGNORE
    rest = run(ref, y)
    n = int((labels != IGNORE).sum())
    div = fk.get_divergence(divergence)
    if div.aggregate == "mean":  # (sum of the others + the limit) / n
        want = (rest.loss * (n - 1) - LIMITS[divergence]) / n
    else:  # psi = 0 there: log((sum of the others' psi) / n)
        want = rest.loss + math.log((n - 1) / n)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[0, 1] == 0) or div.aggregate == "mean"  # lme: that token's weight is exactly 0
    if div.aggregate == "logmeanexp":  # every supervised reference -inf: log mean psi = -inf
        with pytest.raises(ValueError, match="every supervised reward is \\+inf"):
            run(torch.full_like(ref, -math.inf))


@pytest.mark.parametrize("kw,msg", [
    (dict(softcap=math.inf), "softcap must be None or a finite number > 0"),
    (dict(softcap=math.nan), "softcap must be None or > 0"),
    (dict(temperature=math.inf), "temperature must be a finite number > 0"),
    (dict(temperature=math.nan), "temperature must be > 0"),
    (dict(z_loss=math.inf), "z_loss must be a finite number"),
    (dict(beta=math.inf), "beta must be a finite number"),
])
def test_non_finite_options_are_errors(kw, msg):
    hidden, weight, labels, _ = _small()
    with pytest.raises(ValueError, match=msg):
        fk.loss(hidden, weight, labels, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hidden_is_an_error(backend):
    hidden, weight, labels, _ = _small()
    hidden[1, 2, 0] = math.inf
    with pytest.raises(ValueError, match=r"the logits at position \(1, 2\) are not finite.*hidden, weight or bias"):
        fk.loss(hidden.requires_grad_(), weight, labels, backend=backend)


def test_data_checks_switch(monkeypatch):
    """FDIV_CHECK_FINITE=0 turns the data checks off: the arithmetic's NaN comes through."""
    hidden, weight, labels, ref = _small()
    ref[0, 0] = math.nan
    monkeypatch.setenv("FDIV_CHECK_FINITE", "0")
    assert torch.isnan(fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref).loss)
    monkeypatch.setenv("FDIV_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="ref_logp is nan"):
        fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref)


# ---------------------------------------------------------------------------------------------
# 4. DPO: f-divergence scores in range, limits of infinite references
# ---------------------------------------------------------------------------------------------

def _grad(fn, pc):
    out = fn(pc)
    (g,) = torch.autograd.grad(out.loss, pc)
    return out, g


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("f,alpha", [("forward_kl", 1.0), ("alpha", 0.5), ("alpha", 1.5), ("alpha", 3.0), ("js", 1.0)])
@pytest.mark.parametrize("lr", [-45.0, -300.0, -3e4, 45.0, 3e4])
def test_f_divergence_dpo_is_finite_for_any_log_ratio(kind, f, alpha, lr):
    pc = torch.tensor([lr, -1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.zeros(2), torch.zeros(2)
    div = TRL_F_DIVERGENCES.get(f, f)  # the test's TRL names
    out, g = _grad(lambda p: fk.dpo_loss(p, pr, rc, rr, beta=0.1, loss_type=kind, divergence=div, alpha=alpha), pc)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss) and torch.isfinite(g).all()
    if lr != -45.0 or kind != "ipo" or f != "forward_kl":
        return
    # ipo: exact (TRL's formula in float64) up to an exponent of 30, a C1 logarithmic tail beyond
    for x in (-29.0, -30.0):
        trl = ((1 - math.exp(-x)) - (1 - math.exp(1.0)) - 1 / 0.2) ** 2
        got = fk.dpo_loss(torch.tensor([x]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=0.1,
                          loss_type="ipo", divergence="reverse_kl").loss
        assert float(got) == pytest.approx(trl, rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_infinite_reference_is_the_limit_or_an_error(kind, smoothing):
    """ref_chosen = -inf (pi_ref = 0): an infinite margin. The sigmoid/robust/hinge losses tend to
    0 with a zero gradient without label smoothing; with smoothing, and for ipo, the limit is not
    finite: an error naming the argument and the pair."""
    if kind in ("hinge", "ipo") and smoothing:
        pytest.skip("no label smoothing for hinge/ipo")
    pc = torch.tensor([-3.0, -1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-math.inf, 0.0]), torch.zeros(2)
    run = lambda p: fk.dpo_loss(p, pr, rc, rr, beta=0.1, loss_type=kind, label_smoothing=smoothing)  # noqa: E731
    if smoothing or kind == "ipo":
        with pytest.raises(ValueError, match="pair 0: ref_chosen = -inf gives the"):
            run(pc)
        return
    out, g = _grad(run, pc)
    assert float(out.losses[0].detach()) == 0.0 and float(g[0]) == 0.0 and torch.isfinite(out.loss)
    both = torch.tensor([-math.inf, 0.0])
    with pytest.raises(ValueError, match=r"pair 0: ref_chosen = -inf, ref_rejected = -inf: .*undefined"):
        fk.dpo_loss(pc, pr, both, both, beta=0.1, loss_type=kind)


@pytest.mark.parametrize("kind", [k for k, t in fk.DPO_LOSS_TYPES.items() if t.needs_reference])
@pytest.mark.parametrize("which", ["ref_chosen", "ref_rejected"])
def test_every_dpo_type_at_an_infinite_reference(kind, which):
    """``ref_chosen = -inf`` (or ``ref_rejected``): each type's limit where it is finite (exo_pair's
    ``-log(1-eps)``, bco_pair's and apo's bounded terms, sigmoid-like types' 0), with finite
    gradients; else a ValueError naming the argument and the pair (nca_pair, sppo_hard, ...)."""
    from fdiv_kernels.formulas.preference import pair_losses

    opts = dict(beta=0.1, loss_type=kind, label_smoothing=1e-3 if kind == "exo_pair" else 0.0)
    pc = torch.tensor([-3.0, -1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.zeros(2), torch.zeros(2)
    (rc if which == "ref_chosen" else rr)[0] = -math.inf
    with torch.no_grad():
        limit = pair_losses(pc.double(), pr.double(), rc.double(), rr.double(), fk.DPOSpec(**opts))
    if bool(torch.isfinite(limit).all()):
        out, g = _grad(lambda p: fk.dpo_loss(p, pr, rc, rr, **opts), pc)
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all()
        torch.testing.assert_close(out.losses.double(), limit, rtol=1e-6, atol=1e-6)
    else:
        with pytest.raises(ValueError, match=rf"pair 0: {which} = -inf gives the"):
            fk.dpo_loss(pc, pr, rc, rr, **opts)


def test_orpo_at_a_certain_answer():
    """ORPO on mean log-probs: a chosen answer of probability 1 (mean log-prob 0) is the loss's
    limit 0 with finite gradients; a rejected one is an infinite loss: a ValueError saying so."""
    pc = torch.tensor([0.0, -1.0], requires_grad=True)
    out, g = _grad(lambda p: fk.dpo_loss(p, torch.tensor([-0.5, -2.0]), beta=0.1, loss_type="orpo"), pc)
    assert float(out.losses[0].detach()) == 0.0 and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="pair 1: policy_rejected = 0: orpo's odds need mean log-probs < 0"):
        fk.dpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-0.5, 0.0]), beta=0.1, loss_type="orpo")


def test_dpo_nan_is_an_error():
    x = torch.zeros(3)
    bad = torch.tensor([0.0, math.nan, 0.0])
    with pytest.raises(ValueError, match=r"pair 1: ref_rejected = nan is not a log-probability"):
        fk.dpo_loss(x, x, x, bad, beta=0.1)
    assert torch.isfinite(fk.dpo_loss(x, x, x, bad, beta=0.1, loss_type="simpo").loss)  # simpo uses no reference
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        fk.dpo_loss(x, x, beta=0.1, loss_type="simpo", gamma=math.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_minus_inf_reference(backend):
    x = oracle.make_inputs((4,), 3, 6, 11, seed=4, weight_scale=1.0, ref_scale=None)
    hidden, weight, labels = x.hidden.requires_grad_(), x.weight, x.labels
    ref = torch.tensor([-math.inf, -2.0, -1.0, -3.0])  # chosen 0, chosen 1, rejected 0, rejected 1
    loss = fk.nn.FusedLinearDPOLoss(beta=0.1, backend=backend)(hidden, weight, labels, ref_logp=ref)
    (gh,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(loss) and torch.isfinite(gh).all()
    assert torch.all(gh[0] == 0) and torch.all(gh[2] == 0)  # pair 0 is at its limit: no gradient
    with pytest.raises(ValueError, match=r"pair 0: ref_logp \(chosen\) = -inf"):
        fk.nn.FusedLinearDPOLoss(beta=0.1, label_smoothing=0.1, backend=backend)(hidden, weight, labels, ref_logp=ref)


# ---------------------------------------------------------------------------------------------
# 5. reduction="none" of the log-mean-exp divergences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "squared_hellinger"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_element_log_mean_exp_losses_are_finite(backend, divergence, level):
    hidden, weight, labels, ref = _small()
    ref = ref.clone()
    ref[0] = 150.0  # far "above" the policy: u ~ -150 on row 0, psi ~ e^150 overflows float32
    ref[1] = 0.0
    h = hidden.clone().requires_grad_()
    out = fk.loss(h, weight, labels, divergence=divergence, ref_logp=ref, reduction="none", level=level,
                  backend=backend)
    (grad,) = torch.autograd.grad(out.loss.sum(), h)
    assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all()
    div = fk.get_divergence(divergence)
    u = out.reward.double()
    exact = torch.exp(div.log_psi(u)) - div.psi_offset
    small = div.log_psi(u) <= 50  # exact there; linear in log psi beyond
    assert bool(small.any()) and bool((~small).any())
    torch.testing.assert_close(out.loss.double()[small], exact[small], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 6. degenerate shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("shape", [(2, 0), (0,), (0, 3), (2, 1, 0)], ids=str)
@pytest.mark.parametrize("kw", [dict(divergence="sft"), dict(divergence="kl", level="sequence", values="free"),
                                dict(divergence="js", reduction="none"), dict(divergence="pearson", z_loss=0.1),
                                dict(divergence="kl", form="primal")], ids=lambda kw: "-".join(map(str, kw.values())))
def test_empty_rows_give_zero_loss_and_zero_gradients(backend, shape, kw):
    h = torch.randn(*shape, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.long)
    kw = dict(kw)  # the parametrized dict is shared: pop from a copy
    out = (fk.primal_loss if kw.pop("form", None) == "primal" else fk.loss)(h, w, labels, backend=backend, **kw)
    gh, gw = torch.autograd.grad(out.loss.sum(), (h, w), allow_unused=True)
    assert torch.all(out.loss == 0)
    rows = shape[:-1] if len(shape) > 1 else ()
    if kw.get("reduction") == "none":
        assert out.loss.shape == (shape if kw.get("level", "token") == "token" else rows)
    assert gh.shape == h.shape and torch.all(gh == 0) and (gw is None or torch.all(gw == 0))
    assert out.value_s0.shape == rows and out.reward.shape[:len(rows)] == rows
    seq = fk.sequence_logp(h, w, labels, backend=backend)
    assert seq.sum.shape == rows and torch.all(seq.count == 0)


def test_zero_dim_labels_and_empty_vocabulary():
    with pytest.raises(ValueError, match="labels must have at least one dimension"):
        fk.loss(torch.randn(4), torch.randn(7, 4), torch.tensor(3))
    with pytest.raises(ValueError, match="labels must have at least one dimension"):
        fk.sequence_logp(torch.randn(4), torch.randn(7, 4), torch.tensor(3))
    st = fk.token_stats(torch.randn(4), torch.randn(7, 4), torch.tensor(3))  # one token: 0-d outputs
    assert st.logp.shape == () and torch.isfinite(st.logp)
    with pytest.raises(ValueError, match="weight has an empty vocabulary"):
        fk.loss(torch.randn(2, 4), torch.randn(0, 4), torch.full((2,), IGNORE))
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., V\] with V >= 1"):
        fk.loss(logits=torch.randn(2, 0), labels=torch.full((2,), IGNORE))


# ---------------------------------------------------------------------------------------------
# 7. float16 coefficients before the gradient GEMMs (triton, cuda)
# ---------------------------------------------------------------------------------------------

def _fp16_case():
    """Per-token derivatives of 2e5 with small weights: the true gradients fit float16, the
    coefficient dL/draw does not."""
    x = oracle.make_inputs((2,), 8, 16, 48, dtype=torch.float16, seed=0, scale=1 / 64, weight_scale=1 / 256,
                           ref_scale=None)
    return x.hidden, x.weight, x.labels


def _fp16_grads(backend, path):
    hidden, weight, labels = _fp16_case()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if path == "one_pass":  # the derivative is inside the loss: beta (TV: g = -beta per token)
        total = fk.loss(h, w, labels, divergence="tv", beta=2e5, reduction="sum", backend=backend).loss
    else:  # the two-pass backward gets it from grad_output
        total = -fk.token_stats(h, w, labels, backend=backend).logp.sum() * 2e5
    return torch.autograd.grad(total, (h, w))


def _assert_fp16_grads_match_torch(backend, path):
    got, want = _fp16_grads(backend, path), _fp16_grads("torch", path)
    for a, b in zip(got, want):
        assert b.float().abs().max() < 65504  # the true gradients fit float16
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.float().abs().max()))


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
def test_triton_fp16_coefficient_stays_in_range(backend, path):
    _assert_fp16_grads_match_torch(backend, path)


def test_cuda_driver_fp16_coefficient_stays_in_range(monkeypatch):
    """The cuda backend's one-pass driver (its CPU twin, tests/test_cuda_twin.py) writes the
    coefficient in float16 over the logits: scaled into range, the gradients match torch's."""
    from test_cuda_twin import FakeEpilogues
    import functools
    from fdiv_kernels.kernels import backends, torch_chunked
    b = backends.Backend(name="cuda-twin16", forward=torch_chunked.forward, backward=torch_chunked.backward,
                         device_types=("cpu",), is_available=lambda: (True, ""), priority=-100,
                         dtypes=(torch.float32, torch.bfloat16, torch.float16),
                         single_pass=functools.partial(cuda_backend.ChunkKernels, mod=FakeEpilogues()),
                         chunk_tokens=lambda v, h, dt: 6)
    monkeypatch.setitem(backends._BACKENDS, "cuda-twin16", b)
    _assert_fp16_grads_match_torch("cuda-twin16", "one_pass")


def test_fp16_coefficient_scale_bounds_the_coefficient():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g) * 4
    z[:, :3] = -math.inf
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    ent = lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)
    gg, k, e = (torch.randn(6, generator=g) * 1e5 for _ in range(3))
    labels = torch.randint(3, 40, (6,), generator=g)
    coef = (k - gg)[:, None] * p - e[:, None] * p * torch.where(p > 0, z - (lse - ent)[:, None], 0.0)
    coef[torch.arange(6), labels] += gg
    bound = lowp.coef_bound(gg, k, e, ent, 0.5)
    assert float((coef / 0.5).abs().max()) <= float(bound)
    s = lowp.fp16_coef_scale(torch.float16, gg, k, e, ent, 0.5)
    assert float(bound * s) <= lowp.FP16_COEF_LIMIT and float(torch.log2(s)) == round(float(torch.log2(s)))
    assert lowp.fp16_coef_scale(torch.bfloat16, gg, k) is None
    assert float(lowp.fp16_coef_scale(torch.float16, gg / 1e6, k / 1e6)) == 1.0


# ---------------------------------------------------------------------------------------------
# 8. the log-mean-exp aggregate: what docs/math.md claims, and exact gradient accumulation
# ---------------------------------------------------------------------------------------------

def _lme_case(seed=6, rows=6, t=4):
    x = oracle.make_inputs((rows,), t, 5, 13, seed=seed, weight_scale=1.0, ref_scale=4.0)
    return x.hidden, x.weight, x.labels, x.ref


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("divergence", ["kl", "squared_hellinger"])
def test_lme_gradient_is_the_exact_gradient_over_mean_psi(divergence):
    hidden, weight, labels, ref = _lme_case()
    h = hidden.clone().requires_grad_()
    lme = fk.loss(h, weight, labels, divergence=divergence, ref_logp=ref, beta=0.5)
    exact = fk.loss(h, weight, labels, divergence=divergence, ref_logp=ref, beta=0.5, reduction="none")
    n = int(exact.mask.sum())
    exact_loss = exact.loss.sum() / n  # -mean(phi) = mean(psi) - offset
    g_lme, g_exact = _flat_grad(lme.loss, [h]), _flat_grad(exact_loss, [h])
    mean_psi = float(exact_loss.detach()) + fk.get_divergence(divergence).psi_offset
    torch.testing.assert_close(g_lme, g_exact / mean_psi, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw,parallel", [(dict(values="drop"), True), (dict(values="detach"), True),
                                        (dict(values="free"), False), (dict(values="drop", z_loss=0.5), False)],
                         ids=["drop", "detach", "free", "z_loss"])
def test_lme_gradient_is_parallel_to_the_exact_one_only_without_linear_terms(kw, parallel):
    """The exact objective is mean(psi(u)) - 1 (+ mean V(s0) with values='free', + z_loss
    mean(lse^2)); the package minimises log mean(psi(u)) plus the same linear terms."""
    hidden, weight, labels, ref = _lme_case()
    h = hidden.clone().requires_grad_()
    out = fk.loss(h, weight, labels, divergence="squared_hellinger", ref_logp=ref, beta=0.5, **kw)
    psi = torch.exp(fk.get_divergence("squared_hellinger").log_psi(out.reward))
    exact = psi[out.mask].mean() - 1
    if kw["values"] == "free":
        exact = exact + out.value_s0[out.mask.any(-1)].mean()
    if kw.get("z_loss"):
        exact = exact + kw["z_loss"] * (out.lse[out.mask] ** 2).mean()
    (g_lme,) = torch.autograd.grad(out.loss, h, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, h)
    cos = float(torch.nn.functional.cosine_similarity(g_lme.reshape(-1), g_exact.reshape(-1), dim=0))
    assert (cos > 1 - 1e-5) if parallel else (cos < 0.99), cos


def test_one_sequence_per_batch_kl_is_the_tv_objective():
    """Sequence level, one row: log psi(u) = -u - 1, so the KL loss is -u - 1 and its gradient
    is TV's (the minibatch bias of the log-mean-exp at its extreme)."""
    hidden, weight, labels, ref = _lme_case(rows=1)
    h = hidden.clone().requires_grad_()
    kl = fk.loss(h, weight, labels, divergence="kl", level="sequence", ref_logp=ref, beta=0.5)
    tv = fk.loss(h, weight, labels, divergence="tv", level="sequence", ref_logp=ref, beta=0.5)
    torch.testing.assert_close(kl.loss, tv.loss - 1)
    torch.testing.assert_close(_flat_grad(kl.loss, [h]), _flat_grad(tv.loss, [h]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,level", [("kl", "token"), ("squared_hellinger", "sequence")])
def test_micro_batches_accumulate_the_global_log_mean_exp_exactly(backend, divergence, level):
    """LogSumExpAccumulator: gradient accumulation over 3 micro-batches gives the global batch's
    loss and gradient (plain averaging of micro-batch losses does not)."""
    hidden, weight, labels, ref = _lme_case()
    labels[2, :] = IGNORE  # an empty row in a micro-batch
    w = weight.clone().requires_grad_()
    kw = dict(divergence=divergence, level=level, beta=0.5, backend=backend)
    full = fk.loss(hidden, w, labels, ref_logp=ref, **kw)
    (g_full,) = torch.autograd.grad(full.loss, w)
    acc = fk.specs.LogSumExpAccumulator()
    w.grad = None
    naive = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        out = fk.loss(hidden[sl], w, labels[sl], ref_logp=ref[sl], reduction="sum", **kw)
        units = out.mask.sum() if level == "token" else out.mask.any(-1).sum()
        rescale, weight_now = acc.add(out.loss.detach(), count=int(units))
        if w.grad is not None:
            w.grad.mul_(rescale)
        (weight_now * out.loss).backward()
        naive += float(fk.loss(hidden[sl], w, labels[sl], ref_logp=ref[sl], **kw).loss.detach()) / 3
    assert acc.loss() == pytest.approx(float(full.loss.detach()), rel=1e-5)
    torch.testing.assert_close(w.grad, g_full, rtol=1e-5, atol=1e-6)
    assert abs(naive - float(full.loss.detach())) > 1e-3  # the average of micro-batch losses is another objective


def test_accumulator_edge_cases():
    acc = fk.specs.LogSumExpAccumulator()
    assert acc.add(-math.inf) == (1.0, 0.0) and acc.loss() == 0.0
    assert acc.add(0.0, count=1) == (0.0, 1.0)
    rescale, weight = acc.add(0.0, count=1)
    assert rescale == pytest.approx(0.5) and weight == pytest.approx(0.5)
    assert acc.loss() == pytest.approx(0.0) and acc.loss("sum") == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="log_sum must be finite or -inf"):
        acc.add(math.nan)

"""fdiv_kernels.nn modules against plain float64 torch references (full logits + autograd)."""

import oracle
import pytest
import torch
import torch.nn.functional as F

import fdiv_kernels as fk
from fdiv_kernels.nn import FDivLoss, FusedLinearDPOLoss, FusedLinearFDivLoss
from fdiv_kernels.specs import PrimalSpec

B, T, H, V = 3, 7, 16, 50


def _data(seed=0, dtype=torch.float64, bias=False):
    """``(hidden, weight, bias, labels)`` leaves from the suite's builder: [3, 7] labels, H=16, V=50."""
    x = oracle.make_inputs((B,), T, H, V, dtype=dtype, seed=seed, weight_scale=0.5, bias=bias, bias_scale=0.3,
                           ignore_at=((0, 0), (0, 1), (2, 4)), ref_scale=None)
    hidden, weight, b = x.leaves()
    return hidden, weight, b, x.labels


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


def test_fdivloss_sft_equals_cross_entropy_with_shift():
    hidden, weight, _, labels = _data()
    logits = (hidden @ weight.T).detach().requires_grad_()
    got = FDivLoss(shift_labels=True)(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(_grads(got, logits)[0], _grads(ref, logits)[0], atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_sft_equals_cross_entropy(bias):
    hidden, weight, b, labels = _data(bias=bias)
    fn = FusedLinearFDivLoss(backend="torch")
    got = fn(hidden, weight, labels, bias=b)
    z = hidden @ weight.T + (b if b is not None else 0)
    ref = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, ref, atol=1e-12)
    for a, r in zip(_grads(got, hidden, weight, b), _grads(ref, hidden, weight, b)):
        assert torch.allclose(a, r, atol=1e-10)


def test_fused_linear_accepts_head_module():
    head = torch.nn.Linear(H, V, bias=True).double()
    hidden, _, _, labels = _data()
    got = FusedLinearFDivLoss(shift_labels=True)(hidden, head, labels)
    ref = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert torch.allclose(got, ref, atol=1e-12)


def test_fused_linear_js_with_reference_and_softcap_matches_formula():
    """JS objective: loss = -mean(log 2 + logsigmoid(beta * (logp - ref_logp))), logits = c*tanh(z/c)/T."""
    hidden, weight, _, labels = _data(seed=1)
    ref_logp = -torch.rand(B, T, dtype=torch.float64) * 5
    beta, cap, temp = 0.3, 4.0, 1.7
    fn = FusedLinearFDivLoss(divergence="js", beta=beta, softcap=cap, temperature=temp, backend="torch")
    out = fn(hidden, weight, labels, ref_logp=ref_logp, return_output=True)
    st = oracle.token_stats(hidden, weight, labels, softcap=cap, temperature=temp)
    ref = oracle.fdiv_loss(st, labels, divergence="js", ref_logp=ref_logp, beta=beta)
    assert torch.allclose(out.loss, ref, atol=1e-12)
    for a, r in zip(_grads(out.loss, hidden, weight), _grads(ref, hidden, weight)):
        assert torch.allclose(a, r, atol=1e-10)


def test_fused_linear_matches_logits_module_for_every_divergence():
    hidden, weight, _, labels = _data(seed=2)
    ref_logp = -torch.rand(B, T, dtype=torch.float64) * 3
    for name in fk.DIVERGENCES:
        kw = dict(divergence=name, beta=0.5, shift_labels=True)
        a = FusedLinearFDivLoss(**kw)(hidden, weight, labels, ref_logp=ref_logp)
        b = FDivLoss(**kw)(hidden @ weight.T, labels, ref_logp=ref_logp)
        assert torch.isfinite(a) and torch.allclose(a, b, atol=1e-10), name


def _seq_logps(hidden, weight, labels, mean):
    s, m, _ = oracle.sequence_logp(oracle.token_stats(hidden, weight, labels), labels)
    return m if mean else s


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_fused_linear_dpo_matches_trl_formulas(kind):
    x = oracle.make_inputs((4,), T, H, V, dtype=torch.float64, seed=3, weight_scale=0.5, ignore_prefix=3,  # prompt
                           ignore_at=((1, -1),), ref_scale=None)  # padding
    hidden, weight, _ = x.leaves()
    labels = x.labels
    g = torch.Generator().manual_seed(3)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(4, T, H, generator=g, dtype=torch.float64)
    beta = 0.2
    fn = FusedLinearDPOLoss(beta=beta, loss_type=kind, gamma=0.5)
    got = fn(hidden, weight, labels, ref_hidden=None if kind == "simpo" else ref_hidden)
    mean = kind in ("ipo", "simpo")
    pc, pr = _seq_logps(hidden, weight, labels, mean).chunk(2)
    rc, rr = _seq_logps(ref_hidden, weight.detach(), labels, mean).chunk(2)
    ref = oracle.dpo_losses(kind, pc, pr, rc, rr, beta=beta, gamma=0.5).mean()
    assert got.dtype == torch.float64 and torch.allclose(got, ref, atol=1e-12)
    for a, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight)):
        assert torch.allclose(a, r, atol=1e-10)


def test_fused_linear_dpo_precomputed_reference_pair():
    hidden, weight, _, labels = _data(seed=4)
    hidden = torch.cat([hidden, hidden.detach().flip(0)])[:4]
    labels = torch.cat([labels, labels.flip(0)])[:4]
    ref = -torch.rand(4, dtype=torch.float64) * 10
    fn = FusedLinearDPOLoss(beta=0.1)
    a = fn(hidden, weight, labels, ref_logp=ref)
    b = fn(hidden, weight, labels, ref_logp=tuple(ref.chunk(2)))
    pc, pr = _seq_logps(hidden, weight, labels, False).chunk(2)
    expect = oracle.dpo_losses("sigmoid", pc, pr, ref[:2], ref[2:], beta=0.1).mean()
    assert torch.allclose(a, expect, atol=1e-12) and torch.equal(a, b)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown divergence"):
        FDivLoss(divergence="nope")
    with pytest.raises(ValueError, match="beta"):
        FusedLinearFDivLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="dpo++")
    hidden, weight, _, labels = _data()
    with pytest.raises(ValueError, match="2B"):
        FusedLinearDPOLoss()(hidden, weight, labels, ref_logp=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a reference"):
        FusedLinearDPOLoss()(hidden[:2], weight, labels[:2])
    with pytest.raises(ValueError, match="labels must have shape"):
        FusedLinearFDivLoss(shift_labels=True)(hidden, weight, labels[:, :-1])


def test_primal_form_matches_closed_form():
    """Primal losses (a PrimalSpec), tv: D_TV(onehot(y) || p) = 1 - p_y; alpha: expm1((1-a) log p_y) / (a(a-1))."""
    hidden, weight, _, labels = _data(seed=5)
    z = hidden @ weight.T
    logp = oracle.stats(z, labels).logp
    m = labels != -100
    got = FusedLinearFDivLoss(spec=PrimalSpec("tv"))(hidden, weight, labels)
    assert torch.allclose(got, (1 - logp.exp())[m].mean(), atol=1e-12)
    a = 1.5
    got = FDivLoss(PrimalSpec("alpha", alpha=a))(z, labels)
    assert torch.allclose(got, (torch.expm1((1 - a) * logp) / (a * (a - 1)))[m].mean(), atol=1e-12)


def test_dpo_f_divergence_js_scores():
    """f-DPO with JS scores: h = s(lr_c) - s(lr_r), s(lr) = log 2 + logsigmoid(lr)."""
    hidden, weight, _, labels = _data(seed=6)
    hidden, labels = hidden[:2], labels[:2]
    ref = -torch.rand(2, dtype=torch.float64) * 20
    got = FusedLinearDPOLoss(beta=0.5, divergence="js")(hidden, weight, labels, ref_logp=ref)
    s = _seq_logps(hidden, weight, labels, False)
    expect = oracle.dpo_losses("sigmoid", s[:1], s[1:], ref[:1], ref[1:], beta=0.5, f_divergence="js")[0]
    assert torch.allclose(got, expect, atol=1e-12)


def test_documented_custom_module_with_token_stats_function():
    """The docs/integrations.md pattern: any function of (logp, lse) from TokenStatsFunction, vs full logits."""
    hidden, weight, _, labels = _data(seed=7)
    h, y = hidden.reshape(-1, H), labels.reshape(-1)
    logp, lse, ent = fk.TokenStatsFunction.apply(h, weight, None, y, fk.TokenStatsParams(ignore_index=-100))
    assert ent.numel() == 0
    m = y != -100
    got = -(logp - 0.01 * lse.pow(2))[m].mean()
    st = oracle.token_stats(h, weight, y)
    ref = -(st.logp - 0.01 * st.lse.pow(2))[m].mean()
    assert torch.allclose(got, ref, atol=1e-12)
    for a, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight)):
        assert torch.allclose(a, r, atol=1e-10)

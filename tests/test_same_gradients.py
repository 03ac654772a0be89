"""The same loss gives the same values and gradients on every path, and the gradients a call hands
out are the caller's: a differentiable reference, returned gradients that never alias saved state,
one rule for a reference that is not a log-probability, and the causal-LM shift on every entry
point that reads labels."""

from __future__ import annotations

import math

import pytest
import torch

import fdiv_kernels as fk

V, H = 29, 8
PATHS = ("one_pass", "two_pass", "compiled")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each compiled case traces anew (dynamo otherwise makes a changed float option dynamic)."""
    torch.compiler.reset()
    yield


def _data(seed=0, rows=4, t=6, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (rows, t), generator=g)
    if ignore:
        labels[0, :2] = -100
        labels[-1, 4:] = -100
    return hidden, weight, labels, g


def _run(path, fn, *tensors):
    """Values and gradients of ``fn(*tensors)`` (every floating tensor a leaf) on ``path``."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]
    call = torch.compile(fn, fullgraph=True, backend="eager") if path == "compiled" else fn
    with fk.config(single_pass=path != "two_pass"):
        out = call(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


CASES = {
    "js_token": dict(divergence="js", beta=0.7),
    "kl_token": dict(divergence="kl", beta=0.4),
    "pearson_sequence_per_token_ref": dict(divergence="pearson", level="sequence", beta=0.3),
    "squared_hellinger_sequence_detach": dict(divergence="squared_hellinger", level="sequence", values="detach"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_a_differentiable_reference_gets_its_gradient_on_every_path(case, path):
    """A trained reference (``ref_logp`` requiring grad) gets the same gradient on the one-pass,
    two-pass and compiled paths, equal to float64 autograd on full logits."""
    hidden, weight, labels, g = _data(seed=1)
    ref = -torch.rand(labels.shape, generator=g, dtype=torch.float64) * 2
    opts = CASES[case]

    def loss(h, w, r):
        return fk.loss(h, w, labels, ref_logp=r, backend="torch", **opts).loss

    def oracle(h, w, r):
        return fk.loss(logits=h @ w.T, labels=labels, ref_logp=r, **opts).loss  # plain torch autograd

    _assert_same_with_a_reference_gradient(_run(path, loss, hidden, weight, ref),
                                           _run("two_pass", oracle, hidden, weight, ref))


def _assert_same_with_a_reference_gradient(got, want):
    """Equal values and gradients (float64), and the reference (third input) got a gradient."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert got[1][2].abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
def test_a_differentiable_per_row_reference_and_dpo_reference(path):
    hidden, weight, labels, g = _data(seed=2)
    ref_row = -torch.rand(4, generator=g, dtype=torch.float64) * 5

    def seq(h, w, r):
        return fk.loss(h, w, labels, ref_logp=r, divergence="js", level="sequence", beta=0.2, backend="torch").loss

    def dpo(h, w, r):
        return fk.nn.FusedLinearDPOLoss(beta=0.3, label_smoothing=0.1, backend="torch")(h, w, labels, ref_logp=r)

    for fn in (seq, dpo):
        _assert_same_with_a_reference_gradient(_run(path, fn, hidden, weight, ref_row),
                                               _run("two_pass", fn, hidden, weight, ref_row))
    # the DPO reference gradient is minus the policy's sequence gradient: check against dpo_loss
    r = ref_row.clone().requires_grad_()
    s = fk.sequence_logp(hidden, weight, labels).sum.detach()
    fk.dpo_loss(s[:2], s[2:], r[:2], r[2:], beta=0.3, label_smoothing=0.1).loss.backward()
    torch.testing.assert_close(_run(path, dpo, hidden, weight, ref_row)[1][2], r.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_returned_gradients_never_alias_saved_state(backend):
    """``grad_output == 1`` and every position supervised: ``hidden.grad`` was the tensor the function
    kept for its backward, so an in-place change to it (a second backward, ``zero_grad(set_to_none=
    False)``, clipping, writes through ``.data``) corrupted the next backward."""
    if backend == "cpu" and fk.available_backends("cpu")["cpu"] != "available":
        pytest.skip("cpu backend not available")
    hidden, weight, labels, _ = _data(seed=3, ignore=False)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = fk.loss(hidden, weight, labels, divergence="js", backend=backend)
    out.loss.backward(retain_graph=True)
    first_h, first_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad.data.zero_()                       # what zero_grad(set_to_none=False) does
    weight.grad.mul_(0.5)                          # what clip_grad_norm_ does
    out.loss.backward(retain_graph=True)           # the second backward: not corrupted, no crash
    torch.testing.assert_close(hidden.grad, first_h)
    torch.testing.assert_close(weight.grad, 1.5 * first_w)
    out.loss.backward()                            # and a third
    torch.testing.assert_close(hidden.grad, 2 * first_h)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_reference_that_is_not_a_log_probability_is_refused_by_every_entry_point(bad):
    """One rule (docs/math.md, contract table): a NaN or +inf reference is a ValueError naming it,
    in fk.dpo_loss (which returned loss 0 with zero gradient for +inf), fk.loss and the DPO module."""
    hidden, weight, labels, _ = _data(seed=4)
    pc, pr = -torch.rand(2, dtype=torch.float64), -torch.rand(2, dtype=torch.float64)
    rc = torch.tensor([-1.0, bad], dtype=torch.float64)
    for loss_type in ("sigmoid", "robust", "hinge", "ipo"):
        with pytest.raises(ValueError, match=r"pair 1: ref_chosen = (inf|nan) is not a log-probability"):
            fk.dpo_loss(pc, pr, rc, -torch.rand(2, dtype=torch.float64), beta=0.1, loss_type=loss_type)
    ref = torch.tensor([-1.0, -2.0, bad, -3.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ref_logp is (inf|nan) for row 2"):
        fk.nn.FusedLinearDPOLoss(backend="torch")(hidden, weight, labels, ref_logp=ref)
    ref_tok = torch.zeros(labels.shape, dtype=torch.float64)
    ref_tok[1, 3] = bad
    with pytest.raises(ValueError, match=r"ref_logp is (inf|nan) at supervised position \(1, 3\)"):
        fk.loss(hidden, weight, labels, ref_logp=ref_tok, divergence="js", backend="torch")
    # -inf (pi_ref = 0) is a log-probability: the losses take its limit
    out = fk.dpo_loss(pc, pr, torch.tensor([-1.0, -math.inf], dtype=torch.float64), -torch.ones(2, dtype=torch.float64),
                      beta=0.1)
    assert torch.isfinite(out.loss)


def test_every_entry_point_that_reads_labels_takes_the_same_shift():
    """The reference recipe: ``fk.token_stats(..., shift=True).logp`` of the reference model is
    aligned with ``fk.loss(..., shift=True)``: with the reference equal to the policy, every reward
    is exactly 0 (it was one token off: rewards of 0.17)."""
    hidden, weight, labels, _ = _data(seed=5)
    ref = fk.token_stats(hidden, weight, labels, shift=True).logp
    out = fk.loss(hidden, weight, labels, shift=True, ref_logp=ref, divergence="js", beta=0.1)
    assert out.reward.shape == labels[..., 1:].shape and torch.equal(out.reward, torch.zeros_like(out.reward))
    seq = fk.sequence_logp(hidden, weight, labels, shift=True)
    torch.testing.assert_close(seq.sum, out.logp.sum(-1))
    logits = hidden @ weight.T
    torch.testing.assert_close(fk.sequence_logp(logits=logits, labels=labels, shift=True).sum, seq.sum)

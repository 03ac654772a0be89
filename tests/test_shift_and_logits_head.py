"""``shift=k`` (an int: cut-cross-entropy's meaning) and ``softcap``/``temperature`` on the ``logits=``
path (issue 25), against the float64 oracle on full logits (tests/oracle.py) and plain slicing.

* ``shift=k``: ``x[..., :T-k]`` predicts ``labels[..., k:]`` on every entry point (``fk.loss``,
  ``fk.primal_loss``, ``fk.token_stats``, ``fk.sequence_logp``, ``fk.distill_loss``), equal to
  slicing by hand; a per-token ``ref_logp [..., T]`` is shifted with the labels; ``True`` is 1 and
  0/``False`` no shift; anything else is a ``ValueError``.
* ``softcap``/``temperature`` with ``logits=``: ``cap(z) / T`` as the kernels apply it to
  ``h W^T + b``, so ``fk.loss(logits=h W^T)`` equals ``fk.loss(h, W)`` with the same head options,
  and both equal ``F.cross_entropy`` of the capped, tempered float64 logits (values and gradients).
"""

from __future__ import annotations

import pytest
import torch

import oracle

import fdiv_kernels as fk

HEADS = [dict(softcap=2.0), dict(temperature=0.7), dict(softcap=3.0, temperature=1.5)]


def _inputs(seed=0):
    x = oracle.make_inputs(lead=(2,), t=7, h=8, v=13, seed=seed, ignore_at=[(0, 1)], ref_scale=3.0)
    return oracle.leaves64(x.hidden, x.weight) + (x.labels, x.ref.double())


@pytest.mark.parametrize("head", HEADS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_logits_path_takes_softcap_and_temperature(head):
    h, w, y, _ = _inputs()
    z = oracle.logits(h, w).detach().requires_grad_()
    want_z = oracle.logits(h, w, **head)  # float64, differentiable in h and w
    want = oracle.cross_entropy(want_z, y)
    got = fk.loss(logits=z, labels=y, **head).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_want,) = torch.autograd.grad(oracle.cross_entropy(oracle.transform(z, **head), y), z)
    (g_got,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    # the same as the fused head with the same options
    torch.testing.assert_close(fk.loss(h, w, y, backend="torch", **head).loss, got, rtol=1e-12, atol=1e-12)
    # the other logits= entry points
    st = oracle.stats(want_z.detach(), y)
    torch.testing.assert_close(fk.token_stats_from_logits(z, y, **head).logp, st.logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fk.sequence_logp(logits=z, labels=y, **head).sum, oracle.sequence_logp(st, y)[0],
                               rtol=1e-12, atol=1e-12)
    prim_want = fk.primal_loss(h.detach(), w.detach(), y, divergence="js", backend="torch", **head).loss
    torch.testing.assert_close(fk.primal_loss(logits=z, labels=y, divergence="js", **head).loss, prim_want,
                               rtol=1e-12, atol=1e-12)


def test_logits_path_bf16_is_capped_in_float32():
    h, w, y, _ = _inputs(1)
    z16 = (oracle.logits(h, w) * 20).to(torch.bfloat16)  # logits up to ~100: the cap matters
    want = oracle.cross_entropy(oracle.transform(z16.double(), softcap=30.0), y)
    got = fk.loss(logits=z16, labels=y, softcap=30.0).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_logits_path_still_refuses_a_bias():
    h, w, y, _ = _inputs()
    with pytest.raises(ValueError, match="bias applies to \\(hidden, weight\\) only"):
        fk.loss(logits=oracle.logits(h, w), labels=y, bias=torch.zeros(13, dtype=torch.float64))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_int_shift_equals_slicing_by_hand(k):
    h, w, y, ref = _inputs()
    t = y.shape[-1]
    cut = lambda x: x[..., :t - k, :]  # noqa: E731
    got = fk.loss(h, w, y, shift=k, divergence="js", beta=0.5, ref_logp=ref, backend="torch")
    want = fk.loss(cut(h), w, y[..., k:], divergence="js", beta=0.5, ref_logp=ref[..., k:], backend="torch")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.logp, want.logp, rtol=1e-12, atol=1e-12)
    z = oracle.logits(h, w).detach()
    torch.testing.assert_close(fk.loss(logits=z, labels=y, shift=k).loss,
                               oracle.cross_entropy(z[..., :t - k, :], y[..., k:]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fk.primal_loss(h, w, y, shift=k, backend="torch").loss,
                               fk.primal_loss(cut(h), w, y[..., k:], backend="torch").loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fk.token_stats(h, w, y, shift=k).logp, fk.token_stats(cut(h), w, y[..., k:]).logp,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fk.sequence_logp(h, w, y, shift=k).sum,
                               fk.sequence_logp(cut(h), w, y[..., k:]).sum, rtol=1e-12, atol=1e-12)
    # an already shifted per-token reference [..., T-k] passes unchanged
    torch.testing.assert_close(fk.loss(h, w, y, shift=k, divergence="js", beta=0.5, ref_logp=ref[..., k:],
                                       backend="torch").loss, want.loss, rtol=1e-12, atol=1e-12)


def test_true_is_one_and_false_is_none():
    h, w, y, _ = _inputs()
    assert torch.equal(fk.loss(h, w, y, shift=True).loss, fk.loss(h, w, y, shift=1).loss)
    assert torch.equal(fk.loss(h, w, y, shift=False).loss, fk.loss(h, w, y).loss)


def test_distill_shift_by_k_cuts_the_teacher_alike():
    x = oracle.make_inputs(lead=(2,), t=6, h=8, v=11, seed=3, ref_scale=None, teacher=5)
    k, t = 2, x.labels.shape[-1]
    got = fk.distill_loss(x.hidden, x.weight, x.labels, shift=k, teacher_hidden=x.teacher_hidden,
                          teacher_weight=x.teacher_weight, divergence="js", backend="torch").loss
    want = fk.distill_loss(x.hidden[..., :t - k, :], x.weight, x.labels[..., k:],
                           teacher_hidden=x.teacher_hidden[..., :t - k, :], teacher_weight=x.teacher_weight,
                           divergence="js", backend="torch").loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a teacher of another length is named by the input checks, not cut to fit
    with pytest.raises(ValueError, match="teacher_hidden must have shape"):
        fk.distill_loss(x.hidden, x.weight, x.labels, shift=k, teacher_hidden=x.teacher_hidden[..., :-1, :],
                        teacher_weight=x.teacher_weight)


@pytest.mark.parametrize("bad, match", [(-1, "bool or an int >= 0"), (1.5, "bool or an int >= 0"),
                                        ("1", "bool or an int >= 0"), (8, "longer than the sequence")])
def test_a_bad_shift_is_a_clear_error(bad, match):
    h, w, y, _ = _inputs()
    with pytest.raises(ValueError, match=match):
        fk.loss(h, w, y, shift=bad)
    with pytest.raises(ValueError, match=match):
        fk.token_stats(h, w, y, shift=bad)

"""fk.distill_loss against the peers' own distillation code and formulas, in float64 on the CPU:

* TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py, called as is),
  every ``beta`` including its 0 (forward KL) and 1 (reverse KL) cases, with temperature, labels
  and its ``batchmean`` / ``sum`` reductions, values and student gradients;
* Liger's ``LigerFusedLinearJSDLoss(compiled=False)`` (liger_kernel/chunked_loss/jsd_loss.py, run
  as is: its chunked torch code), student and teacher heads with biases, ``weight_hard_loss``,
  temperature, ``ignore_index``, beta 0 / 0.3 / 0.5 / 1;
* Liger's TVD and KL-divergence test references (test/transformers/test_tvd.py's ``TorchTVDLoss``,
  test_kl_div.py's ``torch.nn.KLDivLoss(log_target=False)``), transcribed: the formulas their
  kernels are tested against.
"""

from __future__ import annotations

import os

import pytest
import torch

import fdiv_kernels as fk

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
liger_jsd = pytest.importorskip("liger_kernel.chunked_loss")

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _batch(seed=0, b=3, t=7, h=6, ht=9, v=23, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale / h ** 0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.3
    th = torch.randn(b, t, ht, generator=g, dtype=torch.float64)
    tw = torch.randn(v, ht, generator=g, dtype=torch.float64) * scale / ht ** 0.5
    tb = torch.randn(v, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return hidden, weight, bias, th, tw, tb, labels


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_trl_generalized_jsd_loss(beta, temperature, reduction):
    hidden, weight, bias, th, tw, tb, labels = _batch(seed=int(beta * 10) + int(temperature))
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = gkd.GKDTrainer.generalized_jsd_loss(h1 @ w1.T + b1, th @ tw.T + tb, labels=labels, beta=beta,
                                               temperature=temperature, reduction=reduction)
    want_grads = torch.autograd.grad(want, (h1, w1, b1))
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fk.distill_loss(h2, w2, labels, bias=b2, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
                          divergence="js", beta=beta, temperature=temperature,
                          reduction="mean" if reduction == "batchmean" else "sum", backend="torch")
    got_grads = torch.autograd.grad(out.loss, (h2, w2, b2))
    torch.testing.assert_close(out.loss, want, **TOL)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature,weight_hard_loss", [(1.0, 0.0), (2.0, 0.5), (0.5, 1.0)])
def test_liger_fused_linear_jsd(beta, temperature, weight_hard_loss):
    """Liger's loss is ``w_hard CE + w_soft JSD``: with ``w_soft = 1`` it is fk's ``js`` with
    ``hard_label_weight = w_hard`` (both mean over the counted tokens, the CE untempered)."""
    hidden, weight, bias, th, tw, tb, labels = _batch(seed=3 + int(beta * 10))
    n = labels.numel()
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    mod = liger_jsd.LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard_loss, weight_soft_loss=1.0, beta=beta,
                                            temperature=temperature, compiled=False, chunk_size=8)
    want = mod(h1.reshape(n, -1), w1, th.reshape(n, -1), tw, labels.reshape(n), b1, tb)
    want_grads = torch.autograd.grad(want, (h1, w1, b1))
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fk.distill_loss(h2, w2, labels, bias=b2, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
                          divergence="js", beta=beta, temperature=temperature, hard_label_weight=weight_hard_loss,
                          backend="torch")
    got_grads = torch.autograd.grad(out.loss, (h2, w2, b2))
    # Liger accumulates its loss in a float32 scalar and takes the CE of .float() logits: values to fp32
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype), rtol=2e-6, atol=1e-7)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5 if weight_hard_loss else 1e-10, atol=1e-7 if weight_hard_loss else 1e-12)


def test_liger_tvd_reference():
    """Liger test_tvd.py's TorchTVDLoss (batchmean over non-ignored rows) on the softmax of both logits."""
    hidden, weight, _, th, tw, _, labels = _batch(seed=11)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    p = torch.softmax((h1 @ w1.T).reshape(-1, weight.shape[0]), -1)
    q = torch.softmax((th @ tw.T).reshape(-1, weight.shape[0]), -1)
    label = labels.reshape(-1)
    tvd = torch.where(label.unsqueeze(1) != -100, torch.abs(p - q) / 2.0, 0.0)
    want = tvd.sum() / (label != -100).sum()
    want_grads = torch.autograd.grad(want, (h1, w1))
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fk.distill_loss(h2, w2, labels, teacher_hidden=th, teacher_weight=tw, divergence="tv", backend="torch")
    torch.testing.assert_close(out.loss, want, **TOL)
    for a, e in zip(torch.autograd.grad(out.loss, (h2, w2)), want_grads):
        torch.testing.assert_close(a, e, **TOL)


def test_liger_kl_div_reference():
    """Liger test_kl_div.py's reference, torch.nn.KLDivLoss(reduction="batchmean") of the student's
    log-probs against the teacher's probabilities: forward KL(teacher || student)."""
    hidden, weight, _, th, tw, _, labels = _batch(seed=12)
    labels = torch.randint(0, weight.shape[0], labels.shape)  # KLDivLoss has no ignore_index: every row counts
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    v = weight.shape[0]
    want = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax((h1 @ w1.T).reshape(-1, v), -1),
                                                     torch.softmax((th @ tw.T).reshape(-1, v), -1))
    want_grads = torch.autograd.grad(want, (h1, w1))
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fk.distill_loss(h2, w2, labels, teacher_logits=th @ tw.T, divergence="kl", backend="torch")
    torch.testing.assert_close(out.loss, want, **TOL)
    for a, e in zip(torch.autograd.grad(out.loss, (h2, w2)), want_grads):
        torch.testing.assert_close(a, e, **TOL)

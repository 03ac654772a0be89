"""``fk.loss(..., return_token_accuracy=True)``: the predicted tokens (argmax of each supervised
token's logits, ``-1`` where ignored) and the token accuracy, against the argmax of the float64
logits (tests/oracle.py's), on every backend and path (``single``: read off the fused pass's kept
logits; ``fused-two``, ``two`` and no gradients: one more logits pass), from ``logits=``, through
the modules, and against Liger's ``return_token_accuracy`` / ``return_predicted_tokens`` where its
kernels run on CPU (the Triton interpreter). And ``return_target_logit=True``: each token's logit of
its label (cut-cross-entropy's indexed dot) against the float64 logits, values and gradients.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from test_cross_entropy_options import _backends, _path

import fdiv_kernels as fk
from fdiv_kernels.autograd import fused
from fdiv_kernels.kernels import triton_backend


def _inputs(backend, dtype=torch.float32, seed=0):
    shape = {"lead": (2,), "t": 5, "h": 8, "v": 19} if backend == "triton" else {"lead": (3,), "t": 7, "h": 16, "v": 37}
    inp = oracle.make_inputs(**shape, bias=True, ignore_frac=0.25, keep_first=2, dtype=dtype, seed=seed)
    z = oracle.logits(*oracle.leaves64(inp.hidden, inp.weight, inp.bias), softcap=4.0, temperature=0.9).detach()
    top2 = z.topk(2, -1).values
    labels = inp.labels.clone()
    half = (torch.arange(labels.numel()).reshape(labels.shape) % 2 == 0) & (labels != -100)
    labels[half] = z.argmax(-1)[half]  # about half the supervised tokens predicted right
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3  # no float32 near-tie decides a prediction
    return inp, labels, z, clear


def _check(out, labels, z, clear):
    mask = labels != -100
    want = torch.where(mask, z.argmax(-1), -1)
    assert out.predicted_tokens.dtype == torch.long and out.predicted_tokens.shape == labels.shape
    assert torch.equal(out.predicted_tokens[clear | ~mask], want[clear | ~mask])
    acc = ((want == labels) & mask).sum() / mask.sum()
    assert 0.3 < float(acc) < 0.9  # the test can tell a wrong accuracy from a right one
    assert abs(float(out.token_accuracy) - float(acc)) < 1e-6


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("path", ["single", "fused-two", "two", "no_grad"])
def test_predicted_tokens_and_accuracy(backend, path, monkeypatch):
    inp, labels, z, clear = _inputs(backend)
    h = inp.hidden.detach().requires_grad_(path != "no_grad")
    with _path("two" if path == "no_grad" else path, backend, monkeypatch), torch.set_grad_enabled(path != "no_grad"):
        out = fk.loss(h, inp.weight, labels, bias=inp.bias, backend=backend, softcap=4.0, temperature=0.9,
                      return_token_accuracy=True, z_loss=0.1 if path == "single" else 0.0)
    _check(out, labels, z, clear)
    plain = fk.loss(inp.hidden, inp.weight, labels, bias=inp.bias, backend=backend, softcap=4.0, temperature=0.9)
    assert plain.token_accuracy is None and plain.predicted_tokens is None


@pytest.mark.parametrize("backend", _backends())
def test_one_pass_reads_predictions_off_the_kept_logits(backend, monkeypatch):
    """With gradients, every backend's one pass reads the predictions off its chunk kernels' kept
    logits (``argmax()``): no second logits pass (``argmax_rows`` is never called)."""
    inp, labels, z, clear = _inputs(backend)

    def second_pass(*a, **k):
        raise AssertionError("a second logits pass")

    monkeypatch.setattr(fused, "argmax_rows", second_pass)
    out = fk.loss(inp.hidden.detach().requires_grad_(), inp.weight, labels, bias=inp.bias, backend=backend,
                  softcap=4.0, temperature=0.9, return_token_accuracy=True)
    _check(out, labels, z, clear)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    """bf16 (the cpu backend's bf16 kernels; argmax of the float32 logits of the rounded inputs) and float64."""
    inp, labels, _, _ = _inputs("cpu", dtype)
    z = oracle.logits(*oracle.leaves64(inp.hidden, inp.weight, inp.bias), softcap=4.0, temperature=0.9).detach()
    top2 = z.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-2
    out = fk.loss(inp.hidden.requires_grad_(), inp.weight, labels, bias=inp.bias, softcap=4.0, temperature=0.9,
                  return_token_accuracy=True)
    mask = labels != -100
    want = torch.where(mask, z.argmax(-1), -1)
    assert torch.equal(out.predicted_tokens[clear | ~mask], want[clear | ~mask])


def test_logits_and_modules():
    inp, labels, z, clear = _inputs("torch")
    _check(fk.loss(logits=z.float(), labels=labels, return_token_accuracy=True), labels, z, clear)
    inp2, labels2, z2, clear2 = _inputs("torch", seed=3)
    z2 = oracle.logits(*oracle.leaves64(inp2.hidden, inp2.weight, inp2.bias)).detach()
    mod = fk.nn.FusedLinearFDivLoss(return_token_accuracy=True, backend="cpu")
    out = mod(inp2.hidden.requires_grad_(), inp2.weight, labels2, bias=inp2.bias, return_output=True)
    mask = labels2 != -100
    assert torch.equal(out.predicted_tokens, torch.where(mask, z2.argmax(-1), -1))
    logits_out = fk.nn.FDivLoss(return_token_accuracy=True)(z2.float(), labels2, return_output=True)
    assert torch.equal(logits_out.predicted_tokens, out.predicted_tokens)
    assert float(logits_out.token_accuracy) == float(out.token_accuracy)


def test_nothing_supervised():
    inp, labels, _, _ = _inputs("torch")
    labels = torch.full_like(labels, -100)
    out = fk.loss(inp.hidden.requires_grad_(), inp.weight, labels, backend="torch", return_token_accuracy=True)
    assert float(out.token_accuracy) == 0.0 and bool((out.predicted_tokens == -1).all())


def test_refused_under_compile():
    inp, labels, _, _ = _inputs("torch")

    def step(h, w, y):
        return fk.loss(h, w, y, backend="torch", return_token_accuracy=True).token_accuracy

    # fullgraph: dynamo reports the ValueError it met (without fullgraph the call falls back to eager)
    with pytest.raises(Exception, match="return_token_accuracy is not supported under torch.compile"):
        torch.compile(step, fullgraph=True, backend="eager")(inp.hidden.requires_grad_(), inp.weight, labels)


@pytest.mark.skipif(not triton_backend.interpret_mode(), reason="Liger's kernels run on CPU under TRITON_INTERPRET=1 only")
def test_liger_token_accuracy_and_predicted_tokens():
    """Liger's ``LigerFusedLinearCrossEntropyLoss(return_token_accuracy=True, return_predicted_tokens=True)``."""
    liger = pytest.importorskip("liger_kernel.transformers")
    inp, labels, _, _ = _inputs("triton", seed=5)
    mod = liger.LigerFusedLinearCrossEntropyLoss(return_token_accuracy=True, return_predicted_tokens=True)
    want = mod(inp.weight, inp.hidden.reshape(-1, inp.hidden.shape[-1]), labels.reshape(-1), inp.bias)
    got = fk.loss(inp.hidden.requires_grad_(), inp.weight, labels, bias=inp.bias, backend="torch",
                  return_token_accuracy=True)
    assert torch.equal(got.predicted_tokens.reshape(-1), want.predicted_tokens)
    assert abs(float(got.token_accuracy) - float(want.token_accuracy)) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_logit(backend, dtype):
    """``out.target_logit = cap(h . W[y] + b[y]) / T`` (0 where ignored), with its gradients."""
    inp, labels, _, _ = _inputs("torch", dtype)
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    out = fk.loss(h, w, labels, bias=b, backend=backend, softcap=4.0, temperature=0.9, return_target_logit=True)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    z = oracle.logits(h64, w64, b64, softcap=4.0, temperature=0.9)
    mask = labels != -100
    want = torch.where(mask, z.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    oracle.assert_close(out.target_logit, want, **tol, what="target logit")
    coef = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((out.target_logit.double() * coef).sum(), (h, w, b))
    exp = torch.autograd.grad((want * coef).sum(), (h64, w64, b64))
    for name, a, e in zip(("hidden", "weight", "bias"), got, exp):
        oracle.assert_close(a, e, **tol, what=f"grad {name}")
    zl = z.detach().clone().requires_grad_()
    from_logits = fk.loss(logits=zl, labels=labels, return_target_logit=True).target_logit
    oracle.assert_close(from_logits, want, rtol=1e-12, atol=1e-12, what="from logits")
    assert fk.loss(h, w, labels, bias=b, backend=backend).target_logit is None

"""Class weights and label smoothing (``fk.loss(class_weight=, label_smoothing=)``, the ``fk.nn``
modules) against PyTorch's ``F.cross_entropy(weight=, label_smoothing=)`` on full float64 logits
(tests/oracle.py), values and gradients (hidden, weight, bias), on every backend and path:

* ``single``: the one-pass fused function (the mean logit's rank-one gradients in closed form);
* ``fused-two``: the fused function of a backend without one-pass kernels (its forward, the
  coefficients on the whole batch, its backward);
* ``two``: token statistics + the spec by autograd (the mean logit by autograd).

Other divergences with the options against the formula of ``docs/math.md`` section 3
(``oracle.class_options_loss``); the refusals; Liger's ``LigerFusedLinearCrossEntropyLoss`` options
where its kernels run on CPU (the Triton interpreter).
"""

from __future__ import annotations

import contextlib

import oracle
import pytest
import torch
from test_contract import _path as contract_path

import fdiv_kernels as fk
from fdiv_kernels.kernels import backends as kb
from fdiv_kernels.kernels import triton_backend

PATHS = ("single", "fused-two", "two")


def _backends():
    cpu = fk.available_backends("cpu")
    out = []
    for name in ("torch", "cpu", "triton"):
        reason = cpu.get(name, "not registered")
        if name == "triton" and not triton_backend.interpret_mode():
            reason = "TRITON_INTERPRET=1 not set"
        out.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason != "available", reason=f"{name}: {reason}")))
    return out


@contextlib.contextmanager
def _path(path, backend, monkeypatch):
    """test_contract's path check, plus ``fused-two``: the fused function of the backend without
    its one-pass kernels (``fused_forward``'s two passes)."""
    if path == "fused-two":
        b = kb._BACKENDS[backend]
        monkeypatch.setitem(kb._BACKENDS, backend, kb.Backend(**{**b.__dict__, "single_pass": None}))
    with contract_path("two" if path == "two" else "single", monkeypatch):
        yield


def _inputs(backend, dtype, seed=0):
    shape = {"lead": (2,), "t": 5, "h": 8, "v": 19} if backend == "triton" else {"lead": (3,), "t": 7, "h": 16, "v": 37}
    inp = oracle.make_inputs(**shape, bias=True, ignore_frac=0.25, keep_first=2, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    cw = torch.rand(shape["v"], generator=g) * 2
    cw[::5] = 0.0  # some classes weigh nothing
    return inp, cw


def _check(out_loss, leaves, want, want_leaves, tol):
    oracle.assert_close(out_loss, want, **tol, what="loss")
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((out_loss.double() * weights).sum(), leaves)
    exp = torch.autograd.grad((want * weights).sum(), want_leaves)
    for name, a, e in zip(("hidden", "weight", "bias"), got, exp):
        oracle.assert_close(a, e, **tol, what=f"grad {name}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("eps,weighted", [(0.0, True), (0.1, False), (0.2, True), (1.0, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy(backend, path, eps, weighted, reduction, monkeypatch):
    """``divergence="sft"`` with the options is ``F.cross_entropy(weight=, label_smoothing=)``."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    inp, cw = _inputs(backend, dtype)
    cw = cw if weighted else None
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    with _path(path, backend, monkeypatch):
        out = fk.loss(h, w, inp.labels, bias=b, backend=backend, label_smoothing=eps, class_weight=cw,
                      reduction=reduction, temperature=0.8)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    want = oracle.cross_entropy(oracle.logits(h64, w64, b64, temperature=0.8), inp.labels, class_weight=cw,
                                label_smoothing=eps, reduction=reduction)
    _check(out.loss, (h, w, b), want, (h64, w64, b64), tol)


@pytest.mark.parametrize("weighted", [False, True])
def test_reduction_none_and_logits(weighted):
    """``reduction="none"`` (the two-pass path) and ``logits=`` with both options."""
    inp, cw = _inputs("torch", torch.float64)
    cw = cw if weighted else None
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    out = fk.loss(h, w, inp.labels, bias=b, backend="torch", label_smoothing=0.15, class_weight=cw, reduction="none")
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    z = oracle.logits(h64, w64, b64)
    want = oracle.cross_entropy(z, inp.labels, class_weight=cw, label_smoothing=0.15, reduction="none")
    tol = {"rtol": 1e-10, "atol": 1e-10}
    _check(out.loss, (h, w, b), want, (h64, w64, b64), tol)
    zl = z.detach().clone().requires_grad_()
    got = fk.loss(logits=zl, labels=inp.labels, label_smoothing=0.15, class_weight=cw).loss
    want = oracle.cross_entropy(z, inp.labels, class_weight=cw, label_smoothing=0.15)
    oracle.assert_close(got, want, **tol, what="logits loss")
    (g,) = torch.autograd.grad(got, zl)
    (e,) = torch.autograd.grad(want, z)
    oracle.assert_close(g, e, **tol, what="grad logits")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("divergence", ["js", "pearson", "reverse_kl"])
@pytest.mark.parametrize("path", ["single", "two"])
def test_other_divergences(backend, divergence, path, monkeypatch):
    """Divergences averaged per token with a reference: ``(1 - eps) c[y] (-phi(u)) + eps U`` over ``sum c[y]``."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    inp, cw = _inputs(backend, dtype, seed=4)
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    with _path(path, backend, monkeypatch):
        out = fk.loss(h, w, inp.labels, bias=b, backend=backend, divergence=divergence, beta=0.7, ref_logp=inp.ref,
                      label_smoothing=0.1, class_weight=cw)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    want = oracle.class_options_loss(oracle.logits(h64, w64, b64), inp.labels, divergence=divergence, beta=0.7,
                                     ref_logp=inp.ref, class_weight=cw, label_smoothing=0.1)
    _check(out.loss, (h, w, b), want, (h64, w64, b64), tol)


def test_modules():
    """``fk.nn.FusedLinearFDivLoss`` / ``FDivLoss`` take ``class_weight`` (a buffer) and ``label_smoothing``."""
    inp, cw = _inputs("torch", torch.float64)
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    mod = fk.nn.FusedLinearFDivLoss(label_smoothing=0.1, class_weight=cw, backend="torch")
    assert "class_weight" in dict(mod.named_buffers())
    got = mod(h, w, inp.labels, bias=b)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    z = oracle.logits(h64, w64, b64)
    want = oracle.cross_entropy(z, inp.labels, class_weight=cw, label_smoothing=0.1)
    _check(got, (h, w, b), want, (h64, w64, b64), {"rtol": 1e-10, "atol": 1e-10})
    logits_mod = fk.nn.FDivLoss(label_smoothing=0.1, class_weight=cw)
    oracle.assert_close(logits_mod(z.detach(), inp.labels), want, rtol=1e-10, atol=1e-10, what="FDivLoss")


def test_all_weights_zero_is_zero():
    """A batch whose supervised tokens all weigh 0: loss 0 and zero gradients (PyTorch: NaN)."""
    inp, _ = _inputs("torch", torch.float64)
    cw = torch.zeros(inp.weight.shape[0], dtype=torch.float64)
    h = inp.hidden.detach().requires_grad_()
    out = fk.loss(h, inp.weight, inp.labels, backend="torch", class_weight=cw, label_smoothing=0.1)
    assert float(out.loss.detach()) == 0.0
    (g,) = torch.autograd.grad(out.loss, h)
    assert torch.count_nonzero(g) == 0


def test_options_off_unchanged():
    """``label_smoothing=0`` and ``class_weight`` of ones give the plain loss (and ones change nothing)."""
    inp, _ = _inputs("torch", torch.float64)
    plain = fk.loss(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend="torch").loss
    ones = torch.ones(inp.weight.shape[0], dtype=torch.float64)
    with_ones = fk.loss(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend="torch", class_weight=ones).loss
    assert torch.allclose(plain, with_ones, rtol=1e-13, atol=0)


def test_refusals():
    inp, cw = _inputs("torch", torch.float32)
    args = (inp.hidden, inp.weight, inp.labels)
    with pytest.raises(ValueError, match="label_smoothing applies to per-token losses"):
        fk.loss(*args, divergence="kl", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing applies to per-token losses"):
        fk.loss(*args, level="sequence", label_smoothing=0.1)
    with pytest.raises(ValueError, match="class_weight applies to per-token losses"):
        fk.loss(*args, values="detach", class_weight=cw)
    with pytest.raises(ValueError, match="class_weight applies to per-token losses"):
        fk.loss_from_spec(fk.PrimalSpec("kl"), *args, class_weight=cw)
    with pytest.raises(ValueError, match="softcap"):
        fk.loss(*args, label_smoothing=0.1, softcap=5.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        fk.loss(*args, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"class_weight must have shape \[V\]"):
        fk.loss(*args, class_weight=cw[:-1])
    bad = cw.clone()
    bad[2] = -1.0
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        fk.loss(*args, class_weight=bad)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        fk.loss(*args, class_weight=bad)


def test_softcap_with_class_weight_alone():
    """Class weights alone need no mean logit: a soft-capped head is fine."""
    inp, cw = _inputs("torch", torch.float64)
    h = inp.hidden.detach().requires_grad_()
    got = fk.loss(h, inp.weight, inp.labels, bias=inp.bias, backend="torch", class_weight=cw, softcap=3.0).loss
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    want = oracle.cross_entropy(oracle.logits(h64, w64, b64, softcap=3.0), inp.labels, class_weight=cw)
    oracle.assert_close(got, want, rtol=1e-10, atol=1e-10, what="loss")
    oracle.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h64)[0], rtol=1e-10, atol=1e-10,
                        what="grad hidden")


@pytest.mark.parametrize("path", ["single", "two"])
def test_masked_columns(path, monkeypatch):
    """``-inf``-masked vocabulary columns: with class weight 0 they add nothing (finite loss and
    gradients, the formula's value); with a weight > 0 label smoothing's ``U_t`` is infinite: a
    ``ValueError`` from the data check."""
    inp = oracle.make_inputs(lead=(3,), t=7, h=16, v=37, mask=(0, 3, 7), ignore_frac=0.2, keep_first=2,
                             dtype=torch.float64)
    cw = torch.rand(37, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cw[[0, 3, 7]] = 0.0
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    with _path(path, "torch", monkeypatch):
        out = fk.loss(h, w, inp.labels, bias=b, backend="torch", label_smoothing=0.1, class_weight=cw)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    want = oracle.class_options_loss(oracle.logits(h64, w64, b64), inp.labels, class_weight=cw, label_smoothing=0.1)
    _check(out.loss, (h, w, b), want, (h64, w64, b64), {"rtol": 1e-10, "atol": 1e-10})
    cw[3] = 1.0
    with pytest.raises(ValueError, match=r"bias\[3\] = -inf masks column 3"):
        fk.loss(h, w, inp.labels, bias=b, backend="torch", label_smoothing=0.1, class_weight=cw)


@pytest.mark.skipif(not triton_backend.interpret_mode(), reason="Liger's kernels run on CPU under TRITON_INTERPRET=1 only")
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_liger_fused_linear_cross_entropy_label_smoothing(z_loss):
    """Liger's ``LigerFusedLinearCrossEntropyLoss(label_smoothing=, lse_square_scale=)`` (its Triton
    kernels, interpreted): the same values and gradients as ``fk.loss(label_smoothing=, z_loss=)``.
    (Its ``ce_weight`` path does not run in the interpreter; Liger's tests hold it to
    ``torch.nn.CrossEntropyLoss(weight=)``, the oracle of ``test_matches_cross_entropy``.)"""
    liger = pytest.importorskip("liger_kernel.transformers")
    inp, _ = _inputs("triton", torch.float32, seed=7)
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    hl, wl, bl = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    got = fk.loss(h, w, inp.labels, bias=b, backend="torch", label_smoothing=0.1, z_loss=z_loss).loss
    mod = liger.LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1, lse_square_scale=z_loss)
    want = mod(wl, hl.reshape(-1, hl.shape[-1]), inp.labels.reshape(-1), bl)
    oracle.assert_close(got, want, rtol=1e-5, atol=1e-5, what="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), torch.autograd.grad(got, (h, w, b)),
                          torch.autograd.grad(want, (hl, wl, bl))):
        oracle.assert_close(a, e, rtol=1e-4, atol=1e-5, what=f"grad {name}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("path", ["single", "two"])
def test_bf16(backend, path, monkeypatch):
    """bf16 inputs: float32 statistics and mean logits, bf16 gradients (test_contract's bf16 tolerances)."""
    inp, cw = _inputs(backend, torch.bfloat16, seed=9)
    h, w, b = (x.detach().requires_grad_() for x in (inp.hidden, inp.weight, inp.bias))
    with _path(path, backend, monkeypatch):
        out = fk.loss(h, w, inp.labels, bias=b, backend=backend, label_smoothing=0.1, class_weight=cw)
    h64, w64, b64 = oracle.leaves64(inp.hidden, inp.weight, inp.bias)
    want = oracle.cross_entropy(oracle.logits(h64, w64, b64), inp.labels, class_weight=cw, label_smoothing=0.1)
    oracle.assert_close(out.loss, want, rtol=1e-4, atol=1e-4, what="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), torch.autograd.grad(out.loss, (h, w, b)),
                          torch.autograd.grad(want, (h64, w64, b64))):
        assert a.dtype == torch.bfloat16
        oracle.assert_close(a, e, rtol=2e-2, atol=5e-3, what=f"grad {name}")

"""The C++ CPU backend (``backend="cpu"``) against the torch reference and float64 autograd.

The first test to run builds the extension just in time (~45 s on 2 cores, cached afterwards in
``$TORCH_EXTENSIONS_DIR``). Without a C++ compiler or ninja the module is skipped with the
reason; with them, a failing build fails the tests.
"""

from __future__ import annotations

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import chunk_sizes, native
from fdiv_kernels.kernels.backends import get_backend

_problem = native._toolchain_problem("cpu")
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"cannot build the C++ extension: {_problem}")

FP32_TOL = dict(atol=1e-5, rtol=5e-4)


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, reason = native.status("cpu")
    assert ok, f"the CPU extension should build on this machine: {reason}"


def _inputs(n, h, v, dtype, *, bias, ignore_frac=0.0, scale=1.0, seed=0):
    """``(hidden, weight, bias, labels)`` leaves of ``n`` tokens from the suite's builder (the first
    position ignored when ``ignore_frac``)."""
    x = oracle.make_inputs((), n, h, v, dtype=dtype, bias=bias, scale=scale, seed=seed, ignore_frac=ignore_frac,
                           ignore_at=((0,),) if ignore_frac else (), ref_scale=None)
    return (*x.leaves(), x.labels)


def _run(backend, hidden, weight, bias, labels, *, softcap, temperature, entropy, seed=1):
    """token_stats + a random linear functional of (logp, lse, entropy); returns values and grads."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    out = fk.token_stats(hidden, weight, labels, bias=bias, softcap=softcap, temperature=temperature,
                         return_entropy=entropy, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (torch.randn(out.logp.shape, generator=g) * out.logp).sum()
    loss = loss + (torch.randn(out.lse.shape, generator=g) * out.lse).sum()
    if entropy:
        loss = loss + (torch.randn(out.entropy.shape, generator=g) * out.entropy).sum()
    loss.backward()
    vals = [out.logp, out.lse] + ([out.entropy] if entropy else [])
    return [v.detach() for v in vals], [t.grad.clone() for t in leaves]


CASES = [
    # (softcap, temperature, entropy, bias)
    (None, 1.0, False, False),
    (None, 1.0, True, True),
    (None, 0.7, True, False),
    (30.0, 1.0, False, True),
    (2.5, 1.6, True, True),
]


@pytest.mark.parametrize("shape", [(47, 31, 123), (1, 31, 123), (64, 16, 5)])
@pytest.mark.parametrize("softcap,temperature,entropy,bias", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_backend(shape, softcap, temperature, entropy, bias, dtype):
    n, h, v = shape
    args = _inputs(n, h, v, dtype, bias=bias, ignore_frac=0.2 if n > 1 else 0.0)
    kw = dict(softcap=softcap, temperature=temperature, entropy=entropy)
    vals_c, grads_c = _run("cpu", *args, **kw)
    vals_t, grads_t = _run("torch", *args, **kw)
    for a, b in zip(vals_c, vals_t):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **FP32_TOL)
    # gradients come back in the input dtype; bf16 rounding of the same fp32 numbers may differ by 1 ulp
    gtol = FP32_TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    for a, b in zip(grads_c, grads_t):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **gtol)


@pytest.mark.parametrize("softcap,temperature,bias", [(None, 1.0, True), (4.0, 0.5, False)])
def test_float64_reference(softcap, temperature, bias):
    hidden, weight, b, labels = _inputs(40, 24, 300, torch.float32, bias=bias, ignore_frac=0.1, scale=3.0)
    vals, grads = _run("cpu", hidden, weight, b, labels, softcap=softcap, temperature=temperature, entropy=True)
    leaves = oracle.leaves64(hidden, weight, b)
    ref = oracle.token_stats(leaves[0], leaves[1], labels, leaves[2], softcap, temperature)
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(r.shape, generator=g, dtype=torch.float32).double() * r).sum() for r in ref)
    loss.backward()
    for a, r in zip(vals, ref):
        torch.testing.assert_close(a.double(), r.detach(), **FP32_TOL)
    for a, leaf in zip(grads, [t for t in leaves if t is not None]):
        torch.testing.assert_close(a.double(), leaf.grad, **FP32_TOL)


def test_large_logits_stay_finite():
    """Logits of magnitude ~1e4: the online max keeps exp in range; compare with float64."""
    hidden, weight, _, labels = _inputs(16, 8, 97, torch.float32, bias=False, scale=2e3)
    vals, grads = _run("cpu", hidden, weight, None, labels, softcap=None, temperature=1.0, entropy=True)
    ref = oracle.token_stats(hidden, weight, labels)
    assert all(torch.isfinite(v).all() for v in vals + grads)
    assert ref.lse.abs().max() > 1e3
    torch.testing.assert_close(vals[1].double(), ref.lse.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(vals[0].double(), ref.logp.detach(), atol=2e-3, rtol=1e-6)


def test_multiple_tiles(monkeypatch):
    """Tiles of 16 rows x 18 columns over [50, 64] logits (remainders on both axes) give the one-tile answer."""
    hidden, weight, b, labels = _inputs(50, 20, 64, torch.float32, bias=True)
    kw = dict(softcap=3.0, temperature=1.3, entropy=True)
    vals_one, grads_one = _run("cpu", hidden, weight, b, labels, **kw)
    assert chunk_sizes.cpu_tile_shape(50, 64) == (50, 64)
    monkeypatch.setattr(chunk_sizes, "TWO_PASS_ELEMENTS", 300)
    assert chunk_sizes.cpu_tile_shape(50, 64) == (16, 18)
    vals_many, grads_many = _run("cpu", hidden, weight, b, labels, **kw)
    for a, r in zip(vals_one + grads_one, vals_many + grads_many):
        torch.testing.assert_close(a, r, **FP32_TOL)


def test_tile_shapes():
    ts = chunk_sizes.cpu_tile_shape
    assert ts(4096, 32000, 2 ** 22) == (2048, 2048)
    assert ts(100, 32000, 2 ** 22) == (100, 32000)   # short input: whole rows
    assert ts(10_000, 50, 2 ** 22) == (10_000, 50)    # narrow vocabulary: all rows at once
    assert ts(1, 7, 1) == (1, 1)


def test_all_rows_ignored():
    hidden, weight, b, labels = _inputs(6, 8, 11, torch.float32, bias=True)
    labels[:] = -100
    vals, grads = _run("cpu", hidden, weight, b, labels, softcap=None, temperature=1.0, entropy=True)
    assert all((v == 0).all() for v in vals + grads)


def test_float64_delegates_to_reference():
    hidden, weight, b, labels = _inputs(9, 8, 13, torch.float64, bias=True)
    vals_c, grads_c = _run("cpu", hidden, weight, b, labels, softcap=None, temperature=1.0, entropy=True)
    vals_t, grads_t = _run("torch", hidden, weight, b, labels, softcap=None, temperature=1.0, entropy=True)
    assert vals_c[0].dtype == torch.float64
    for a, r in zip(vals_c + grads_c, vals_t + grads_t):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence,level", [("js", "token"), ("pearson", "sequence"), ("sft", "token")])
def test_loss_matches_torch_backend(divergence, level):
    x = oracle.make_inputs((3,), 11, 16, 50, seed=3, weight_scale=0.25, ignore_prefix=3)
    hidden, weight, _ = x.leaves()
    labels = x.labels
    ref = x.ref_per_row() if level == "sequence" else x.ref
    outs = {}
    for backend in ("cpu", "torch"):
        hidden.grad = weight.grad = None
        out = fk.loss(hidden, weight, labels, divergence=divergence, ref_logp=ref, beta=0.5, level=level,
                      backend=backend)
        out.loss.backward()
        outs[backend] = (out.loss.detach(), out.logp.detach(), out.lse.detach(), hidden.grad.clone(),
                         weight.grad.clone())
    for a, b in zip(outs["cpu"], outs["torch"]):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_auto_prefers_cpu_backend():
    assert fk.available_backends("cpu")["cpu"] == "available"
    assert get_backend("auto", "cpu").name == "cpu"


def test_exp_and_tanh_approximations():
    mod = native.load("cpu")
    x = torch.linspace(-87.0, 88.0, 400_001)
    rel = (mod.exp_approx(x).double() / x.double().exp() - 1).abs().max().item()
    assert rel < 3e-7, rel
    assert mod.exp_approx(torch.tensor([-1e4, float("-inf")])).max().item() < 2e-38  # clamped, no NaN
    x = torch.linspace(-30.0, 30.0, 400_001)
    err = (mod.tanh_approx(x).double() - x.double().tanh()).abs()
    assert err.max().item() < 3e-7
    small = x.abs() < 1
    assert ((err / x.double().tanh().abs().clamp(min=1e-30))[small]).max().item() < 1e-6


def test_native_module_rejects_bad_input():
    mod = native.load("cpu")
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        mod.forward(h, w, None, torch.zeros(4, dtype=torch.int32), 0.0, 1.0, False, 8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        mod.forward(h, w.double(), None, torch.zeros(4, dtype=torch.long), 0.0, 1.0, False, 8)
    with pytest.raises(RuntimeError, match="expected hidden"):
        mod.forward(h, torch.randn(10, 9), None, torch.zeros(4, dtype=torch.long), 0.0, 1.0, False, 8)


def test_missing_compiler_falls_back_to_torch(tmp_path):
    """Without a compiler the cpu backend reports why, and auto picks "torch" (fresh process)."""
    import os
    import subprocess
    import sys

    code = ("import fdiv_kernels as fk\n"
            "from fdiv_kernels.kernels.backends import get_backend\n"
            "r = fk.available_backends('cpu')['cpu']\n"
            "assert 'no C++ compiler' in r, r\n"
            "assert get_backend('auto', 'cpu').name == 'torch'\n"
            "print('ok')\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("masked", ["every third", "a whole tile"])
def test_masked_vocabulary_minus_inf_bias(masked, monkeypatch):
    """-inf bias entries (masked tokens) stay out of the softmax; no NaN in values or gradients."""
    hidden, weight, _, labels = _inputs(12, 8, 41, torch.float32, bias=False)
    bias = torch.zeros(41)
    bias[::3] = float("-inf")
    if masked == "a whole tile":  # tiles of 8 rows x 10 columns: the tile of columns 20..29 is all -inf
        monkeypatch.setattr(chunk_sizes, "TWO_PASS_ELEMENTS", 80)
        assert chunk_sizes.cpu_tile_shape(12, 41) == (8, 10)
        bias[20:30] = float("-inf")
    bias.requires_grad_()
    labels = (labels // 3) * 3 + 1  # labels are never masked
    labels = torch.where((labels >= 20) & (labels < 30), labels - 12, labels)
    for softcap in (None, 5.0):
        vals, grads = _run("cpu", hidden, weight, bias, labels, softcap=softcap, temperature=1.0, entropy=True)
        assert all(torch.isfinite(t).all() for t in vals + grads)
        assert (grads[2][::3] == 0).all()
        h, w = oracle.leaves64(hidden, weight)
        ref = oracle.token_stats(h, w, labels, bias.detach(), softcap)
        g = torch.Generator().manual_seed(1)
        sum((torch.randn(r.shape, generator=g).double() * r).sum() for r in ref).backward()
        for a, r in zip(vals, ref):
            torch.testing.assert_close(a.double(), r.detach(), **FP32_TOL)
        torch.testing.assert_close(grads[0].double(), h.grad, **FP32_TOL)
        torch.testing.assert_close(grads[1].double(), w.grad, **FP32_TOL)

"""The cpu backend's bf16 path: bf16 x bf16 -> float32 GEMMs on CPUs with bf16 units, float32
GEMMs elsewhere.

* The GEMMs really run in bf16 where the CPU has bf16 dot-product units (AVX512-BF16 or AMX):
  the torch profiler records the chunk kernels' calls with their operands' dtypes (bf16), and no
  float32 GEMM of the logits' shape runs. Skipped on CPUs without bf16 units.
* Without bf16 units (simulated by the probe answering False, or oneDNN switched off), bf16
  inputs fall back to the float32 GEMMs, with the same results within the bf16 tolerance.
* The bf16 path against the float64 oracle over several chunks and vocabulary tiles, odd sizes
  (padding), bias, soft-cap, temperature, entropy gradients, a log-mean-exp loss (``alpha``,
  ``beta`` of the grad_weight accumulation) and parameters without gradients.
"""

from __future__ import annotations

import platform

import oracle
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fdiv_kernels as fk
from fdiv_kernels.kernels import chunk_sizes, cpu_backend, native

_problem = native._toolchain_problem("cpu")
pytestmark = pytest.mark.skipif(_problem is not None, reason=f"cannot build the C++ extension: {_problem}")

GRAD_TOL = {"rtol": 2e-2, "atol": 5e-3}  # bf16 gradients (tests/test_contract.py)
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


HAS_BF16_UNITS = platform.machine() in ("x86_64", "AMD64") and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
needs_bf16_units = pytest.mark.skipif(not HAS_BF16_UNITS, reason="this CPU has no bf16 dot-product units "
                                      "(avx512_bf16 / amx_bf16 not in /proc/cpuinfo)")


@pytest.fixture(autouse=True)
def built():
    ok, reason = native.status("cpu")
    assert ok, f"the CPU extension should build on this machine: {reason}"


def _profiled_loss(n=96, h=32, v=700):
    x = oracle.make_inputs((), n, h, v, dtype=torch.bfloat16, ref_scale=None, seed=3)
    hid, w, _ = x.leaves()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fk.loss(hid, w, x.labels, backend="cpu")
        out.loss.backward()
    return prof.events(), (out.loss.detach(), hid.grad, w.grad), (n, h, v)


def _float_gemms(events, v):
    """Profiled ATen GEMMs with float32 operands one of whose dimensions is the vocabulary."""
    return [e for e in events if e.name in ("aten::mm", "aten::addmm", "aten::matmul")
            and any(dt == "float" for dt in e.input_dtypes)
            and any(v in shape for shape in e.input_shapes if shape)]


def test_probe_agrees_with_the_cpu_flags():
    probe = native.load("cpu").bf16_gemm_probe()
    if not HAS_BF16_UNITS:
        assert probe is False
    else:  # torch's x86 builds ship oneDNN's brgemm micro-kernels
        assert probe is True


@needs_bf16_units
def test_bf16_gemms_run_in_bf16():
    assert cpu_backend.bf16_gemm_available()
    events, _, (n, h, v) = _profiled_loss()
    calls = {e.name: e for e in events if e.name.startswith("fdiv_kernels::chunk_")}
    assert set(calls) == {"fdiv_kernels::chunk_stats_bf16", "fdiv_kernels::chunk_grads_bf16"}, sorted(calls)
    for e in calls.values():  # the GEMM operands: hidden rows and the packed weight
        assert e.input_dtypes[:2] == ["c10::BFloat16", "c10::BFloat16"], (e.name, e.input_dtypes)
    stats = calls["fdiv_kernels::chunk_stats_bf16"]
    assert stats.input_shapes[1] == [h // 2, v, 2]  # W^T in brgemm's bf16 pair layout
    assert not _float_gemms(events, v), "a float32 GEMM of the logits' shape ran"


@pytest.mark.parametrize("why", ["no bf16 units", "oneDNN off"])
def test_bf16_falls_back_to_float32_gemms(why, monkeypatch):
    _, fast, _ = _profiled_loss()
    if why == "no bf16 units":
        monkeypatch.setattr(cpu_backend, "_bf16_probe", lambda: False)
    else:
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not cpu_backend.bf16_gemm_available()
    events, slow, (n, h, v) = _profiled_loss()
    assert not [e for e in events if e.name.endswith("_bf16")]
    assert _float_gemms(events, v), "the fallback runs float32 GEMMs"
    oracle.assert_close(slow[0], fast[0], **VALUE_TOL, what="loss")
    for name, a, b in zip(("hidden", "weight"), slow[1:], fast[1:]):
        assert a.dtype == b.dtype == torch.bfloat16
        oracle.assert_close(a.float(), b.float(), **GRAD_TOL, what=f"d/d{name}")


def _small_chunks(monkeypatch, tokens=40, tile=96):
    monkeypatch.setattr(chunk_sizes, "CPU_BF16_SINGLE_PASS_ELEMENTS", 1)
    monkeypatch.setattr(chunk_sizes, "CPU_BF16_MIN_TOKENS", tokens)
    monkeypatch.setattr(chunk_sizes, "CPU_BF16_TILE_COLS", tile)


CASES = [
    # (rows, T, H, V, loss options, head)
    ((4,), 33, 32, 301, {"divergence": "sft"}, {}),
    ((3,), 31, 17, 257, {"divergence": "js", "beta": 0.5}, {"softcap": 5.0, "temperature": 0.8}),
    ((5,), 20, 24, 200, {"divergence": "kl", "beta": 0.3}, {}),  # log-mean-exp: alpha, beta != 1
    ((2,), 41, 16, 129, {"divergence": "tv", "level": "sequence", "beta": 0.7}, {"temperature": 1.3}),
]


@needs_bf16_units
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead,t,h,v,kw,head", CASES)
def test_bf16_path_matches_the_oracle(lead, t, h, v, kw, head, bias, monkeypatch):
    _small_chunks(monkeypatch)  # several chunks and tiles, an odd last tile
    x = oracle.make_inputs(lead, t, h, v, dtype=torch.bfloat16, bias=bias, bias_scale=0.1, ignore_frac=0.1,
                           edge_labels=True, seed=v)
    hid, w, b = x.leaves()
    ref = x.ref_per_row() if kw.get("level") == "sequence" else x.ref
    kw = dict(kw, ref_logp=None if kw["divergence"] == "sft" else ref)
    out = fk.loss(hid, w, x.labels, bias=b, backend="cpu", **head, **kw)
    grads = torch.autograd.grad(out.loss, [t_ for t_ in (hid, w, b) if t_ is not None])
    r = oracle.leaves64(x.hidden, x.weight, x.bias)
    want = oracle.fdiv_loss(oracle.token_stats(r[0], r[1], x.labels, r[2] if bias else None, **head), x.labels,
                            **kw)
    want_grads = torch.autograd.grad(want, [t_ for t_ in r if t_ is not None and (bias or t_ is not r[2])])
    oracle.assert_close(out.loss, want, **VALUE_TOL, what="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert a.dtype == torch.bfloat16 or name == "bias"
        oracle.assert_close(a, e, **GRAD_TOL, what=f"d/d{name}")


@needs_bf16_units
@pytest.mark.parametrize("need", ["hidden", "weight"])
def test_bf16_path_with_one_gradient(need, monkeypatch):
    _small_chunks(monkeypatch)
    x = oracle.make_inputs((3,), 30, 20, 150, dtype=torch.bfloat16, ref_scale=None, seed=5)
    hid, w, _ = x.leaves()
    leaf = hid if need == "hidden" else w
    (hid if need == "weight" else w).requires_grad_(False)
    out = fk.loss(hid, w, x.labels, backend="cpu")
    (got,) = torch.autograd.grad(out.loss, [leaf])
    r = oracle.leaves64(x.hidden, x.weight)
    want = oracle.fdiv_loss(oracle.token_stats(r[0], r[1], x.labels), x.labels, divergence="sft")
    (exp,) = torch.autograd.grad(want, [r[0] if need == "hidden" else r[1]])
    oracle.assert_close(got, exp, **GRAD_TOL, what=f"d/d{need}")


@needs_bf16_units
def test_bf16_token_stats_outputs_in_another_term(monkeypatch):
    """Gradients of ``out.logp``/``out.entropy`` used outside the loss: the chunk kernels rerun on
    the stored statistics (entropy gradient included)."""
    _small_chunks(monkeypatch)
    x = oracle.make_inputs((2,), 37, 18, 190, dtype=torch.bfloat16, ref_scale=None, seed=7)
    hid, w, _ = x.leaves()
    out = fk.loss(hid, w, x.labels, backend="cpu", return_entropy=True, softcap=4.0)
    mask = x.labels != oracle.IGNORE
    total = out.loss + 0.3 * (out.logp * mask).sum() + 0.2 * (out.entropy * mask).sum()
    grads = torch.autograd.grad(total, (hid, w))
    r = oracle.leaves64(x.hidden, x.weight)
    st = oracle.token_stats(r[0], r[1], x.labels, softcap=4.0)
    want = oracle.fdiv_loss(st, x.labels, divergence="sft") + 0.3 * (st.logp * mask).sum() + 0.2 * (st.entropy * mask).sum()
    for name, a, e in zip(("hidden", "weight"), grads, torch.autograd.grad(want, r)):
        oracle.assert_close(a, e, **GRAD_TOL, what=f"d/d{name}")


@needs_bf16_units
def test_bf16_kernels_keep_no_float32_weight():
    """The weight is packed in bf16 (no float32 copy); grad_weight comes back in bf16 and its float32
    accumulator is dropped by ``results``."""
    w = torch.randn(300, 24).bfloat16()
    from fdiv_kernels.specs import HeadSpec
    kern = cpu_backend.single_pass(w, None, HeadSpec(), return_entropy=False, need_h=True, need_w=True, need_b=False)
    assert isinstance(kern, cpu_backend.Bf16ChunkKernels)
    held = [t for t in vars(kern).values() if isinstance(t, torch.Tensor) and t.numel() >= w.numel()]
    assert all(t.dtype == torch.bfloat16 for t in held if t is not kern.grad_w)
    h = torch.randn(50, 24).bfloat16()
    y = torch.randint(0, 300, (50,))
    lp, lse, _ = kern.stats(h, y)
    kern.grads(h, y, lse, None, torch.full_like(lp, -0.02), torch.zeros_like(lp), None)
    gw, gb = kern.results()
    assert gw.dtype == torch.bfloat16 and gw.shape == w.shape and gw.is_contiguous() and gb is None
    assert kern.grad_w is None

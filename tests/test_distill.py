"""fk.distill_loss against the float64 oracle (tests/oracle.py: ``D_f(P_t || P_s)`` from each
generator on full logits, gradients by torch autograd), on every backend with distillation
kernels, fp32 and bf16, teacher from its head or from its logits, every reduction; the chunking
across chunk edges; a float64 gradcheck; the options, the input checks and the nn module.

Tolerances as in tests/test_contract.py (``|a - e| <= atol * max(1, max|e|) + rtol |e|``): fp32
``1e-5``; bf16 values ``1e-4`` (float32 math after bf16 GEMMs), gradients ``rtol 2e-2, atol 5e-3``
(returned in bf16; the triton/cuda coefficient rounded to bf16 before the gradient GEMMs).
"""

from __future__ import annotations

import math
import zlib

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import backends as backends_mod
from fdiv_kernels.kernels import chunk_sizes, triton_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VALUE_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 1e-4, "atol": 1e-4}}
GRAD_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 5e-3}}

#: (divergence, options): every distillation form, js's and alpha's special points included
CASES = [("kl", {}), ("reverse_kl", {}), ("js", {"beta": 0.5}), ("js", {"beta": 0.0}), ("js", {"beta": 1.0}),
         ("js", {"beta": 0.2}), ("tv", {}), ("squared_hellinger", {}), ("pearson", {}), ("neyman", {}),
         ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 1.5}), ("alpha", {"alpha": 1.0}), ("alpha", {"alpha": 0.0}),
         ("alpha", {"alpha": -0.5})]


def _case_id(case):
    name, opts = case
    return name + "".join(f"-{k}{v:g}" for k, v in opts.items())


def _backend_params():
    """``(backend, device)`` for each backend, skipped where it cannot run or has no distillation kernels."""
    cpu = fk.available_backends("cpu")
    cuda = fk.available_backends("cuda") if torch.cuda.is_available() else {}

    def param(name, device, reason):
        has = name in backends_mod.backend_names() and backends_mod._BACKENDS[name].distill is not None
        reason = reason if reason != "available" or has else "no distillation kernels"
        return pytest.param(name, device, id=name, marks=pytest.mark.skipif(reason != "available",
                                                                             reason=f"{name}: {reason}"))

    out = [param(name, "cpu", cpu.get(name, "not registered")) for name in ("torch", "cpu")]
    if triton_backend.interpret_mode():
        out.append(param("triton", "cpu", cpu.get("triton", "not registered")))
    else:
        out.append(param("triton", "cuda", cuda.get("triton", "not registered") if cuda else "no CUDA device"))
    out.append(param("cuda", "cuda", cuda.get("cuda", "not registered") if cuda else "no CUDA device"))
    return out


BACKENDS = _backend_params()


def _shape(backend, device):
    if backend == "triton" and device == "cpu":
        return {"lead": (2,), "t": 4, "h": 8, "v": 19}
    return {"lead": (3,), "t": 6, "h": 16, "v": 37}


def _inputs(backend, device, dtype, seed, **kw):
    return oracle.make_inputs(**_shape(backend, device), dtype=dtype, seed=seed, bias=True, bias_scale=0.3,
                              ignore_frac=0.2, keep_first=2, edge_labels=True, ref_scale=None, teacher=24,
                              device=device, **kw)


def _oracle(x, divergence, opts, *, from_logits=False, zt=None):
    """The oracle's loss and its gradients w.r.t. the student's (hidden, weight, bias), from ``x``."""
    r = oracle.leaves64(x.hidden, x.weight, x.bias)
    zs = oracle.logits(r[0], r[1], r[2])
    if zt is None:
        zt = oracle.logits(x.teacher_hidden, x.teacher_weight, x.teacher_bias)
    want = oracle.distill_loss(zt, zs, x.labels, divergence=divergence, **opts)
    grads = torch.autograd.grad(want.sum(), [t for t in r if t is not None])
    return want, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("teacher", ["head", "logits"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_distill_contract(backend, device, dt, teacher, case):
    """Values and student gradients against the oracle; reduction, temperature, hard-label weight and
    T^2 scaling cycled over the cases so that each appears on every backend."""
    name, opts = case
    i = CASES.index(case) + (teacher == "logits")
    opts = dict(opts, reduction=("mean", "sum", "none")[i % 3], temperature=(1.0, 0.7, 2.0)[(i // 3) % 3],
                hard_label_weight=(0.0, 0.4)[i % 2], t2_scaling=bool(i % 4 == 3))
    x = _inputs(backend, device, DTYPES[dt], zlib.crc32(_case_id(case).encode()) % 1000)
    h, w, b = x.leaves()
    tkw = {"teacher_hidden": x.teacher_hidden, "teacher_weight": x.teacher_weight, "teacher_bias": x.teacher_bias}
    zt = None
    if teacher == "logits":
        zt = oracle.logits(x.teacher_hidden, x.teacher_weight, x.teacher_bias).to(DTYPES[dt])
        tkw = {"teacher_logits": zt}
    out = fk.distill_loss(h, w, x.labels, bias=b, divergence=name, backend=backend, **opts, **tkw)
    grads = torch.autograd.grad(out.loss.sum(), (h, w, b))
    want, want_grads = _oracle(x, name, opts, zt=zt)
    assert out.loss.dtype == torch.float32 and out.loss.shape == want.shape
    oracle.assert_close(out.loss, want, **VALUE_TOL[dt], what="loss")
    for what, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert a.dtype == DTYPES[dt], what
        oracle.assert_close(a, e, **GRAD_TOL[dt], what=f"d/d{what}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_distill_masked_vocabulary(backend, device, case):
    """``-inf`` logits through either bias, some in one model only, some in both: the limits
    ``p_s f(0)`` / ``p_t lim f(r)/r`` (exact zeros where both are masked) or, where the divergence is
    infinite there, a ValueError naming it."""
    name, opts = case
    x = _inputs(backend, device, torch.float32, 7, mask=(0, 3, 5), teacher_mask=(3, 5, 8))
    h, w, b = x.leaves()
    form, c = fk.DistillSpec(name, **opts).form, fk.DistillSpec(name, **opts).param
    infinite = (not math.isfinite(form.f_inf(c)), not math.isfinite(form.f0(c)))  # (student-only, teacher-only mask)
    kw = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight, teacher_bias=x.teacher_bias,
              bias=b, divergence=name, backend=backend, temperature=1.3, **opts)
    if any(infinite):
        with pytest.raises(ValueError, match=f"divergence '{name}' is infinite at position"):
            fk.distill_loss(h, w, x.labels, **kw)
        return
    out = fk.distill_loss(h, w, x.labels, **kw)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    want, want_grads = _oracle(x, name, dict(opts, temperature=1.3))
    oracle.assert_close(out.loss, want, **VALUE_TOL["fp32"], what="loss")
    for what, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        oracle.assert_close(a, e, **GRAD_TOL["fp32"], what=f"d/d{what}")
    masked = x.masked.to(device)
    assert (grads[1][masked] == 0).all() and (grads[2][masked] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_chunks_are_exact_across_edges(backend, device, reduction, monkeypatch):
    """Chunks of 2 and 3 rows (rows of tokens split anywhere) give the one-chunk result."""
    x = _inputs(backend, device, torch.float32, 3)
    kw = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight, teacher_bias=x.teacher_bias,
              divergence="js", beta=0.3, hard_label_weight=0.2, temperature=0.8, reduction=reduction, backend=backend)

    def run():
        h, w, b = x.leaves()
        out = fk.distill_loss(h, w, x.labels, bias=b, **kw)
        return (out.loss,) + torch.autograd.grad(out.loss.sum(), (h, w, b))

    whole = run()
    for rows in (2, 3):
        for fn in ("distill_torch_tokens", "distill_cpu_tokens", "distill_gpu_tokens"):
            monkeypatch.setattr(chunk_sizes, fn, lambda v, rows=rows: rows)
        for a, e in zip(run(), whole):
            torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-7)


REGIMES = {
    # the teacher's mode 40 nats down in the student in row 0, the student's mode 40 down in the teacher in row 1
    "far_apart": {"scale": 2.0, "shift": 40.0, "temperature": 1.0},
    "large_logits": {"scale": 1e4, "shift": 0.0, "temperature": 1.0},
    "large_logits_tempered": {"scale": 1e4, "shift": 0.0, "temperature": 37.0},
}
F32_MAX = 3.4e38


def _regime_logits(regime, v=13, n=3, seed=0):
    cfg = REGIMES[regime]
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, v, generator=g) * cfg["scale"]
    zs = zt + torch.randn(n, v, generator=g) * cfg["scale"] * 0.5
    if cfg["shift"]:
        zs[0, zt[0].argmax()] -= cfg["shift"]
        zt[1, zs[1].argmax()] -= cfg["shift"]
    return zt, zs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_stability_far_apart_and_large_logits(backend, device, regime, case):
    """Far-apart distributions (a mode 40 nats down in the other model) and logits to 1e4 (with and
    without a temperature): where the float64 divergence and its gradient fit float32, the float32
    result matches them to float32 resolution (1e-5 relative plus ``4 eps |z|``, one ulp of the
    logits in the log-probs); where they do not, a ValueError names the divergence (never a NaN)."""
    name, opts = case
    zt, zs = _regime_logits(regime)
    n, v = zs.shape
    labels = torch.arange(n) % v
    kw = dict(divergence=name, temperature=REGIMES[regime]["temperature"], **opts)
    want, want_grad = oracle.distill_mp(zt, zs, **kw)
    weight = torch.eye(v, device=device)  # logits = hidden exactly
    h = zs.to(device).requires_grad_()
    fits = math.isfinite(want) and abs(want) < F32_MAX and bool(torch.isfinite(want_grad).all()) \
        and float(want_grad.abs().max()) < F32_MAX
    if not fits:
        with pytest.raises(ValueError, match=f"divergence '{name}'|{name}"):
            fk.distill_loss(h, weight, labels.to(device), teacher_logits=zt.to(device), backend=backend, **kw)
        return
    out = fk.distill_loss(h, weight, labels.to(device), teacher_logits=zt.to(device), backend=backend, **kw)
    grad, = torch.autograd.grad(out.loss, h)
    slack = 4 * 1.2e-7 * float(zs.abs().max()) / REGIMES[regime]["temperature"]
    scale_v = max(1.0, abs(want))
    assert abs(float(out.loss) - want) <= 1e-5 * scale_v + slack * scale_v, (float(out.loss), want)
    scale_g = max(1e-30, float(want_grad.abs().max()))
    err = float((grad.double().cpu() - want_grad).abs().max())
    assert err <= (1e-5 + slack) * max(1.0, scale_g), (err, scale_g)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, device, dtype):
    """fp16 / bf16 hidden states and heads: the loss of the rounded inputs to 1e-4 (float32 math
    after the GEMMs), gradients in the input dtype to its resolution."""
    x = _inputs(backend, device, dtype, 9)
    h, w, b = x.leaves()
    out = fk.distill_loss(h, w, x.labels, bias=b, teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight,
                          teacher_bias=x.teacher_bias, divergence="squared_hellinger", temperature=1.5,
                          hard_label_weight=0.3, backend=backend)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    want, want_grads = _oracle(x, "squared_hellinger", {"temperature": 1.5, "hard_label_weight": 0.3})
    oracle.assert_close(out.loss, want, rtol=1e-4, atol=1e-4, what="loss")
    for what, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert a.dtype == dtype
        oracle.assert_close(a, e, rtol=2e-2, atol=5e-3, what=f"d/d{what}")


def test_distill_gradcheck(monkeypatch):
    """float64 gradcheck (torch backend) through 2-row chunks, every reduction."""
    monkeypatch.setattr(chunk_sizes, "distill_torch_tokens", lambda v: 2)
    x = oracle.make_inputs(lead=(2,), t=3, h=5, v=7, dtype=torch.float64, seed=4, bias=True, ignore_at=((0, 1),),
                           ref_scale=None, teacher=6)
    for name, opts in (("js", {"beta": 0.3}), ("pearson", {}), ("alpha", {"alpha": 1.5})):
        for reduction in ("mean", "sum", "none"):
            def f(h, w, b):
                return fk.distill_loss(h, w, x.labels, bias=b, teacher_hidden=x.teacher_hidden,
                                       teacher_weight=x.teacher_weight, divergence=name, temperature=1.4,
                                       hard_label_weight=0.3, reduction=reduction, backend="torch", **opts).loss
            assert torch.autograd.gradcheck(f, x.leaves(), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The per-entry forms against mpmath
# ---------------------------------------------------------------------------------------------

def _mp_a(name, c):
    """The ``a(r)`` each form uses (``f(r) - r f'(r)`` up to a constant), in mpmath."""
    mp = mpmath
    if name == "alpha":
        return (lambda r: -mp.log(r)) if c == 0 else (lambda r: -mp.expm1(c * mp.log(r)) / c)
    return {
        "kl": lambda r: -r,
        "reverse_kl": lambda r: -mp.log(r),
        "js": lambda r: -(1 - c) * mp.log(c * r + 1 - c),
        "tv": lambda r: mp.sign(1 - r) / 2,
        "squared_hellinger": lambda r: -mp.sqrt(r),
        "pearson": lambda r: -r * r,
        "neyman": lambda r: 2 / r,
    }[name]


mpmath = pytest.importorskip("mpmath")
FORM_POINTS = [(-1.0, -2.0), (-2.0, -1.0), (-0.5, -0.5000001), (-3.0, -43.0), (-43.0, -3.0), (-1e-3, -7.0),
               (-90.0, -1.0), (-1.0, -90.0), (-0.7, -0.7), (-1e-6, -2e-6), (-25.0, -0.01)]
FORM_PARAMS = {"js": (0.5, 0.1, 0.9), "alpha": (0.5, 1.0, 1.0 + 1e-7, 1.0 - 1e-7, 1e-7, 1.5, 2.0, 0.0, -0.5, 3.0)}


@pytest.mark.parametrize("name", sorted(fk.DISTILL_DIVERGENCES))
def test_forms_against_mpmath(name):
    """``term = p_s f(r)`` and ``pa = p_s a(r)`` in float64 to 1e-12 relative (or 1e-15 absolute) of
    60-digit mpmath, at log-ratios from 1e-6 to +-89 nats (alpha next to 0 and 1 included), and in
    float32 to 1e-5 relative wherever the value fits float32 (else inf: beyond float32, a ValueError
    upstream)."""
    form = fk.get_divergence(name, "distill").distill
    for c in FORM_PARAMS.get(name, (0.0,)):
        f, a = oracle.mp_generator(name, c), _mp_a(name, c)
        for lt, ls in FORM_POINTS:
            with mpmath.workdps(60):
                ps, r = mpmath.exp(mpmath.mpf(ls)), mpmath.exp(mpmath.mpf(lt) - mpmath.mpf(ls))
                want_t, want_a = float(ps * f(r)), float(ps * a(r))
            for dtype, rtol, atol in ((torch.float64, 1e-12, 1e-15), (torch.float32, 1e-5, 1e-7)):
                args = (torch.tensor([lt], dtype=dtype), torch.tensor([ls], dtype=dtype), c)
                for what, got, want in (("term", form.term(*args).item(), want_t), ("pa", form.pa(*args).item(), want_a)):
                    if dtype == torch.float32 and abs(want) > 3.4e38:
                        assert math.isinf(got), (name, c, lt, ls, what)
                        continue
                    assert abs(got - want) <= atol + rtol * abs(want), (name, c, lt, ls, what, dtype, got, want)


# ---------------------------------------------------------------------------------------------
# Options and inputs
# ---------------------------------------------------------------------------------------------

def _small():
    return oracle.make_inputs(lead=(2,), t=3, h=8, v=11, seed=5, ref_scale=None, teacher=6)


def test_alpha_limits_are_continuous():
    """alpha -> 1 is forward KL and alpha -> 0 reverse KL, from either side, to float32 resolution."""
    x = _small()
    kw = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight, backend="torch")

    def value(**o):
        return float(fk.distill_loss(x.hidden, x.weight, x.labels, **kw, **o).loss)

    for a, ref in ((1.0, "kl"), (0.0, "reverse_kl")):
        want = value(divergence=ref)
        for d in (0.0, 1e-6, -1e-6, 1e-3):
            assert abs(value(divergence="alpha", alpha=a + d) - want) <= 2e-5 * max(1.0, abs(want)) + 5 * abs(d)


def test_js_beta_half_is_half_the_registry_generator():
    """js at beta = 0.5 is the textbook JS: half the registry's f-GAN generator (u log u - (1+u) log((1+u)/2))."""
    x = _small()
    out = fk.distill_loss(x.hidden, x.weight, x.labels, teacher_hidden=x.teacher_hidden,
                          teacher_weight=x.teacher_weight, divergence="js", beta=0.5, reduction="none", backend="torch")
    pt = torch.softmax(oracle.logits(x.teacher_hidden, x.teacher_weight), -1)
    ps = torch.softmax(oracle.logits(x.hidden, x.weight), -1)
    r = pt / ps
    fgan = (ps * (r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2))).sum(-1)
    oracle.assert_close(out.loss, torch.where(x.labels != oracle.IGNORE, fgan / 2, 0.0), rtol=1e-5, atol=1e-6,
                        what="js")


@pytest.mark.parametrize("bad,match", [
    (dict(divergence="nope"), "unknown divergence"),
    (dict(divergence="alpha"), "needs alpha"),
    (dict(divergence="kl", alpha=0.5), "applies to divergence='alpha' only"),
    (dict(divergence="js", beta=1.5), r"beta must be a number in \[0, 1\]"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=math.inf), "temperature must be"),
    (dict(hard_label_weight=-1.0), "hard_label_weight must be"),
    (dict(reduction="batchmean"), "reduction='batchmean' is not supported"),
])
def test_options_are_validated(bad, match):
    x = _small()
    with pytest.raises(ValueError, match=match):
        fk.distill_loss(x.hidden, x.weight, x.labels, teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight,
                        **bad)


def test_inputs_are_validated():
    x = _small()
    t = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight)
    with pytest.raises(ValueError, match="needs a teacher"):
        fk.distill_loss(x.hidden, x.weight, x.labels)
    with pytest.raises(ValueError, match="vocabulary of 12 but the student's weight one of 11"):
        fk.distill_loss(x.hidden, x.weight, x.labels, teacher_hidden=x.teacher_hidden,
                        teacher_weight=torch.randn(12, 6))
    with pytest.raises(ValueError, match="not both"):
        fk.distill_loss(x.hidden, x.weight, x.labels, teacher_logits=torch.randn(2, 3, 11), **t)
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \(2, 3, 11\)"):
        fk.distill_loss(x.hidden, x.weight, x.labels, teacher_logits=torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"teacher_hidden must have shape \(2, 3, 6\)"):
        fk.distill_loss(x.hidden, x.weight, x.labels, teacher_hidden=x.teacher_hidden[:, :2],
                        teacher_weight=x.teacher_weight)
    with pytest.raises(ValueError, match="has no distillation kernels|no distill"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backends_mod, "_BACKENDS", {**backends_mod._BACKENDS,
                                                   "cpu": backends_mod._BACKENDS["torch"].__class__(
                                                       **{**backends_mod._BACKENDS["torch"].__dict__, "name": "cpu",
                                                          "distill": None})})
            fk.distill_loss(x.hidden, x.weight, x.labels, backend="cpu", **t)


def test_a_vocabulary_parallel_head_is_refused_clearly(tmp_path):
    """A DTensor head (a ColwiseParallel lm_head) is named, with what to pass instead."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    x = _small()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        w = distribute_tensor(x.weight, DeviceMesh("cpu", [0]), [Shard(0)])
        with pytest.raises(ValueError, match=r"weight is a DTensor: .*weight.full_tensor\(\)"):
            fk.distill_loss(x.hidden, w, x.labels, teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight)
    finally:
        dist.destroy_process_group()


def test_teacher_gets_no_gradient_and_shift_matches_manual():
    x = _small()
    th, tw = x.teacher_hidden.clone().requires_grad_(), x.teacher_weight.clone().requires_grad_()
    h, w, _ = x.leaves(bias=False)
    out = fk.distill_loss(h, w, x.labels, teacher_hidden=th, teacher_weight=tw, divergence="tv", shift=True,
                          backend="torch")
    out.loss.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None
    manual = fk.distill_loss(x.hidden[:, :-1], x.weight, x.labels[:, 1:], teacher_hidden=x.teacher_hidden[:, :-1],
                             teacher_weight=x.teacher_weight, divergence="tv", backend="torch")
    torch.testing.assert_close(out.loss.detach(), manual.loss)
    assert out.divergence_loss.shape == (2, 2) and int(out.num_tokens) == int((x.labels[:, 1:] != -100).sum())


def test_empty_batch_is_zero_with_zero_gradients():
    x = _small()
    labels = torch.full_like(x.labels, -100)
    h, w, b = x.leaves()
    out = fk.distill_loss(h, w, labels, teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight,
                          divergence="kl", backend="torch")
    out.loss.backward()
    assert float(out.loss) == 0.0 and float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


def test_nn_module_matches_the_function():
    x = _small()
    mod = fk.nn.FusedLinearDistillLoss(divergence="alpha", alpha=1.5, temperature=2.0, hard_label_weight=0.5,
                                       backend="torch")
    assert mod.alpha == 1.5 and isinstance(mod.spec, fk.DistillSpec)
    lm, tlm = torch.nn.Linear(8, 11), torch.nn.Linear(6, 11)
    got = mod(x.hidden, lm, x.labels, teacher_hidden=x.teacher_hidden, teacher_weight=tlm)
    want = fk.distill_loss(x.hidden, lm.weight, x.labels, bias=lm.bias, teacher_hidden=x.teacher_hidden,
                           teacher_weight=tlm.weight, teacher_bias=tlm.bias, divergence="alpha", alpha=1.5,
                           temperature=2.0, hard_label_weight=0.5, backend="torch")
    torch.testing.assert_close(got, want.loss)


def test_no_grad_runs_values_only(monkeypatch):
    """Under torch.no_grad (or with nothing requiring grad) no coefficient and no gradient GEMM."""
    from fdiv_kernels.kernels import distill_chunks

    seen = []
    orig = distill_chunks.DistillChunks.chunk

    def spy(self, h, y, wt, **kw):
        seen.append(wt is None)
        return orig(self, h, y, wt, **kw)

    monkeypatch.setattr(distill_chunks.DistillChunks, "chunk", spy)
    x = _small()
    h, w, _ = x.leaves(bias=False)
    kw = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight, divergence="js", backend="torch")
    with torch.no_grad():
        a = fk.distill_loss(h, w, x.labels, **kw).loss
    b = fk.distill_loss(x.hidden, x.weight, x.labels, **kw).loss
    assert seen and all(seen)
    seen.clear()
    c = fk.distill_loss(h, w, x.labels, **kw).loss
    assert seen and not any(seen)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c.detach())

"""The single-pass fused loss (fdiv_kernels/autograd/fused.py) against plain torch autograd on full logits.

Every spec (divergence x level x values mode x z_loss x reduction, primal forms, DPO kinds) on
every backend with chunk kernels: values and gradients equal the float32 autograd reference,
gradcheck in float64, chunk boundaries (rows split, DPO pairs kept whole), the running-max
rescaling of the log-mean-exp divergences, three GEMMs per chunk, one under ``no_grad``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import oracle
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdiv_kernels as fk
from fdiv_kernels.autograd import fused
from fdiv_kernels.kernels import available_backends, chunk_sizes, cpu_backend

BACKENDS = [b for b in ("torch", "cpu") if available_backends("cpu").get(b) == "available"]
#: the triton chunk epilogues under the interpreter (slow: a representative subset of specs)
TRITON = ["triton"] if available_backends("cpu").get("triton") == "available" else []
NAMES = sorted(fk.DIVERGENCES)


def make(rows=3, t=9, seed=0, dtype=torch.float32, spread=0.0):
    """``(hidden, weight, bias, labels, ref)`` from the suite's builder: H=16, V=37, row 0's first
    three and the last row's last two positions ignored."""
    x = oracle.make_inputs((rows,), t, 16, 37, dtype=dtype, seed=seed, weight_scale=0.5, bias=True, bias_scale=0.1,
                           ignore_at=((0, 0), (0, 1), (0, 2), (rows - 1, -2), (rows - 1, -1)), ref_scale=2.0,
                           ref_spread=spread)
    return x.hidden, x.weight, x.bias, x.labels, x.ref


def _loss(*args, form="variational", **kw):
    """``fk.loss``, or ``fk.primal_loss`` for the specs marked ``form="primal"``."""
    return (fk.primal_loss if form == "primal" else fk.loss)(*args, **kw)


def reference(hidden, weight, bias, labels, **kw):
    """The loss (summed for reduction="none") and its gradients from the float64 oracle."""
    h, w, b = oracle.leaves64(hidden, weight, bias)
    softcap, temperature = kw.pop("softcap", None), kw.pop("temperature", 1.0)
    loss = oracle.fdiv_loss(oracle.token_stats(h, w, labels, b, softcap, temperature), labels, **kw).sum()
    return loss, torch.autograd.grad(loss, (h, w, b))


def fused_run(hidden, weight, bias, labels, backend, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    out = _loss(h, w, labels, bias=b, backend=backend, **kw)
    return out.loss, torch.autograd.grad(out.loss, (h, w, b)), out


def close(a, b, rtol=1e-5, atol=1e-5):
    """Equal to ``rtol`` elementwise, ``atol`` relative to the tensor's largest entry (fp32 roundoff
    scales with the loss: Pearson's primal form reaches losses of 1e3 here)."""
    oracle.assert_close(a, b, rtol=rtol, atol=atol)


SPECS = (
    [dict(divergence=d, level=lv, values=vm) for d in NAMES for lv in ("token", "sequence")
     for vm in ("drop", "detach", "free") if not (fk.DIVERGENCES[d].aggregate == "logmeanexp" and vm == "free")]
    + [dict(divergence="js", z_loss=0.01), dict(divergence="pearson", level="sequence", length_normalize=True),
       dict(divergence="kl", reduction="sum"), dict(divergence="reverse_kl", level="sequence", reduction="sum"),
       dict(divergence="tv", values="free", z_loss=0.1)]
    + [dict(divergence=d, form="primal") for d in ("kl", "tv", "pearson", "squared_hellinger", "js", "alpha")]
)


def _id(kw):
    return "-".join(f"{v}" for v in kw.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", SPECS, ids=_id)
def test_single_pass_equals_autograd_on_full_logits(backend, kw, monkeypatch):
    hidden, weight, bias, labels, ref = make(seed=zlib.crc32(_id(kw).encode()) % 1000)
    calls = []
    monkeypatch.setattr(fused.FusedLossFunction, "apply", _spy(fused.FusedLossFunction.apply, calls))
    extra = dict(kw)
    if kw.get("form") != "primal":
        extra.update(ref_logp=ref, beta=0.7)
    loss, grads, _ = fused_run(hidden, weight, bias, labels, backend, softcap=6.0, temperature=0.9, **extra)
    want, want_grads = reference(hidden, weight, bias, labels, softcap=6.0, temperature=0.9, **extra)
    assert calls, "the single-pass path was not taken"
    close(loss, want)
    for a, b in zip(grads, want_grads):
        close(a, b)


TRITON_SPECS = [dict(divergence="sft"), dict(divergence="kl", level="sequence"), dict(divergence="js", values="free"),
                dict(divergence="squared_hellinger"), dict(divergence="pearson", form="primal")]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", TRITON_SPECS, ids=_id)
def test_triton_chunk_epilogues_single_pass(backend, dtype, kw, monkeypatch):
    """The triton backend's one-pass chunks (cuBLAS-style GEMMs + Triton epilogues) under the
    interpreter, against autograd on the same (bf16-rounded) inputs."""
    calls = []
    monkeypatch.setattr(fused.FusedLossFunction, "apply", _spy(fused.FusedLossFunction.apply, calls))
    hidden, weight, bias, labels, ref = make(seed=zlib.crc32(_id(kw).encode()) % 1000)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    extra = dict(kw) if kw.get("form") == "primal" else dict(kw, ref_logp=ref, beta=0.7)
    h, w, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    out = _loss(h, w, labels, bias=b, backend=backend, softcap=6.0, temperature=0.9, **extra)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    want, want_grads = reference(hidden.float(), weight.float(), bias, labels, softcap=6.0, temperature=0.9, **extra)
    assert calls
    close(out.loss, want)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-3)
    for a, c in zip(grads, want_grads):
        close(a.float(), c, **tol)


def _spy(fn, calls):
    def wrapped(*args):
        calls.append(args[-1])
        return fn(*args)
    return wrapped


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_float64_through_chunks(name, level, monkeypatch):
    """float64 goes to the torch backend's chunk kernels; tiny chunks put every boundary in play."""
    monkeypatch.setattr(chunk_sizes, "TWO_PASS_ELEMENTS", 4 * 7)  # 4 tokens per chunk at V=7
    x = oracle.make_inputs((3,), 5, 4, 7, dtype=torch.float64, seed=3, weight_scale=1.0, ignore_at=((0, 0),))
    hidden, weight, _ = x.leaves()
    labels, ref = x.labels, x.ref.double()
    values = "drop" if fk.DIVERGENCES[name].aggregate == "logmeanexp" else "free"

    def f(h, w):
        return fk.loss(h, w, labels, divergence=name, ref_logp=ref, beta=0.7, level=level, values=values,
                       z_loss=0.01 if values == "free" else 0.0, backend="torch").loss

    assert torch.autograd.gradcheck(f, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kl", "squared_hellinger"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_log_mean_exp_rescaling_across_chunks(backend, name, level, monkeypatch):
    """Rows 40 nats apart in reward, one or two rows per chunk: the running max moves up and
    down, and the result equals the whole-batch log-mean-exp."""
    _tiny_chunks(monkeypatch, tokens=7)
    hidden, weight, bias, labels, ref = make(rows=6, spread=40.0, seed=5)
    loss, grads, _ = fused_run(hidden, weight, bias, labels, backend, divergence=name, level=level, ref_logp=ref,
                               beta=1.0)
    want, want_grads = reference(hidden, weight, bias, labels, divergence=name, level=level, ref_logp=ref, beta=1.0)
    assert torch.isfinite(loss)
    close(loss, want)
    for a, b in zip(grads, want_grads):
        close(a, b)


def _tiny_chunks(monkeypatch, tokens):
    for name in ("torch", "cpu"):
        b = fk.kernels.backends._BACKENDS.get(name)
        if b is not None:
            monkeypatch.setitem(fk.kernels.backends._BACKENDS, name,
                                fk.kernels.backends.Backend(**{**b.__dict__, "chunk_tokens": lambda v, h, dt: tokens}))


@pytest.mark.parametrize("tokens", [1, 2, 5, 1000])
def test_chunk_plans(tokens):
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    tok_spec = fk.specs.FDivSpec("js")
    plan = fused.plan_chunks(tok_spec, mask, tokens)
    assert plan.num_tokens == 8 and sum(c.tok1 - c.tok0 for c in plan.chunks) == 8
    assert all(c.tok1 - c.tok0 <= tokens for c in plan.chunks)
    seq = fused.plan_chunks(fk.specs.FDivSpec("js", level="sequence"), mask, tokens)
    want = {1: None, 2: None, 5: [(0, 2), (2, 4)], 1000: [(0, 4)]}[tokens]  # rows of 3, 0, 4, 1 tokens
    assert (seq if seq is None else [(c.row0, c.row1) for c in seq.chunks]) == want
    dpo = fused.plan_chunks(fk.specs.DPOSpec(), mask, max(tokens, 7))  # pairs (0, 2): 7 tokens, (1, 3): 1
    assert dpo.order.tolist() == [0, 2, 1, 3]  # the rows of a pair adjacent
    assert [(c.row0, c.row1) for c in dpo.chunks] == ([(0, 2), (2, 4)] if tokens < 8 else [(0, 4)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_longer_than_a_chunk_take_the_two_pass_path(backend, monkeypatch):
    _tiny_chunks(monkeypatch, tokens=3)
    hidden, weight, bias, labels, ref = make()
    loss, grads, _ = fused_run(hidden, weight, bias, labels, backend, divergence="pearson", level="sequence",
                               ref_logp=ref, beta=0.5)
    want, want_grads = reference(hidden, weight, bias, labels, divergence="pearson", level="sequence", ref_logp=ref,
                                 beta=0.5)
    close(loss, want)
    for a, b in zip(grads, want_grads):
        close(a, b)


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_three_gemms_per_chunk_and_one_without_grad(monkeypatch):
    """torch backend: a forward + backward is exactly 3 GEMMs per chunk; under no_grad, 1."""
    _tiny_chunks(monkeypatch, tokens=8)
    hidden, weight, bias, labels, ref = make(rows=4, t=8)
    chunks = math.ceil(int((labels != -100).sum()) / 8)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _CountGemms() as cg:
        out = fk.loss(h, w, labels, divergence="js", ref_logp=ref, beta=0.3, backend="torch")
        out.loss.backward()
    assert cg.count == 3 * chunks
    with torch.no_grad(), _CountGemms() as cg:
        fk.loss(h, w, labels, divergence="js", ref_logp=ref, beta=0.3, backend="torch")
    rows = chunk_sizes.torch_rows(weight.shape[0])
    assert cg.count == math.ceil(int((labels != -100).sum()) / rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_used_outside_the_loss_get_their_gradients(backend):
    """logp/lse/reward of the output feed another term: its gradient is added by the recompute kernels."""
    hidden, weight, bias, labels, ref = make(seed=7)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fk.loss(h, w, labels, bias=b, divergence="js", ref_logp=ref, beta=0.5, backend=backend)
    total = out.loss + 0.3 * out.lse.square().sum() - 0.1 * out.reward.sum()
    grads = torch.autograd.grad(total, (h, w, b))
    h2, w2, b2 = oracle.leaves64(hidden, weight, bias)
    st = oracle.token_stats(h2, w2, labels, b2)
    reward = torch.where(labels != -100, 0.5 * (st.logp - ref.double()), 0.0)  # js, token level, values="drop"
    want = oracle.fdiv_loss(st, labels, divergence="js", ref_logp=ref, beta=0.5) + 0.3 * st.lse.square().sum() \
        - 0.1 * reward.sum()
    torch.testing.assert_close(out.reward.double(), reward.detach(), rtol=1e-5, atol=1e-5)
    for a, c in zip(grads, torch.autograd.grad(want, (h2, w2, b2))):
        close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_grad_output_and_frozen_inputs(backend):
    hidden, weight, bias, labels, ref = make(seed=8)
    h, w = hidden.clone().requires_grad_(), weight.clone()  # frozen head
    out = fk.loss(h, w, labels, divergence="kl", ref_logp=ref, beta=0.5, backend=backend)
    (g,) = torch.autograd.grad(out.loss * 2.5, (h,))
    (h2,) = oracle.leaves64(hidden)
    want = oracle.fdiv_loss(oracle.token_stats(h2, weight, labels), labels, divergence="kl", ref_logp=ref, beta=0.5)
    (g2,) = torch.autograd.grad(want * 2.5, (h2,))
    close(g, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_bf16(backend):
    hidden, weight, bias, labels, ref = make(seed=9)
    h = hidden.clone().requires_grad_()
    out = fk.loss(h, weight, torch.full_like(labels, -100), divergence="kl", backend=backend)
    (g,) = torch.autograd.grad(out.loss, (h,))
    assert out.loss.item() == 0.0 and (g == 0).all()
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    out = fk.loss(hb, wb, labels, divergence="js", ref_logp=ref, beta=0.5, backend=backend)
    gh, gw = torch.autograd.grad(out.loss, (hb, wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    want, want_grads = reference(hb.float(), wb.float(), torch.zeros(weight.shape[0]), labels, divergence="js",
                                 ref_logp=ref, beta=0.5)
    close(out.loss, want, rtol=1e-4, atol=1e-4)
    close(gh.float(), want_grads[0], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [*fk.DPO_LOSS_TYPES, ("sigmoid", "sft"), ("aot", "sft")])
def test_fused_linear_dpo_single_pass_matches_dpo_loss(backend, kind, monkeypatch):
    """One pair per chunk: the pair terms chunk by chunk, the sft term over the whole batch's chosen
    tokens; aot (which sorts the batch) exceeds a chunk and runs in two passes inside the fused call."""
    _tiny_chunks(monkeypatch, tokens=9)  # one pair per chunk
    b = 3
    x = oracle.make_inputs((2 * b,), 6, 8, 29, seed=11, weight_scale=0.5, ignore_prefix=2, ref_scale=None)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    ref = -torch.rand(2 * b, generator=torch.Generator().manual_seed(12)) * 10
    kinds = [kind] if isinstance(kind, str) else list(kind)
    opts = {k: v for t in kinds for k, v in oracle.dpo_kind_options(t).items() if v}
    mod = fk.nn.FusedLinearDPOLoss(beta=0.2, loss_type=kind, backend=backend, **opts)
    ref_in = ref if mod.spec.needs_reference else None
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    calls = []
    monkeypatch.setattr(fused.FusedLossFunction, "apply", _spy(fused.FusedLossFunction.apply, calls))
    out = mod(h, w, labels, ref_logp=ref_in, return_output=True)
    grads = torch.autograd.grad(out.loss, (h, w))
    assert calls
    h2, w2 = oracle.leaves64(hidden, weight)
    if isinstance(kind, str):
        assert mod.length_normalize == (kind in oracle.MEAN_LOGP_KINDS)
    want, want_losses = oracle.dpo_pair_loss(oracle.token_stats(h2, w2, labels), labels, ref_in, kind=kinds,
                                             beta=0.2, **{k: v for k, v in opts.items()})
    close(out.loss, want)
    close(out.losses, want_losses)
    for a, c in zip(grads, torch.autograd.grad(want, (h2, w2))):
        close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kto", ("kto", "sft")])
def test_fused_linear_kto_single_pass_chunks_rows(backend, kind, monkeypatch):
    """One row per chunk: each chunk reads its rows' desirable flags at its offset."""
    _tiny_chunks(monkeypatch, tokens=5)
    x = oracle.make_inputs((5,), 6, 8, 29, seed=13, weight_scale=0.5, ignore_prefix=2, ref_scale=None)
    desirable = torch.tensor([False, True, True, False, True])
    ref = -torch.rand(5, generator=torch.Generator().manual_seed(14)) * 10
    mod = fk.nn.FusedLinearKTOLoss(beta=0.3, loss_type=kind, backend=backend)
    plan = fused.plan_chunks(dataclasses.replace(mod.spec, desirable=(True,) * 5), x.labels != -100, 5)
    assert len(plan.chunks) == 5
    h, w = x.hidden.clone().requires_grad_(), x.weight.clone().requires_grad_()
    out = mod(h, w, x.labels, desirable, ref_logp=ref, kl=0.25)
    grads = torch.autograd.grad(out, (h, w))
    h2, w2 = oracle.leaves64(x.hidden, x.weight)
    s, _, n = oracle.sequence_logp(oracle.token_stats(h2, w2, x.labels), x.labels)
    losses = oracle.kto_losses("kto", s, ref.double(), desirable, beta=0.3, kl=0.25)
    if "sft" in kind:
        losses = losses - s[desirable].sum() / n[desirable].sum()
    close(out, losses.mean())
    for a, c in zip(grads, torch.autograd.grad(losses.mean(), (h2, w2))):
        close(a, c)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_cpu_workspace_is_reused_per_thread_and_released():
    """The cpu backend keeps one chunk buffer per thread between calls (no page faults per call)."""
    import threading

    hidden, weight, bias, labels, ref = make(seed=12)
    h = hidden.clone().requires_grad_()
    fk.loss(h, weight, labels, backend="cpu").loss.backward()
    buf = cpu_backend.workspace(1)
    fk.loss(h, weight, labels, backend="cpu").loss.backward()
    assert cpu_backend.workspace(1) is buf
    other = []
    t = threading.Thread(target=lambda: other.append(cpu_backend.workspace(1)))
    t.start()
    t.join()
    assert other[0] is not buf  # never shared between threads
    fk.kernels.release_workspaces()
    assert cpu_backend.workspace(1) is not buf

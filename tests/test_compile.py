"""``torch.compile(fullgraph=True)`` of every entry point (fdiv_kernels/compiled.py).

Each case runs one training step (loss and gradients) eagerly and compiled, on fresh copies of
the same inputs, and compares values and gradients (the compiled graph runs the same eager
kernels inside custom ops, so they agree to float32 rounding). ``fullgraph=True`` makes any graph
break an error. Data errors must still raise under compile, with the eager messages.
"""

from __future__ import annotations

import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels import compiled
from fdiv_kernels.kernels import native
from fdiv_kernels.specs import DPOSpec, FDivSpec, PrimalSpec

V, H = 40, 16
TOL = {"atol": 1e-6, "rtol": 1e-5}

_cpu_problem = native._toolchain_problem("cpu")
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    _cpu_problem is not None, reason=f"cannot build the C++ extension: {_cpu_problem}"))]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


def _inputs(rows=4, t=7, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (rows, t), generator=g)
    if ignore:
        labels[0, :2] = -100
        labels[-1, 3:] = -100
    ref = -torch.rand(rows, t, generator=g) * 3
    return hidden, weight, labels, ref


def _run(fn, tensors, compile_backend=None):
    """Values and gradients (w.r.t. the floating tensors that require grad) of ``fn(*tensors)``."""
    args = [t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t.clone()
            for t in tensors]
    f = fn if compile_backend is None else torch.compile(fn, fullgraph=True, backend=compile_backend)
    outs = f(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()
    return [o.detach() for o in outs], [a.grad for a in args if a.is_floating_point() and a.requires_grad]


def _assert_same(fn, tensors, compile_backend="eager", tol=TOL):
    (v0, g0), (v1, g1) = _run(fn, tensors), _run(fn, tensors, compile_backend)
    assert len(v0) == len(v1) and len(g0) == len(g1)
    for a, b in zip(v0 + g0, v1 + g1):
        torch.testing.assert_close(b, a, **tol)


def _grad(*ts):
    return [t.requires_grad_() for t in ts]


# --- fk.loss from (hidden, weight), one spec per path -------------------------------------------

LOSS_CASES = {
    "sft_token": {"divergence": "sft"},
    "kl_token_ref": {"divergence": "kl", "beta": 0.5, "use_ref": True},
    "js_sequence_length_normalize": {"divergence": "js", "level": "sequence", "length_normalize": True, "use_ref": True},
    "pearson_reduction_none": {"divergence": "pearson", "reduction": "none", "use_ref": True},  # two-pass spec
    "primal_alpha": {"divergence": "alpha", "primal": True, "alpha": 1.5},  # fk.primal_loss
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_hidden_weight(case, backend):
    opts = dict(LOSS_CASES[case])
    use_ref = opts.pop("use_ref", False)
    fn = fk.primal_loss if opts.pop("primal", False) else fk.loss
    hidden, weight, labels, ref = _inputs()
    _grad(hidden, weight)

    def step(h, w, y, r):
        out = fn(h, w, y, **({"ref_logp": r if use_ref else None} if fn is fk.loss else {}), backend=backend, **opts)
        return out.loss, out.reward

    _assert_same(step, (hidden, weight, labels, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_loss_other_dtypes(dtype):
    """bf16 (fp32 statistics, bf16 gradients) and float64 (the torch reference computes it)."""
    hidden, weight, labels, ref = _inputs(seed=14)
    hidden, weight = (t.to(dtype).requires_grad_() for t in (hidden, weight))

    def step(h, w, y, r):
        out = fk.loss(h, w, y, divergence="js", ref_logp=r, beta=0.5)
        return out.loss, out.logp

    _assert_same(step, (hidden, weight, labels, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_stats_outputs_used_in_another_loss(backend):
    """Gradients of ``out.logp`` / ``out.lse`` / ``out.entropy`` (fused_loss_backward) and a bias."""
    hidden, weight, labels, ref = _inputs(seed=1)
    bias = torch.randn(V) * 0.1
    _grad(hidden, weight, bias)

    def step(h, w, y, r, b):
        out = fk.loss(h, w, y, bias=b, divergence="kl", ref_logp=r, beta=0.3, backend=backend, return_entropy=True)
        return out.loss, out.logp.sum() - 0.1 * out.lse.pow(2).mean() + 0.5 * out.entropy.sum()

    _assert_same(step, (hidden, weight, labels, ref, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_with_cross_entropy_options(backend):
    """Class weights and label smoothing through the op (and its two-pass twin): the same as eager."""
    hidden, weight, labels, ref = _inputs(seed=3)
    bias = torch.randn(V) * 0.1
    cw = torch.rand(V, generator=torch.Generator().manual_seed(4))
    _grad(hidden, weight, bias)

    def step(h, w, y, r, b):
        return fk.loss(h, w, y, bias=b, backend=backend, label_smoothing=0.1, class_weight=cw).loss

    _assert_same(step, (hidden, weight, labels, ref, bias))


def test_loss_from_logits():
    hidden, weight, labels, ref = _inputs(seed=2)
    logits = (hidden @ weight.T).requires_grad_()

    def step(z, y, r):
        return fk.loss(logits=z, labels=y, divergence="js", ref_logp=r, beta=0.7).loss

    _assert_same(step, (logits, labels, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_and_sequence_logp(backend):
    hidden, weight, labels, _ = _inputs(seed=3)
    _grad(hidden, weight)

    def step(h, w, y):
        logp, lse, ent = fk.token_stats(h, w, y, backend=backend, return_entropy=True)
        seq = fk.sequence_logp(h, w, y, backend=backend)
        return logp, lse, ent, seq.sum, seq.mean

    _assert_same(step, (hidden, weight, labels))


def test_token_stats_no_grad():
    hidden, weight, labels, _ = _inputs(seed=4)

    @torch.no_grad()
    def stats(h, w, y):
        return fk.token_stats(h, w, y, backend="torch")[0], fk.loss(h, w, y, divergence="kl").loss

    _assert_same(stats, (hidden, weight, labels))


# --- fk.nn modules -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_fused_linear_fdiv_loss(backend):
    hidden, weight, labels, ref = _inputs(seed=5)
    _grad(hidden, weight)
    mod = fk.nn.FusedLinearFDivLoss(divergence="squared_hellinger", beta=0.2, shift_labels=True, backend=backend)
    _assert_same(lambda h, w, y, r: mod(h, w, y, ref_logp=r), (hidden, weight, labels, ref))


def test_nn_fdiv_loss_from_logits():
    hidden, weight, labels, _ = _inputs(seed=6)
    logits = (hidden @ weight.T).requires_grad_()
    mod = fk.nn.FDivLoss(divergence="reverse_kl", level="sequence", beta=0.5)
    _assert_same(lambda z, y: mod(z, y), (logits, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_fused_linear_dpo_loss(backend):
    hidden, weight, labels, _ = _inputs(rows=4, seed=7)
    ref = -torch.rand(4) * 10
    _grad(hidden, weight)
    mod = fk.nn.FusedLinearDPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.1, backend=backend)

    def step(h, w, y, r):
        out = mod(h, w, y, ref_logp=r, return_output=True)
        return out.loss, out.chosen_rewards, out.margin

    _assert_same(step, (hidden, weight, labels, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_fused_linear_dpo_combination_with_the_nll_term(backend):
    """A spec of several loss types (a tuple crossing the op as its string) and the sft term."""
    hidden, weight, labels, _ = _inputs(rows=4, seed=9)
    ref = -torch.rand(4) * 10
    _grad(hidden, weight)
    mod = fk.nn.FusedLinearDPOLoss(beta=0.1, loss_type=["sigmoid", "apo_down", "sft"], loss_weights=[1.0, 0.5, 0.3],
                                   backend=backend)
    _assert_same(lambda h, w, y, r: mod(h, w, y, ref_logp=r), (hidden, weight, labels, ref))


# --- inductor and the data checks ---------------------------------------------------------------

def test_inductor_kl_token():
    """The real compiler (C++ codegen on CPU) around the custom op: same values and gradients.
    Its on-disk caches are off: they key a graph by its ops' names, not by the ops' Python
    backward, so a graph cached by an older version of this package would be reused."""
    hidden, weight, labels, ref = _inputs(seed=8)
    _grad(hidden, weight)

    def step(h, w, y, r):
        out = fk.loss(h, w, y, divergence="kl", ref_logp=r, beta=0.5, backend="torch")
        return out.loss, out.reward

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _assert_same(step, (hidden, weight, labels, ref), compile_backend="inductor",
                     tol={"atol": 1e-5, "rtol": 1e-5})


@pytest.mark.parametrize("path", ["hidden", "logits", "two_pass"])
def test_nan_reference_raises_under_compile(path):
    hidden, weight, labels, ref = _inputs(seed=9)
    ref[1, 4] = float("nan")
    _grad(hidden, weight)

    def step(h, w, y, r):
        if path == "logits":
            return fk.loss(logits=h @ w.T, labels=y, divergence="kl", ref_logp=r).loss
        return fk.loss(h, w, y, divergence="kl", ref_logp=r, backend="torch",
                       reduction="none" if path == "two_pass" else "mean").loss.sum()

    with pytest.raises(ValueError, match=r"ref_logp is nan at supervised position \(1, 4\)"):
        step(hidden, weight, labels, ref)
    with pytest.raises(ValueError, match=r"ref_logp is nan at supervised position \(1, 4\)"):
        torch.compile(step, fullgraph=True, backend="eager")(hidden, weight, labels, ref)


@pytest.mark.parametrize("entry", ["loss", "logits", "token_stats", "dpo"])
def test_bad_label_raises_under_compile(entry):
    hidden, weight, labels, _ = _inputs(seed=10)
    labels[2, 5] = V + 3

    def step(h, w, y):
        if entry == "loss":
            return fk.loss(h, w, y, backend="torch").loss
        if entry == "logits":
            return fk.loss(logits=h @ w.T, labels=y).loss
        if entry == "token_stats":
            return fk.token_stats(h, w, y, backend="torch")[0]
        return fk.nn.FusedLinearDPOLoss(loss_type="simpo", backend="torch")(h, w, y)

    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\).*found {V + 3} at position \(2, 5\)"):
        torch.compile(step, fullgraph=True, backend="eager")(hidden.requires_grad_(), weight, labels)


def test_nan_dpo_reference_raises_under_compile():
    hidden, weight, labels, _ = _inputs(rows=4, seed=11)
    ref = torch.tensor([-1.0, float("nan"), -2.0, -3.0])
    mod = fk.nn.FusedLinearDPOLoss(backend="torch")
    with pytest.raises(ValueError, match=r"ref_logp is nan for row 1 \(a row with supervised tokens"):
        torch.compile(lambda h, w, y, r: mod(h, w, y, ref_logp=r), fullgraph=True,
                      backend="eager")(hidden.requires_grad_(), weight, labels, ref)


# --- the op layer itself -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [FDivSpec("kl", beta=0.25, level="sequence", values="detach", z_loss=1e-3),
                                  PrimalSpec("js", alpha=2.0, reduction="sum"),
                                  DPOSpec(loss_type="ipo", beta=0.3, divergence="js"),
                                  DPOSpec(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0),
                                          nll_tokens=12.5, discopop_tau=0.3),
                                  fk.cpo_spec("simpo", alpha=0.25), fk.KTOSpec(desirable=(True, False, True))])
def test_spec_round_trip(spec):
    assert compiled.decode_spec(compiled.encode_spec(spec)) == spec


def test_unregistered_divergence_is_refused():
    import dataclasses
    div = dataclasses.replace(fk.get_divergence("js"))  # equal fields, not the registry's object
    with pytest.raises(ValueError, match="is not a registered entry"):
        compiled.encode_spec(FDivSpec(div))


def test_opcheck_ops():
    """torch.library.opcheck: schema, fake (meta) shapes and dtypes, autograd registration."""
    hidden, weight, labels, ref = _inputs(rows=2, t=5, seed=12)
    _grad(hidden, weight)
    ref_tok = torch.where(labels != -100, ref, 0.0).requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    # fused_loss(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend, ignore_index,
    #            return_entropy, need_h, need_w, need_b, need_ref_tok, need_ref_seq)
    args = (hidden, weight, None, labels, ref_tok, None, compiled.encode_spec(FDivSpec("kl", beta=0.5)), None, 1.0,
            "torch", -100, True, True, True, False, True, False)
    torch.library.opcheck(compiled.fused_loss_op, args, test_utils=utils)
    torch.library.opcheck(compiled.fused_loss_op, args[:2] + (torch.randn(V),) + args[3:11] + (False,) + args[12:],
                          test_utils=utils)  # a bias, no entropy
    seq = compiled.encode_spec(FDivSpec("js", level="sequence", beta=0.5))
    torch.library.opcheck(compiled.fused_loss_op, args[:4] + (torch.zeros(()), -torch.rand(2).requires_grad_(), seq)
                          + args[7:15] + (False, True), test_utils=utils)  # a per-row reference
    smooth = compiled.encode_spec(FDivSpec("sft", label_smoothing=0.1))
    torch.library.opcheck(compiled.fused_loss_op, args[:2] + (torch.randn(V),) + args[3:6] + (smooth,) + args[7:]
                          + (torch.rand(V),), test_utils=utils)  # class weights, label smoothing
    torch.library.opcheck(compiled.token_stats_op, (hidden, weight, None, labels, None, 1.0, "torch", -100, True),
                          test_utils=utils)
    logp, lse = (torch.randn(2, 5, requires_grad=True) for _ in range(2))
    torch.library.opcheck(compiled.check_token_stats_op, (logp, lse, torch.empty(0), labels, None, 1.0),
                          test_utils=utils)
    torch.library.opcheck(compiled.check_labels_op, (labels, V, -100), test_utils=utils)


def test_new_sequence_length_and_changed_option():
    """A new T recompiles once with dynamic shapes; a changed float option recompiles when torch
    specialises floats (``specialize_float=True``, the documented setting for option schedules)."""
    mod = fk.nn.FusedLinearFDivLoss(divergence="kl", beta=0.3, backend="torch")
    with torch._dynamo.config.patch(specialize_float=True):
        step = torch.compile(lambda h, w, y: mod(h, w, y), fullgraph=True, backend="eager")
        for t, beta in ((5, 0.3), (7, 0.3), (9, 0.6)):
            hidden, weight, labels, _ = _inputs(t=t, seed=t)
            mod.beta = beta
            torch.testing.assert_close(step(hidden, weight, labels), mod(hidden, weight, labels), **TOL)


# --- fk.distill_loss ---------------------------------------------------------------------------

DISTILL_CASES = {
    "js_teacher_head": {"divergence": "js", "beta": 0.3, "hard_label_weight": 0.5, "temperature": 1.5},
    "pearson_teacher_logits": {"divergence": "pearson", "logits": True},
    "alpha_reduction_none": {"divergence": "alpha", "alpha": 1.5, "reduction": "none"},  # backward op
}


@pytest.mark.parametrize("case", sorted(DISTILL_CASES))
def test_distill_loss(case):
    opts = dict(DISTILL_CASES[case])
    from_logits = opts.pop("logits", False)
    hidden, weight, labels, _ = _inputs(seed=9)
    g = torch.Generator().manual_seed(10)
    t_hidden, t_weight = torch.randn(*labels.shape, 24, generator=g), torch.randn(V, 24, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    _grad(hidden, weight, bias)

    def step(h, w, y, b, th, tw):
        teacher = {"teacher_logits": th @ tw.T} if from_logits else {"teacher_hidden": th, "teacher_weight": tw}
        out = fk.distill_loss(h, w, y, bias=b, backend="torch", **teacher, **opts)
        return out.loss, out.divergence_loss

    _assert_same(step, (hidden, weight, labels, bias, t_hidden, t_weight))

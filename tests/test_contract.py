"""One contract for every backend: the float64 oracle of tests/oracle.py, one input builder.

Parametrized over every backend (``torch``; ``cpu`` when the C++ extension builds; ``triton``
under ``TRITON_INTERPRET=1`` on CPU tensors, or compiled on a GPU; ``cuda`` on a GPU; each
skipped with its reason otherwise), both loss paths (``single``: the one-pass fused function of
``fdiv_kernels/autograd/fused.py``; ``two``: ``fused.two_pass()``, token statistics + the spec on the
whole batch with the backend's recompute kernels) and fp32/bf16 inputs:

* ``fk.token_stats`` values and the gradients of a random linear functional of
  ``(logp, lse, entropy)`` w.r.t. hidden, weight and bias, for a plain head, a biased
  soft-capped tempered head and a vocabulary with ``-inf``-masked columns;
* ``fk.loss`` values and gradients for every divergence x level (values modes, z-loss,
  reductions, length normalisation, per-row references and primal forms cycled over the cases);
* DPO through ``fk.nn.FusedLinearDPOLoss`` for every loss type, TRL's weighted combinations (with
  the sft NLL term), CPO and ORPO, against TRL's formulas; KTO through ``fk.nn.FusedLinearKTOLoss``.

The oracle is evaluated in float64 from the very inputs the backend sees (a bf16 case is
checked against the exact math of its bf16-rounded inputs). Tolerances, with
``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` per tensor (oracle.assert_close):

* fp32 values and gradients: ``rtol = atol = 1e-5`` (token-statistics gradients ``rtol 1e-4``).
  The logits are O(1) (|z| < 10), H = 16: one float32 GEMM and an online log-sum-exp err by a
  few ``eps32 * |z| ~ 1e-6``; the margin covers reductions over ~30 tokens. Gradients of the
  token functional add the coefficients' spread (N(0,1) weights), hence ``rtol 1e-4``.
* bf16 values: ``1e-4``: every backend accumulates the bf16 GEMM in float32 and works in
  float32 after it, so values carry float32 (not bf16) error; the margin is for bf16 logits
  being larger sums of rounded products.
* bf16 gradients: ``rtol 2e-2, atol 5e-3``: they are returned in bf16 (one rounding, 2^-8 =
  3.9e-3 relative) and the triton/cuda paths round the coefficient ``dL/dz`` to bf16 before the
  two gradient GEMMs (a sum of H or N rounded products), as the backend tests state.

Kept small (one shape per backend, the interpreter's smaller): tests/test_properties.py
covers breadth, the backend test modules each backend's own corners.
"""

from __future__ import annotations

import contextlib
import zlib

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.autograd import fused
from fdiv_kernels.kernels import triton_backend

NAMES = sorted(fk.DIVERGENCES)
LEVELS = ("token", "sequence")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VALUE_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 1e-4, "atol": 1e-4}}
GRAD_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 5e-3}}
STATS_GRAD_TOL = {"fp32": {"rtol": 1e-4, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 5e-3}}


def _backend_params():
    """``(backend, device)`` for each backend, skipped with the registry's reason where it cannot run."""
    cpu = fk.available_backends("cpu")
    cuda = fk.available_backends("cuda") if torch.cuda.is_available() else {}
    out = []
    for name in ("torch", "cpu"):
        reason = cpu.get(name, "not registered")
        out.append(pytest.param(name, "cpu", id=name,
                                marks=pytest.mark.skipif(reason != "available", reason=f"{name}: {reason}")))
    if triton_backend.interpret_mode():
        reason, device = cpu.get("triton", "not registered"), "cpu"
    else:
        reason, device = (cuda.get("triton", "not registered") if cuda else "no CUDA device"), "cuda"
    out.append(pytest.param("triton", device, id="triton",
                            marks=pytest.mark.skipif(reason != "available", reason=f"triton: {reason}")))
    reason = cuda.get("cuda", "not registered") if cuda else "no CUDA device"
    out.append(pytest.param("cuda", "cuda", id="cuda",
                            marks=pytest.mark.skipif(reason != "available", reason=f"cuda: {reason}")))
    return out


BACKENDS = _backend_params()


def _shape(backend, device):
    """One batch shape per backend: the Triton interpreter is slow, so it gets a smaller one."""
    if backend == "triton" and device == "cpu":
        return {"lead": (3,), "t": 5, "h": 8, "v": 19}
    return {"lead": (3,), "t": 8, "h": 16, "v": 37}


@contextlib.contextmanager
def _path(path, monkeypatch):
    """Run the block on the ``single`` or ``two`` pass path and check that it took that path."""
    calls = []
    orig = fused.FusedLossFunction.apply

    def spy(*args):
        calls.append(1)
        return orig(*args)

    monkeypatch.setattr(fused.FusedLossFunction, "apply", spy)
    with fk.config(single_pass=(path != "two")):
        yield
    assert bool(calls) == (path == "single"), f"the {path}-pass path was not taken"


# ---------------------------------------------------------------------------------------------
# token_stats
# ---------------------------------------------------------------------------------------------

HEADS = {
    "plain": {"build": {}, "softcap": None, "temperature": 1.0},
    "bias-softcap-temp": {"build": {"bias": True}, "softcap": 5.0, "temperature": 0.7},
    "masked": {"build": {"mask": (0, 3, 7)}, "softcap": None, "temperature": 1.3},
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("head", HEADS)
def test_token_stats_contract(backend, device, dt, head):
    cfg = HEADS[head]
    x = oracle.make_inputs(**_shape(backend, device), **cfg["build"], dtype=DTYPES[dt], seed=1, ignore_frac=0.25,
                           keep_first=2, edge_labels=True, device=device)
    h, w, b = x.leaves()
    out = fk.token_stats(h, w, x.labels, bias=b, softcap=cfg["softcap"], temperature=cfg["temperature"],
                         return_entropy=True, backend=backend)
    grads = torch.autograd.grad(oracle.functional(out, x.coef), [t for t in (h, w, b) if t is not None])
    r = oracle.leaves64(x.hidden, x.weight, x.bias)
    want = oracle.token_stats(r[0], r[1], x.labels, r[2], cfg["softcap"], cfg["temperature"])
    want_grads = torch.autograd.grad(oracle.functional(want, x.coef), [t for t in r if t is not None])
    for name in ("logp", "lse", "entropy"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, name
        oracle.assert_close(got, getattr(want, name), **VALUE_TOL[dt], what=name)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert a.dtype == DTYPES[dt], name
        oracle.assert_close(a, e, **STATS_GRAD_TOL[dt], what=f"d/d{name}")
    if x.bias is not None and x.masked.any():
        assert (grads[1][x.masked.to(device)] == 0).all() and (grads[2][x.masked.to(device)] == 0).all()


# ---------------------------------------------------------------------------------------------
# fk.loss
# ---------------------------------------------------------------------------------------------

def _loss_cases():
    """Every divergence x level; the other options cycled so that each appears on every backend."""
    cases = []
    for i, (d, lv) in enumerate((d, lv) for d in NAMES for lv in LEVELS):
        kw = {"divergence": d, "level": lv, "values": ("drop", "detach", "free")[i % 3],
                  "reduction": ("mean", "sum")[i // 3 % 2], "z_loss": 0.01 if i % 4 == 1 else 0.0}
        if lv == "sequence" and i % 5 == 1:
            kw["length_normalize"] = True
        if lv == "sequence" and i % 5 == 3:
            kw["ref"] = "row"
        cases.append(kw)
    cases += [{"divergence": "js", "reduction": "none"}, {"divergence": "kl", "level": "sequence", "reduction": "none"},
              {"divergence": "pearson", "form": "primal"}, {"divergence": "alpha", "form": "primal", "reduction": "sum"}]
    return cases


LOSS_CASES = _loss_cases()


def _case_id(kw):
    return "-".join(str(v) for v in kw.values())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("path", ["single", "two"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", LOSS_CASES, ids=_case_id)
def test_loss_contract(backend, device, path, dt, kw, monkeypatch):
    kw = dict(kw)
    ref_mode = kw.pop("ref", "token")
    x = oracle.make_inputs(**_shape(backend, device), dtype=DTYPES[dt], bias=True, bias_scale=0.1,
                           seed=zlib.crc32(_case_id(kw).encode()) % 1000, ignore_prefix=2, ignore_frac=0.15,
                           device=device)
    head = {"softcap": 6.0, "temperature": 0.9}
    if kw.get("form") == "primal":
        ref = None
    else:
        ref = x.ref_per_row() if ref_mode == "row" else x.ref
        kw.update(ref_logp=ref, beta=0.7)
    lme_with_linear_terms = kw.get("form") != "primal" and oracle.canonical(kw["divergence"]) in oracle.LOG_MEAN_EXP \
        and (kw.get("values") == "free" or kw.get("z_loss"))
    single_pass_spec = kw.get("reduction") != "none" and not lme_with_linear_terms  # else fk takes the two-pass path
    h, w, b = x.leaves()
    with _path(path if single_pass_spec else "two", monkeypatch):
        if kw.get("form") == "primal":
            fk_kw = {k: v for k, v in kw.items() if k != "form"}
            out = fk.primal_loss(h, w, x.labels, bias=b, backend=backend, **head, **fk_kw)
        else:
            out = fk.loss(h, w, x.labels, bias=b, backend=backend, **head, **kw)
        total = out.loss.sum()
        grads = torch.autograd.grad(total, (h, w, b))
    r = oracle.leaves64(x.hidden, x.weight, x.bias)
    want = oracle.fdiv_loss(oracle.token_stats(r[0], r[1], x.labels, r[2], **head), x.labels, **kw)
    want_grads = torch.autograd.grad(want.sum(), r)
    assert out.loss.dtype == torch.float32 and out.loss.shape == want.shape
    oracle.assert_close(out.loss, want, **VALUE_TOL[dt], what="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        oracle.assert_close(a, e, **GRAD_TOL[dt], what=f"d/d{name}")


# ---------------------------------------------------------------------------------------------
# DPO through fk.nn.FusedLinearDPOLoss
# ---------------------------------------------------------------------------------------------

#: every loss type, TRL's combinations (MPO; aot with the sft term), CPO and ORPO through their specs
DPO_CASES = {**{k: {"loss_type": k} for k in fk.DPO_LOSS_TYPES},
             "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
             "aot+sft": {"loss_type": ["aot", "sft"], "loss_weights": [1.0, 0.5]},
             "cpo": {"spec": fk.cpo_spec("sigmoid", beta=0.2, label_smoothing=0.1)},
             "orpo": {"spec": fk.orpo_spec(beta=0.2)}}


def _dpo_module(case, backend):
    opts = dict(DPO_CASES[case])
    if "spec" in opts:
        return fk.nn.FusedLinearDPOLoss(spec=opts["spec"], backend=backend), opts["spec"]
    kinds = [opts["loss_type"]] if isinstance(opts["loss_type"], str) else opts["loss_type"]
    for k in kinds:
        opts.update({key: v for key, v in oracle.dpo_kind_options(k).items() if v})
    opts["beta"] = 0.2
    mod = fk.nn.FusedLinearDPOLoss(backend=backend, **opts)
    return mod, mod.spec


def _dpo_oracle_kw(spec):
    """The oracle's arguments for a spec (its loss types, weights and options)."""
    kinds = [t for t, _ in spec.components]
    return dict(kind=kinds, loss_weights=[w for _, w in spec.components], beta=spec.beta,
                label_smoothing=spec.label_smoothing, gamma=spec.gamma, discopop_tau=spec.discopop_tau,
                length_normalize=spec.length_normalize if len(kinds) > 1 else None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("path", ["single", "two"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", DPO_CASES)
def test_dpo_contract(backend, device, path, dt, case, monkeypatch):
    shape = dict(_shape(backend, device), lead=(4,))  # 2 pairs: chosen rows 0-1, rejected rows 2-3
    x = oracle.make_inputs(**shape, dtype=DTYPES[dt], seed=11 + len(case), ignore_prefix=2, ignore_at=((1, -1),),
                           ref_scale=None, weight_scale=0.5, device=device)
    mod, spec = _dpo_module(case, backend)
    ref = (-torch.rand(4, generator=torch.Generator().manual_seed(5)) * 10).to(device) if spec.needs_reference else None
    kinds = [t for t, _ in spec.components]
    if len(kinds) == 1:
        assert mod.length_normalize == (kinds[0] in oracle.MEAN_LOGP_KINDS)  # TRL's convention
    h, w, _ = x.leaves(bias=False)
    with _path(path, monkeypatch):
        out = mod(h, w, x.labels, ref_logp=ref, return_output=True)
        grads = torch.autograd.grad(out.loss, (h, w))
    r = oracle.leaves64(x.hidden, x.weight)
    want, want_losses = oracle.dpo_pair_loss(oracle.token_stats(r[0], r[1], x.labels), x.labels, ref,
                                             **_dpo_oracle_kw(spec))
    want_grads = torch.autograd.grad(want, r)
    oracle.assert_close(out.loss, want, **VALUE_TOL[dt], what="loss")
    oracle.assert_close(out.losses, want_losses, **VALUE_TOL[dt], what="losses")
    for name, a, e in zip(("hidden", "weight"), grads, want_grads):
        oracle.assert_close(a, e, **GRAD_TOL[dt], what=f"d/d{name}")


# ---------------------------------------------------------------------------------------------
# KTO through fk.nn.FusedLinearKTOLoss
# ---------------------------------------------------------------------------------------------

KTO_CASES = {"kto": {}, "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.3},
             "kto+sft": {"loss_type": ["kto", "sft"], "loss_weights": [1.0, 0.5], "undesirable_weight": 0.7}}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("path", ["single", "two"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", KTO_CASES)
def test_kto_contract(backend, device, path, dt, case, monkeypatch):
    shape = dict(_shape(backend, device), lead=(5,))
    x = oracle.make_inputs(**shape, dtype=DTYPES[dt], seed=3, ignore_prefix=2, ref_scale=None, weight_scale=0.5,
                           device=device)
    desirable = torch.tensor([True, False, True, True, False], device=device)
    ref = (-torch.rand(5, generator=torch.Generator().manual_seed(6)) * 10).to(device)
    mod = fk.nn.FusedLinearKTOLoss(beta=0.5, backend=backend, **KTO_CASES[case])
    h, w, _ = x.leaves(bias=False)
    with _path(path, monkeypatch):
        out = mod(h, w, x.labels, desirable, ref_logp=ref, kl=0.4, return_output=True)
        grads = torch.autograd.grad(out.loss, (h, w))
    r = oracle.leaves64(x.hidden, x.weight)
    st = oracle.token_stats(r[0], r[1], x.labels)
    s, _, n = oracle.sequence_logp(st, x.labels)
    spec = mod.spec
    kind = [t for t, _ in spec.components if t != "sft"][0]
    want_losses = oracle.kto_losses(kind, s, ref.double(), desirable, beta=0.5, kl=0.4,
                                    desirable_weight=spec.desirable_weight, undesirable_weight=spec.undesirable_weight)
    if "sft" in dict(spec.components):
        want_losses = want_losses + dict(spec.components)["sft"] * -s[desirable].sum() / n[desirable].sum()
    want = want_losses.mean()
    want_grads = torch.autograd.grad(want, r)
    oracle.assert_close(out.loss, want, **VALUE_TOL[dt], what="loss")
    oracle.assert_close(out.losses, want_losses, **VALUE_TOL[dt], what="losses")
    for name, a, e in zip(("hidden", "weight"), grads, want_grads):
        oracle.assert_close(a, e, **GRAD_TOL[dt], what=f"d/d{name}")

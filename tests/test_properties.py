"""Property-based contract test (issue 16): every input class a real run can produce gives
finite values and gradients or a clear ``ValueError``/``TypeError``, and the same answer on every
backend.

Drawn (hypothesis): shapes (empty rows, one token, 1-D/2-D/3-D labels), dtypes, logit scales up
to 1e4 with ties, -inf masks through the bias (some / leading / all columns, a label on a masked
column), ignored positions, temperatures, soft-caps, references (near, far, -inf, +inf, NaN at
a supervised or an ignored position, per row), every divergence x level x values x reduction,
primal forms, z-loss, entropy, the API (``fk.loss`` from hidden or from logits,
``fk.token_stats``, ``fk.sequence_logp``) and the gradient mode (all inputs, hidden only,
``torch.no_grad``, detached inputs: the single-pass and the two-pass paths); DPO kinds x
f-divergences x label smoothing on extreme, -inf and NaN log-probs, directly and fused
(``fk.nn.FusedLinearDPOLoss``).

Checked: the outcome is an error exactly where docs/math.md's contract table says (naming the
argument), finite values and gradients otherwise; every backend (torch, cpu; triton under the
interpreter in its own, smaller test) and a float64 evaluation agree to

    (1e-5 + 8 eps32 max|z| (1 + beta)) * max|reference|

per tensor: 1e-5 relative where the logits are O(1) (the issue's bound) plus the float32
resolution of logits of size ``max|z|`` (one ulp of a logit moves a log-prob by that much, and
the reward ``beta * logp`` by ``beta`` times that; no float32 implementation does better).
16-bit inputs add two ulps of their dtype (gradients are returned in it; eight for triton, which
also rounds its coefficient to it).

Profiles: ``ci`` (default: derandomized, fixed example counts, a wall-clock budget so that the
three tests stay near 2 minutes on a loaded 2-core machine) and ``long``
(``FDIV_HYPOTHESIS_PROFILE=long``: 20x the examples, random seeds, no budget).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import oracle
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

import fdiv_kernels as fk  # noqa: E402
from fdiv_kernels.kernels import triton_backend  # noqa: E402
from fdiv_kernels import TRL_F_DIVERGENCES  # noqa: E402

PROFILE = os.environ.get("FDIV_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"FDIV_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"
#: wall-clock seconds per test in the ci profile; examples past it pass without running (the
#: drawn sequence is fixed, so a slower machine checks a prefix of the same examples)
BUDGET_S = {"loss": 60.0, "dpo": 20.0, "triton": 40.0}
EPS32 = torch.finfo(torch.float32).eps
IGNORE = -100
UNBOUNDED = ("tv", "reverse_kl", "neyman")  # phi(u) -> inf as u -> inf
LME = ("kl", "squared_hellinger")
PRIMAL = ("kl", "tv", "pearson", "squared_hellinger", "js", "alpha")
ARGUMENT_NAMES = ("labels", "ref_logp", "bias", "hidden", "weight", "logits", "softcap", "temperature", "beta",
                  "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def _settings(examples: int):
    if LONG:
        return settings(max_examples=20 * examples, deadline=None, derandomize=False, database=None,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


class Budget:
    """Wall-clock guard of one test in the ci profile (see BUDGET_S)."""

    def __init__(self, name: str):
        self.limit = math.inf if LONG else BUDGET_S[name]
        self.start: Optional[float] = None
        self.ran = 0

    def spent(self) -> bool:
        if self.start is None:
            self.start = time.monotonic()
        if time.monotonic() - self.start > self.limit:
            return True
        self.ran += 1
        return False


def _cpu_backends():
    avail = fk.available_backends("cpu")
    return tuple(b for b in ("torch", "cpu") if avail.get(b) == "available")


# ---------------------------------------------------------------------------------------------
# One drawn case of fk.loss / fk.token_stats / fk.sequence_logp
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    api: str
    lead: Tuple[int, ...]
    t: int
    h: int
    v: int
    dtype: torch.dtype
    scale: float
    ties: bool
    bias: bool
    mask: str            # none | some | leading | all | label
    ignore: str          # none | some | all
    temperature: float
    softcap: Optional[float]
    ref: str             # none | near | far | neginf | posinf | nan | nan_ignored | row
    divergence: str
    form: str
    level: str
    values: str
    reduction: str
    z_loss: float
    length_normalize: bool
    beta: float
    grad: str            # all | hidden | no_grad | detached
    entropy: str         # off | out | loss
    logp_in_loss: bool
    seed: int


def _loss_call(c, ref):
    """``fk.primal_loss`` (a per-token loss of log p_y: no reference, token level) or ``fk.loss``,
    and the keywords of case ``c``."""
    if c.form == "primal":
        return fk.primal_loss, dict(divergence=c.divergence, reduction=c.reduction, z_loss=c.z_loss)
    return fk.loss, dict(divergence=c.divergence, ref_logp=ref, beta=c.beta, level=c.level, reduction=c.reduction,
                         values=c.values, z_loss=c.z_loss, length_normalize=c.length_normalize)


@st.composite
def cases(draw, *, small: bool = False, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    api = draw(st.sampled_from(("loss", "loss", "loss", "logits", "token_stats", "sequence_logp")))
    lead = draw(st.sampled_from(((), (1,), (2,), (3,), (2, 2)) if not small else ((), (1,), (2,))))
    t = draw(st.sampled_from((0, 1, 2, 3, 6) if not small else (0, 1, 3)))
    h = draw(st.sampled_from((1, 4, 8)))
    v = draw(st.sampled_from((1, 2, 7, 33) if not small else (1, 5, 37)))
    dtype = draw(st.sampled_from(dtypes))
    low = dtype in (torch.float16, torch.bfloat16)
    scale = draw(st.sampled_from((1.0, 30.0) if dtype == torch.float16 else (1.0, 30.0, 1e3, 1e4)))
    form = draw(st.sampled_from(("variational", "variational", "primal")))
    if form == "primal":
        divergence = draw(st.sampled_from(PRIMAL))
        level, values, beta, ref, length_normalize = "token", "drop", 1.0, "none", False
    else:
        divergence = draw(st.sampled_from(tuple(fk.DIVERGENCES)))
        level = draw(st.sampled_from(("token", "sequence")))
        values = draw(st.sampled_from(("drop", "detach", "free")))
        beta = draw(st.sampled_from((0.1, 1.0, 10.0) if dtype == torch.float16 else (0.1, 1.0, 10.0, 1e3)))
        ref = draw(st.sampled_from(("none", "near", "far", "neginf", "posinf", "nan", "nan_ignored")
                                   + (("row",) if level == "sequence" else ())))
        length_normalize = level == "sequence" and draw(st.booleans())
    if api == "logits":
        bias, temperature, softcap = draw(st.booleans()), 1.0, None
    else:
        bias = draw(st.booleans())
        temperature = draw(st.sampled_from((1.0, 1.0, 0.7, 2.0, 1e-3)))
        softcap = draw(st.sampled_from((None, None, 30.0, 5.0, 1e4)))
    mask = draw(st.sampled_from(("none", "none", "some", "leading", "all", "label"))) if bias else "none"
    z_loss = draw(st.sampled_from((0.0, 0.0, 1e-2)))
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    if reduction == "none" and (values == "free" or z_loss > 0):
        reduction = "mean"
    return Case(
        api=api, lead=lead, t=t, h=h, v=v, dtype=dtype, scale=scale, ties=draw(st.booleans()), bias=bias,
        mask=mask, ignore=draw(st.sampled_from(("none", "some", "some", "all"))), temperature=temperature,
        softcap=softcap, ref=ref, divergence=divergence, form=form, level=level, values=values,
        reduction=reduction, z_loss=z_loss, length_normalize=length_normalize, beta=beta,
        grad=draw(st.sampled_from(("all", "all", "hidden", "no_grad", "detached"))),
        entropy=draw(st.sampled_from(("off", "off", "out", "loss"))) if api in ("loss", "token_stats") else "off",
        logp_in_loss=api == "loss" and not low and draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    ref: Optional[torch.Tensor]
    masked: torch.Tensor  # [V] bool


def make_inputs(c: Case) -> Inputs:
    """The suite's builder (tests/oracle.py) for the drawn shape, scale, mask and ignored
    fraction, then the case's edges: tied logits, a label on a masked column, special references."""
    g = torch.Generator().manual_seed(c.seed + 1)  # the masked columns and ties (the builder has its own)
    masked = torch.zeros(c.v, dtype=torch.bool)
    if c.mask == "some" and c.v > 1:
        masked[torch.randperm(c.v, generator=g)[: c.v // 2]] = True
    elif c.mask == "leading" and c.v > 1:
        masked[: max(1, c.v - 2)] = True
    elif c.mask in ("all",):
        masked[:] = True
    elif c.mask == "label" and c.v > 1:
        masked[0] = True
    x = oracle.make_inputs(c.lead, c.t, c.h, c.v, dtype=torch.float64, seed=c.seed, scale=c.scale / math.sqrt(c.h),
                           weight_scale=1.0, bias=c.bias, bias_scale=1.0, mask=tuple(masked.nonzero()[:, 0].tolist()),
                           ignore_frac={"none": 0.0, "some": 0.4, "all": 1.0}[c.ignore],
                           ref_scale=None if c.ref == "none" else (1e4 if c.ref == "far" else 3.0))
    weight, labels = x.weight, x.labels
    if c.ties:  # equal logits: every row of W the same
        weight[1:] = weight[:1]
    sup = labels != IGNORE
    if c.mask == "label" and c.v > 1 and bool(sup.any()):
        labels[_first(sup)] = 0  # a supervised label on the masked column
    ref = None if x.ref is None else x.ref.double()
    if ref is not None:
        if c.ref == "neginf" and bool(sup.any()):
            ref[_first(sup)] = -math.inf
        if c.ref == "nan" and bool(sup.any()):
            ref[_first(sup)] = math.nan
        if c.ref == "posinf" and bool(sup.any()):
            ref[_first(sup)] = math.inf
        if c.ref == "nan_ignored" and bool((~sup).any()):
            ref[_first(~sup)] = math.nan
        if c.ref == "row":
            ref = ref.sum(-1)
    cast = lambda t: None if t is None else t.to(c.dtype)  # noqa: E731
    bias = None if not c.bias else x.bias
    return Inputs(cast(x.hidden), cast(weight), cast(bias), labels, None if ref is None else ref.float(), x.masked)


def _first(m: torch.Tensor):
    return tuple(int(i) for i in m.nonzero()[0])


def expected_error(c: Case, x: Inputs) -> Optional[Tuple[str, ...]]:
    """Substrings one of which the error must contain (one per cause present: any cause may be
    the one reported), or None where the contract is a value."""
    sup = x.labels != IGNORE
    if not bool(sup.any()):
        return None
    causes = []
    masking = c.softcap is None  # cap(-inf) = -softcap: with a soft-cap a -inf bias does not mask
    if masking and bool(x.masked.all()):
        causes.append("bias")
    if masking and c.mask == "label" and c.v > 1:
        causes.append("labels")
    if c.api in ("loss", "logits") and x.ref is not None:
        div = fk.get_divergence(c.divergence).name
        if c.ref in ("nan", "posinf"):
            causes.append("ref_logp")
        if c.ref == "neginf" and div in UNBOUNDED:
            causes.append("ref_logp")
        if c.ref == "neginf" and div in LME and c.reduction != "none":
            units = sup.reshape(-1, c.t).any(1) if c.level == "sequence" else sup.reshape(-1)
            if int(units.sum()) == 1:  # the only supervised unit has psi = 0: log mean psi = -inf
                causes.append("ref_logp")
    return tuple(causes) or None


@dataclass
class Outcome:
    error: Optional[BaseException]
    values: Dict[str, torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]


def run(c: Case, x: Inputs, backend: str, dtype: Optional[torch.dtype] = None) -> Outcome:
    """The API call of ``c`` on ``backend`` (inputs cast to ``dtype``), its values and gradients."""
    dt = dtype or c.dtype
    hidden, weight = x.hidden.to(dt), x.weight.to(dt)
    bias = None if x.bias is None else x.bias.to(dt)
    want = c.grad in ("all", "hidden")
    hidden.requires_grad_(want)
    weight.requires_grad_(c.grad == "all")
    if bias is not None:
        bias.requires_grad_(c.grad == "all")
    ref = x.ref
    ctx = torch.no_grad() if c.grad == "no_grad" else contextlib.nullcontext()
    loss_fn, kw = _loss_call(c, ref)
    try:
        with ctx:
            if c.api == "loss":
                out = loss_fn(hidden, weight, x.labels, bias=bias, softcap=c.softcap, temperature=c.temperature,
                              backend=backend, return_entropy=c.entropy != "off", **kw)
                value = out.loss
                scalar = value.sum()
                if c.entropy == "loss":
                    scalar = scalar + 0.1 * out.entropy.sum()
                if c.logp_in_loss:
                    scalar = scalar + 0.1 * out.logp.sum()
            elif c.api == "logits":
                z = hidden @ weight.T if bias is None else hidden @ weight.T + bias
                out = loss_fn(logits=z, labels=x.labels, **kw)
                value = out.loss
                scalar = value.sum()
            elif c.api == "token_stats":
                out = fk.token_stats(hidden, weight, x.labels, bias=bias, softcap=c.softcap,
                                     temperature=c.temperature, backend=backend, return_entropy=c.entropy != "off")
                value = torch.stack([out.logp, out.lse] + ([out.entropy] if c.entropy != "off" else []))
                scalar = out.logp.sum() - 0.5 * out.lse.sum()
                if c.entropy == "loss":
                    scalar = scalar + 0.3 * out.entropy.sum()
            else:
                out = fk.sequence_logp(hidden, weight, x.labels, bias=bias, softcap=c.softcap,
                                       temperature=c.temperature, backend=backend)
                value = torch.stack([out.sum, out.mean])
                scalar = out.sum.sum() + out.mean.sum()
        grads: Dict[str, Optional[torch.Tensor]] = {}
        inputs = {k: t for k, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
                  if t is not None and t.requires_grad}
        if inputs and scalar.requires_grad:
            got = torch.autograd.grad(scalar, tuple(inputs.values()), allow_unused=True)
            grads = {k: (None if gr is None else gr.detach()) for k, gr in zip(inputs, got)}
    except (ValueError, TypeError) as exc:
        return Outcome(exc, {}, {})
    return Outcome(None, {"value": value.detach()}, grads)


def _zmax(c: Case, x: Inputs) -> float:
    """max |z| over finite logits, z = cap(h W^T + b) / T (float64)."""
    if x.hidden.numel() == 0:
        return 0.0
    z = x.hidden.double() @ x.weight.double().T
    if x.bias is not None:
        z = z + x.bias.double()
    if c.softcap is not None:
        z = c.softcap * torch.tanh(z / c.softcap)
    z = z / c.temperature
    fin = z[torch.isfinite(z)]
    return float(fin.abs().max()) if fin.numel() else 0.0


def assert_contract(c: Case, x: Inputs, out: Outcome, where: str, overflow_ok=frozenset()) -> None:
    """``overflow_ok``: gradients whose float32 value exceeds float16's range (they may be inf in
    float16, as any float16 result; torch.amp.GradScaler's protocol)."""
    exp = expected_error(c, x)
    event(f"outcome: {'error' if out.error is not None else 'values'}; api {c.api}")
    if exp is not None:
        assert out.error is not None, f"{where}: expected an error naming one of {exp}, got values"
        assert any(e in str(out.error) for e in exp), f"{where}: error {out.error!r} does not name {exp}"
        return
    if out.error is not None:
        raise AssertionError(f"{where}: unexpected {type(out.error).__name__}: {out.error}") from out.error
    assert isinstance(out.error, type(None))
    for name, t in list(out.values.items()) + list(out.grads.items()):
        if t is not None and name not in overflow_ok:
            assert torch.isfinite(t).all(), f"{where}: {name} is not finite: {t}"


def assert_agree(a: Outcome, b: Outcome, tol: float, what: str, extra_ulp: float = 0.0,
                 floor: Optional[Dict[str, float]] = None, skip=frozenset()) -> None:
    """Every value and gradient of ``a`` within ``(tol + extra_ulp) * max(max|b|, floor[kind])`` of
    ``b`` (``floor``: the natural magnitude of that kind, for tensors whose exact value is ~0)."""
    floor = floor or {}
    if a.error is not None or b.error is not None:
        assert type(a.error) is type(b.error), f"{what}: {a.error!r} vs {b.error!r}"
        return
    for kind in ("values", "grads"):
        da, db = getattr(a, kind), getattr(b, kind)
        assert da.keys() == db.keys(), f"{what}: {kind} {sorted(da)} vs {sorted(db)}"
        for name in da:
            ta, tb = da[name], db[name]
            if ta is None or tb is None:
                assert ta is None and tb is None, f"{what}: {name} missing on one side"
                continue
            if name in skip:  # beyond float16's range (see assert_contract)
                continue
            ta, tb = ta.double(), tb.double()
            scale = max(float(tb.abs().max()) if tb.numel() else 0.0, floor.get(kind, 0.0))
            err = float((ta - tb).abs().max()) if ta.numel() else 0.0
            assert err <= (tol + extra_ulp) * scale + 1e-30, (
                f"{what}: {name} differs by {err:.3g} (scale {scale:.3g}, allowed {(tol + extra_ulp) * scale:.3g})")


def _tolerance(c: Case, x: Inputs) -> float:
    """The relative agreement of the module docstring."""
    cap = 0.0 if c.softcap is None else SOFTCAP_EPS * EPS32
    return 1e-5 + 8 * EPS32 * _zmax(c, x) * (1 + c.beta) + cap


#: with a soft-cap, the one-pass kernels (cpu, triton) recover tanh(raw / c) from the stored z:
#: 1 - tanh^2 carries an absolute error of ~2 eps where the logit is saturated (and the true factor
#: ~0), a relative gradient error of up to a few hundred eps when such entries dominate |dL/dz|
SOFTCAP_EPS = 512


def _floor(c: Case, x: Inputs) -> Dict[str, float]:
    """Natural magnitudes: values ~ (1 + beta); gradient entries ~ |dL/dz| max(|h|, |W|, 1) / T,
    with |dL/dz| <= the largest per-token derivative of the loss (:func:`_derivative_bound`)."""
    big = max([1.0] + [float(t.detach().abs().max()) for t in (x.hidden, x.weight) if t.numel()])
    return {"values": 1.0 + c.beta, "grads": max(1.0 + c.beta, _derivative_bound(c, x)) * big / c.temperature}


def _derivative_bound(c: Case, x: Inputs) -> float:
    """``max |dL/dlogp| + |dL/dlse|`` over tokens for ``fk.loss`` (float64, from logits): the
    per-token derivatives that multiply every coefficient (primal Pearson's reach 1/p)."""
    if c.api not in ("loss", "logits") or x.hidden.numel() == 0 or not bool((x.labels != IGNORE).any()):
        return 3.0  # the other APIs' test scalars: derivatives <= 2 (+ entropy 0.3)
    z = x.hidden.double() @ x.weight.double().T + (0.0 if x.bias is None else x.bias.double())
    if c.softcap is not None:
        z = c.softcap * torch.tanh(z / c.softcap)
    z = (z / c.temperature).detach().requires_grad_()
    try:
        loss_fn, kw = _loss_call(c, x.ref)
        out = loss_fn(logits=z, labels=x.labels, **kw)
        g, k = torch.autograd.grad(out.loss.sum(), (out.logp, out.lse), allow_unused=True)
    except (ValueError, TypeError):
        return 3.0
    b = sum(float(t.abs().max()) for t in (g, k) if t is not None and t.numel())
    return b + 0.2 * (c.entropy == "loss") + 0.1 * c.logp_in_loss


def _fp16_overflow(c: Case, x: Inputs) -> frozenset:
    """Names of the gradients that do not fit float16 (their float32 values), for float16 cases."""
    if c.dtype != torch.float16:
        return frozenset()
    r32 = run(c, x, "torch", torch.float32)
    return frozenset(k for k, t in r32.grads.items() if t is not None and t.numel() and float(t.abs().max()) > 6e4)


def _ulp(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(dtype, 0.0)


BUDGETS = {name: Budget(name) for name in BUDGET_S}


@_settings(examples=1000)
@given(c=cases())
def test_loss_contract_on_every_backend(c: Case):
    if BUDGETS["loss"].spent():
        return
    x = make_inputs(c)
    tol = _tolerance(c, x)
    floor = _floor(c, x)
    ref = run(c, x, "torch", torch.float64) if c.dtype == torch.float32 else None
    big = _fp16_overflow(c, x)
    first = None
    for backend in _cpu_backends():
        out = run(c, x, backend)
        assert_contract(c, x, out, f"{backend} {c}", big)
        if first is None:
            first = out
        else:
            assert_agree(out, first, tol, f"{backend} vs torch: {c}", extra_ulp=2 * _ulp(c.dtype), floor=floor,
                         skip=big)
        if ref is not None:
            assert_agree(out, ref, tol, f"{backend} vs float64: {c}", floor=floor)


# ---------------------------------------------------------------------------------------------
# DPO: fk.dpo_loss directly and fused (fk.nn.FusedLinearDPOLoss) on every backend
# ---------------------------------------------------------------------------------------------

_DPO_VALUES = (-1.0, -5.0, -45.0, -300.0, -1e4, 0.0, -math.inf, math.nan)


@st.composite
def dpo_cases(draw):
    kind = draw(st.sampled_from(tuple(fk.DPO_LOSS_TYPES)))
    row = fk.DPO_LOSS_TYPES[kind]
    f = draw(st.sampled_from(("reverse_kl", "forward_kl", "js", "alpha"))) if row.scored else "reverse_kl"
    b = draw(st.sampled_from((1, 3)))
    finite, special = st.sampled_from(_DPO_VALUES[:6]), st.sampled_from(_DPO_VALUES[6:])
    vals = st.one_of(finite, finite, finite, finite, finite, special)  # about 1 in 6 infinite or NaN
    cols = [[draw(vals) for _ in range(b)] for _ in range(4)]
    return dict(loss_type=kind, divergence=TRL_F_DIVERGENCES.get(f, f), alpha=draw(st.sampled_from((0.5, 1.5, 2.0))),
                beta=draw(st.sampled_from((0.1, 1.0, 1e3))),
                label_smoothing=(draw(st.sampled_from((1e-3, 0.1))) if kind == "exo_pair" else
                                 draw(st.sampled_from((0.0, 0.1))) if row.uses_label_smoothing else 0.0),
                discopop_tau=draw(st.sampled_from((0.05, 2.0))) if kind == "discopop" else 0.05,
                gamma=draw(st.sampled_from((0.0, 1.0))) if kind == "simpo" else 0.0,
                dtype=draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float64))), cols=cols,
                fused=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


_OPTS = ("loss_type", "divergence", "alpha", "beta", "label_smoothing", "gamma", "discopop_tau")


def _no_ref(d) -> bool:
    return not fk.DPO_LOSS_TYPES[d["loss_type"]].needs_reference


def _tokens(d):
    """The sft term's chosen token counts (None for the other kinds)."""
    return torch.arange(1, len(d["cols"][0]) + 1) if d["loss_type"] == "sft" else None


def _dpo_expected_error(d) -> bool:
    """NaN inputs, and a reference that is not a log-probability (NaN or +inf; docs/math.md's
    contract table: one rule for fk.loss, fk.dpo_loss and the fused module), are errors."""
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in d["cols"])
    used = (pc,) if d["loss_type"] == "sft" else (pc, pr) if _no_ref(d) else (pc, pr, rc, rr)  # what it reads
    if any(bool(torch.isnan(t).any()) for t in used):
        return True
    if not _no_ref(d) and any(bool((t == math.inf).any()) for t in (rc, rr)):
        return True
    return False  # other infinite inputs: an error only where the limit is not finite (checked below)


@_settings(examples=800)
@given(d=dpo_cases())
def test_dpo_contract(d):
    if BUDGETS["dpo"].spent():
        return
    pc, pr, rc, rr = (torch.tensor(col, dtype=d["dtype"]) for col in d["cols"])
    pc.requires_grad_()
    opts = {k: d[k] for k in _OPTS}
    try:
        out = fk.dpo_loss(pc, pr, rc, rr, chosen_tokens=_tokens(d), **opts)
        (grad,) = torch.autograd.grad(out.loss, pc)
    except ValueError as exc:
        event("dpo outcome: error")
        assert any(n in str(exc) for n in ARGUMENT_NAMES[-4:]), f"error does not name an input: {exc}"
        assert _dpo_expected_error(d) or not _dpo_limit_is_finite(d), f"{d}: the limit is finite, yet {exc}"
        return
    event("dpo outcome: values" + ("" if bool(torch.isfinite(torch.tensor(d["cols"])).all()) else " (infinite inputs)"))
    assert not _dpo_expected_error(d), f"{d}: NaN input gave {out.loss}"
    assert torch.isfinite(out.loss) and torch.isfinite(out.losses).all() and torch.isfinite(grad).all(), d
    if d["dtype"] == torch.float32 and bool(torch.isfinite(torch.tensor(d["cols"])).all()):
        p64 = pc.detach().double().requires_grad_()
        out64 = fk.dpo_loss(p64, pr.double(), rc.double(), rr.double(), chosen_tokens=_tokens(d), **opts)
        (g64,) = torch.autograd.grad(out64.loss, p64)
        torch.testing.assert_close(out.loss.double(), out64.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), g64, rtol=1e-5, atol=1e-6 * max(1.0, float(g64.abs().max())))
    if d["fused"] and d["dtype"] != torch.float64:
        _dpo_fused_agrees(d, out)


def _dpo_limit_is_finite(d) -> bool:
    """Whether every pair's loss has a finite limit (then no error is allowed), in float64."""
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in d["cols"])
    if _no_ref(d):
        rc = rr = None
    opts = {k: d[k] for k in _OPTS}
    from fdiv_kernels.formulas.preference import pair_losses
    nll = -pc.sum() / _tokens(d).sum() if d["loss_type"] == "sft" else None
    with torch.no_grad():
        losses = pair_losses(pc, pr, rc, rr, fk.DPOSpec(**opts), nll=nll)
    return bool(torch.isfinite(losses).all())


def _dpo_fused_agrees(d, direct) -> None:
    """The same pairs through the fused module: rows whose supervised log-probs sum to the drawn
    policy values are not constructible, so this checks the fused loss against fk.dpo_loss on the
    fused sequence log-probs, with the drawn references, on every backend."""
    b = len(d["cols"][0])
    x = oracle.make_inputs((2 * b,), 3, 4, 9, dtype=d["dtype"], seed=d["seed"], weight_scale=1.0, ref_scale=None)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    ref = torch.cat([torch.tensor(d["cols"][2]), torch.tensor(d["cols"][3])]).float()
    opts = {k: d[k] for k in _OPTS}
    results = []
    for backend in _cpu_backends():
        module = fk.nn.FusedLinearDPOLoss(backend=backend, **opts)
        h = hidden.clone().requires_grad_()
        try:
            loss = module(h, weight, labels, ref_logp=None if _no_ref(d) else ref)
            (gh,) = torch.autograd.grad(loss, h)
        except ValueError as exc:
            results.append(type(exc))
            continue
        assert torch.isfinite(loss) and torch.isfinite(gh).all(), (backend, d)
        seq = fk.sequence_logp(hidden.float(), weight.float(), labels)
        s = seq.mean if module.length_normalize else seq.sum
        want = fk.dpo_loss(s[:b], s[b:], None if _no_ref(d) else ref[:b], None if _no_ref(d) else ref[b:],
                           chosen_tokens=seq.count[:b] if d["loss_type"] == "sft" else None, **opts).loss
        tol = 1e-5 if d["dtype"] == torch.float32 else 2e-2
        torch.testing.assert_close(loss.double(), want.double(), rtol=tol, atol=tol)
        results.append((loss.detach().double(), gh.double()))
    kinds = {r if isinstance(r, type) else "ok" for r in results}
    assert len(kinds) == 1, f"backends disagree on the outcome: {results}"


# ---------------------------------------------------------------------------------------------
# Triton under the interpreter (small shapes; its own, smaller budget)
# ---------------------------------------------------------------------------------------------

def _triton_ok() -> bool:
    return fk.available_backends("cpu").get("triton") == "available"


@pytest.mark.skipif(not triton_backend.interpret_mode() or not _triton_ok(),
                    reason="triton needs TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it)")
@_settings(examples=200)
@given(c=cases(small=True, dtypes=(torch.float32, torch.float32, torch.bfloat16, torch.float16)))
def test_loss_contract_triton_matches_torch(c: Case):
    if BUDGETS["triton"].spent():
        return
    x = make_inputs(c)
    tol = _tolerance(c, x)
    want = run(c, x, "torch")
    got = run(c, x, "triton")
    big = _fp16_overflow(c, x)
    assert_contract(c, x, got, f"triton {c}", big)
    # 16-bit: triton rounds the coefficient to the input dtype before its gradient GEMMs
    assert_agree(got, want, tol, f"triton vs torch: {c}", extra_ulp=8 * _ulp(c.dtype), floor=_floor(c, x), skip=big)

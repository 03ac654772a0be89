"""Distillation forms: ``D_f(P_t || P_s) = sum_v p_s[v] f(p_t[v] / p_s[v])`` over the vocabulary.

For a teacher distribution ``p_t`` and a student distribution ``p_s = softmax(z_s)`` over the same
vocabulary, every f-divergence of the registry is a sum of per-entry terms ``p_s f(r)``,
``r = p_t / p_s``. Its gradient with respect to the student's logits is, with
``a(r) = f(r) - r f'(r)`` (``d(p_s f(r)) / d log p_s = p_s a(r)``) and the softmax's Jacobian,

    dD/dz_s[v] = p_s[v] (a(r_v) - E_{p_s}[a]),         E_{p_s}[a] = sum_w p_s[w] a(r_w),

so a constant added to ``a`` changes nothing: each form below takes the ``a`` with the least
cancellation. A :class:`DistillForm` holds, as elementwise functions of the two log-probabilities
``lt = log p_t``, ``ls = log p_s`` (each ``<= 0`` or ``-inf`` for a masked entry) and the form's
parameter ``c`` (``beta`` of ``js``, ``alpha`` of ``alpha``; ignored by the others):

* :meth:`DistillForm.term` ``= p_s f(r)``, the entry's share of ``D`` (``>= 0``);
* :meth:`DistillForm.pa` ``= p_s a(r)``, the entry's share of ``E_{p_s}[a]``.

Both are evaluated in log space (``log r = lt - ls``): no ratio ``r`` and no ``1 / p`` is formed,
so an entry whose student probability is ``e^-40`` below its teacher's gives its exact (large)
term rather than ``inf * 0``. The entries where one distribution is zero take the limits of the
generator (:attr:`DistillForm.f0` ``= f(0)``: ``p_t = 0``, term ``p_s f(0)``;
:attr:`DistillForm.f_inf` ``= lim f(r)/r``: ``p_s = 0``, term ``p_t f_inf``; both zero: 0), which
are ``+inf`` where the divergence is infinite (forward KL and Pearson with ``p_s = 0 < p_t``,
reverse KL and Neyman with ``p_t = 0 < p_s``). The forms (``docs/math.md``, section 8):

| name | f(r) | term p_s f(r) | a(r) used |
|---|---|---|---|
| kl | r log r | p_t (lt - ls) | -r |
| reverse_kl | -log r | p_s (ls - lt) | -log r |
| js (beta) | beta r log r - q log q, q = beta r + 1 - beta | beta p_t (lt - lm) + (1-beta) p_s (ls - lm), m = beta p_t + (1-beta) p_s | -(1-beta) log q |
| tv | abs(r - 1) / 2 | abs(p_t - p_s) / 2 | sign(1 - r) / 2 |
| squared_hellinger | (sqrt r - 1)^2 | e^max(lt, ls) expm1(-abs(lt - ls)/2)^2 | -sqrt r |
| pearson | (r - 1)^2 | e^(ls + 2 max(lt - ls, 0)) expm1(-abs(lt - ls))^2 | -r^2 |
| neyman | (1 - r)^2 / r | e^(lt + 2 max(ls - lt, 0)) expm1(-abs(lt - ls))^2 | 2 / r |
| alpha (a) | (r^a - 1 - a (r - 1)) / (a (a - 1)) | see :func:`_alpha_term` | -expm1(a log r) / a |

``js`` is TRL's ``generalized_jsd_loss`` and Liger's ``LigerFusedLinearJSDLoss``:
``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; at ``beta = 0.5`` the textbook Jensen-Shannon
divergence, half the registry's f-GAN ``js`` generator ``u log u - (1 + u) log((1 + u) / 2)``.
Their ``beta = 0`` and ``beta = 1`` are forward and reverse KL (not the vanishing limits of the
mixture): :func:`resolve` maps them to the ``kl`` / ``reverse_kl`` forms. ``alpha`` is Amari's
family: its ``a -> 1`` and ``a -> 0`` limits are forward and reverse KL and the form is continuous
there (a ``(a - 1)`` never divides a difference that vanishes with it).

:func:`chunk_epilogue` is the per-chunk epilogue every backend implements (written here in torch:
the ``"torch"`` backend's, and the reference of the native ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["DISTILL_FORMS", "DistillForm", "FORM_IDS", "chunk_epilogue", "dominant_safe", "resolve"]

_NEG_INF = -math.inf


@dataclass(frozen=True)
class DistillForm:
    """One divergence's distillation form (module docstring).

    ``name``: the registry name; ``generator``: ``f(r)`` as text; ``param``: ``"beta"``,
    ``"alpha"`` or ``None`` (what ``c`` means); ``core_term`` / ``core_pa``: ``p_s f(r)`` and
    ``p_s a(r)`` at finite ``lt``, ``ls``; ``f0(c)`` = ``f(0)``, ``f_inf(c)`` = ``lim f(r)/r``,
    ``a0(c)`` = ``a(0)`` (each possibly ``inf``).
    """

    name: str
    generator: str
    param: Optional[str]
    core_term: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    core_pa: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    f0: Callable[[float], float]
    f_inf: Callable[[float], float]
    a0: Callable[[float], float]

    def __reduce__(self):
        """A built-in form pickles by name (its functions are lambdas)."""
        return (_builtin, (self.name,)) if DISTILL_FORMS.get(self.name) is self else super().__reduce__()

    def term(self, lt: torch.Tensor, ls: torch.Tensor, c: float = 0.0) -> torch.Tensor:
        """``p_s f(p_t / p_s)`` elementwise (the limits where ``lt`` or ``ls`` is ``-inf``)."""
        return _with_limits(self.core_term, lt, ls, c, self.f0(c), self.f_inf(c))

    def pa(self, lt: torch.Tensor, ls: torch.Tensor, c: float = 0.0) -> torch.Tensor:
        """``p_s a(p_t / p_s)`` elementwise (0 where ``p_s = 0``; ``p_s a(0)`` where ``p_t = 0``)."""
        return _with_limits(self.core_pa, lt, ls, c, self.a0(c), 0.0)


def _builtin(name: str) -> DistillForm:
    return DISTILL_FORMS[name]


def _with_limits(core, lt, ls, c, at_t0: float, at_s0: float) -> torch.Tensor:
    """``core(lt, ls, c)`` where both are finite; ``p_s at_t0`` where only ``p_t = 0``;
    ``p_t at_s0`` where only ``p_s = 0``; 0 where both are (no branch sees an ``inf - inf``)."""
    t0, s0 = lt == _NEG_INF, ls == _NEG_INF
    zero = lt.new_zeros(())
    lt_f, ls_f = torch.where(t0, zero, lt), torch.where(s0, zero, ls)
    out = core(lt_f, ls_f, c)
    out = torch.where(t0, _times(torch.exp(ls), at_t0), out)
    out = torch.where(s0, _times(torch.exp(lt), at_s0), out)
    return torch.where(t0 & s0, zero, out)


def _times(p: torch.Tensor, k: float) -> torch.Tensor:
    """``p * k`` with ``0 * inf = 0`` (a zero probability times an infinite limit adds nothing)."""
    return p * k if math.isfinite(k) else torch.where(p > 0, p.new_full((), k), p.new_zeros(()))


def _pos_part(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, min=0.0)


def _sq_expm1_abs(x: torch.Tensor) -> torch.Tensor:
    """``expm1(-|x|)^2`` (in ``[0, 1)``)."""
    e = torch.expm1(-x.abs())
    return e * e


# --- js: the generalized Jensen-Shannon divergence of TRL / Liger (0 < beta < 1) ---

def _log_mix(lt, ls, beta):
    """``log m = log(beta p_t + (1 - beta) p_s)`` (logaddexp of the shifted log-probs)."""
    return torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))


def _js_term(lt, ls, beta):
    lm = _log_mix(lt, ls, beta)
    return beta * torch.exp(lt) * (lt - lm) + (1 - beta) * torch.exp(ls) * (ls - lm)


def _js_pa(lt, ls, beta):
    return -(1 - beta) * torch.exp(ls) * (_log_mix(lt, ls, beta) - ls)


# --- alpha: Amari's family, continuous through a = 1 (kl) and a = 0 (reverse kl) ---

def _alpha_term(lt, ls, a):
    """``p_s f_a(r)`` with ``f_a(r) = (r^a - 1 - a (r - 1)) / (a (a - 1))``.

    With ``d = a - 1``, ``l = log r`` and ``h(x) = expm1(x) - x``, exactly

        p_s f_a(r) = (p_t h(d lr) / d + p_t lr - p_t + p_s) / a,

    whose pieces are each finite and continuous at ``d = 0`` (``h(d l) / d -> 0``; the rest is the
    generalised KL term ``p_s (r log r - r + 1)``). For ``a < 1/2`` the duality
    ``p_s f_a(p_t / p_s) = p_t f_(1-a)(p_s / p_t)`` swaps the roles (so ``d >= -1/2`` always and
    ``h`` never overflows where the product does not). Above ``x = d l > 1``, ``p_t h(x)`` is
    ``e^(lt + x) - p_t (1 + x)`` (no ``e^x`` alone, which overflows where ``p_t e^x`` is finite)."""
    if a < 0.5:
        lt, ls, a = ls, lt, 1.0 - a
    d = a - 1.0
    lr = lt - ls
    pt, ps = torch.exp(lt), torch.exp(ls)
    k = pt * lr - pt + ps
    if d == 0.0:
        return k
    x = d * lr
    small = x <= 1.0
    xs = torch.where(small, x, x.new_zeros(()))
    g_small = pt * (torch.expm1(xs) - xs)
    g_big = torch.exp(lt + torch.where(small, x.new_zeros(()), x)) - pt * (1 + x)
    return (torch.where(small, g_small, g_big) / d + k) / a


def _alpha_pa(lt, ls, a):
    """``p_s a(r) = -p_s expm1(a l) / a`` (``-p_s l`` at ``a = 0``); above ``a l > 1`` as
    ``-(e^(ls + a l) - p_s) / a``."""
    lr = lt - ls
    ps = torch.exp(ls)
    if a == 0.0:
        return -ps * lr
    x = a * lr
    small = x <= 1.0
    xs = torch.where(small, x, x.new_zeros(()))
    big = torch.exp(ls + torch.where(small, x.new_zeros(()), x)) - ps
    return -torch.where(small, ps * torch.expm1(xs), big) / a


def _inf_unless(cond: bool, value: float) -> float:
    return value if cond else math.inf


_FORMS = [
    DistillForm(
        name="kl", generator="r log r", param=None,
        core_term=lambda lt, ls, c: torch.exp(lt) * (lt - ls),
        core_pa=lambda lt, ls, c: -torch.exp(lt),
        f0=lambda c: 0.0, f_inf=lambda c: math.inf, a0=lambda c: 0.0,
    ),
    DistillForm(
        name="reverse_kl", generator="-log r", param=None,
        core_term=lambda lt, ls, c: torch.exp(ls) * (ls - lt),
        core_pa=lambda lt, ls, c: torch.exp(ls) * (ls - lt),
        f0=lambda c: math.inf, f_inf=lambda c: 0.0, a0=lambda c: math.inf,
    ),
    DistillForm(
        name="js", generator="beta r log r - q log q, q = beta r + 1 - beta", param="beta",
        core_term=_js_term, core_pa=_js_pa,
        f0=lambda b: -(1 - b) * math.log1p(-b), f_inf=lambda b: -b * math.log(b), a0=lambda b: -(1 - b) * math.log1p(-b),
    ),
    DistillForm(
        name="tv", generator="|r - 1| / 2", param=None,
        core_term=lambda lt, ls, c: 0.5 * (torch.exp(lt) - torch.exp(ls)).abs(),
        core_pa=lambda lt, ls, c: 0.5 * torch.exp(ls) * torch.sign(ls - lt),
        f0=lambda c: 0.5, f_inf=lambda c: 0.5, a0=lambda c: 0.5,
    ),
    DistillForm(
        name="squared_hellinger", generator="(sqrt(r) - 1)^2", param=None,
        core_term=lambda lt, ls, c: torch.exp(torch.maximum(lt, ls)) * _sq_expm1_abs(0.5 * (lt - ls)),
        core_pa=lambda lt, ls, c: -torch.exp(0.5 * (lt + ls)),
        f0=lambda c: 1.0, f_inf=lambda c: 1.0, a0=lambda c: 0.0,
    ),
    DistillForm(
        name="pearson", generator="(r - 1)^2", param=None,
        core_term=lambda lt, ls, c: torch.exp(ls + 2 * _pos_part(lt - ls)) * _sq_expm1_abs(lt - ls),
        core_pa=lambda lt, ls, c: -torch.exp(2 * lt - ls),
        f0=lambda c: 1.0, f_inf=lambda c: math.inf, a0=lambda c: 0.0,
    ),
    DistillForm(
        name="neyman", generator="(1 - r)^2 / r", param=None,
        core_term=lambda lt, ls, c: torch.exp(lt + 2 * _pos_part(ls - lt)) * _sq_expm1_abs(lt - ls),
        core_pa=lambda lt, ls, c: 2 * torch.exp(2 * ls - lt),
        f0=lambda c: math.inf, f_inf=lambda c: 1.0, a0=lambda c: math.inf,
    ),
    DistillForm(
        name="alpha", generator="(r^a - 1 - a (r - 1)) / (a (a - 1))", param="alpha",
        core_term=_alpha_term, core_pa=_alpha_pa,
        f0=lambda a: _inf_unless(a > 0, 1.0 / a if a > 0 else 0.0),
        f_inf=lambda a: _inf_unless(a < 1, 1.0 / (1.0 - a) if a < 1 else 0.0),
        a0=lambda a: _inf_unless(a > 0, 1.0 / a if a > 0 else 0.0),
    ),
]

#: every distillation form, by the registry name of its divergence (:mod:`.divergences` attaches them)
DISTILL_FORMS: Dict[str, DistillForm] = {f.name: f for f in _FORMS}
#: the forms' numbers in the native epilogues (csrc/cpu/distill_cpu.cpp, csrc/cuda/distill_epilogue.cu, the
#: Triton kernel): one list, read by every backend
FORM_IDS: Dict[str, int] = {name: i for i, name in enumerate(DISTILL_FORMS)}


def resolve(name: str, beta: float, alpha: Optional[float]) -> Tuple[DistillForm, float]:
    """The form a distillation with divergence ``name`` computes, and its parameter ``c``:
    ``js`` with ``beta = 0`` / ``1`` is forward / reverse KL (TRL's and Liger's special cases),
    ``alpha`` takes ``alpha``, the rest no parameter (``c = 0``)."""
    if name == "js":
        if beta == 0.0:
            return DISTILL_FORMS["kl"], 0.0
        if beta == 1.0:
            return DISTILL_FORMS["reverse_kl"], 0.0
        return DISTILL_FORMS["js"], float(beta)
    if name == "alpha":
        return DISTILL_FORMS["alpha"], float(alpha)
    return DISTILL_FORMS[name], 0.0


def dominant_safe(pa: torch.Tensor, ps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``pa - p_s A`` (``A = sum_v pa``) per row, exact where one entry holds almost all the student's
    mass: at that entry ``m`` (the argmax of ``p_s``, ``[n, 1]``) ``pa_m - p_s,m A`` is a difference of
    two nearly equal numbers (``p_s,m -> 1``), so it is formed as ``pa_m S' - p_s,m A'`` with
    ``S' = sum_(v != m) p_s`` (``= 1 - p_s,m``) and ``A' = sum_(v != m) pa``: equal in exact arithmetic,
    and no cancellation (a student sure of one token whose ratio there is extreme, e.g. alpha < 0
    with logits 270 nats apart, had its largest gradient entry rounded to 0, in float64 too)."""
    at_m = torch.zeros_like(ps, dtype=torch.bool).scatter_(1, m, True)
    zero = ps.new_zeros(())
    rest_s = torch.where(at_m, zero, ps).sum(-1, keepdim=True)
    rest_a = torch.where(at_m, zero, pa).sum(-1, keepdim=True)
    coef = pa - ps * (pa.gather(1, m) + rest_a)
    return torch.where(at_m, pa * rest_s - ps * rest_a, coef)


def chunk_epilogue(zt_raw: torch.Tensor, zs_raw: torch.Tensor, y: torch.Tensor, wt: Optional[torch.Tensor], *,
                   form: DistillForm, c: float, inv_t: float, kappa: float,
                   hard_weight: float) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The distillation epilogue of one chunk of ``n`` rows, in the dtype of the logits.

    ``zt_raw``, ``zs_raw``: ``[n, V]`` teacher and student logits before the temperature (bias
    included); ``y [n]`` the labels (read only when ``hard_weight > 0``); ``wt [n]`` each row's
    weight in the loss (``1/N`` for a mean), or ``None`` for no gradient. With
    ``z = raw * inv_t`` (the rounded ``1/T``), ``lt = log_softmax(z_t)``, ``ls = log_softmax(z_s)``:

        div[n] = sum_v term(lt, ls)                        D_f(P_t || P_s) at temperature T
        nll[n] = logsumexp(zs_raw) - zs_raw[y]             the hard-label NLL, untempered (0 when hard_weight = 0)
        coef   = wt (kappa inv_t (pa - p_s sum_v pa) + hard_weight (softmax(zs_raw) - onehot(y)))

    Returns ``(div, nll, coef [n, V] | None)``: ``coef`` is ``d(sum_n wt (kappa div + hard_weight
    nll)) / d zs_raw``; ``pa - p_s sum pa`` is formed by :func:`dominant_safe`.
    """
    zt = zt_raw * inv_t if inv_t != 1.0 else zt_raw
    zs = zs_raw * inv_t if inv_t != 1.0 else zs_raw
    lt = torch.log_softmax(zt, dim=-1)
    ls = torch.log_softmax(zs, dim=-1)
    div = form.term(lt, ls, c).sum(-1)
    nll = zs.new_zeros(zs.shape[0])
    if hard_weight > 0:
        lse_raw = torch.logsumexp(zs_raw, dim=-1)
        nll = lse_raw - zs_raw.gather(1, y[:, None]).squeeze(1)
    if wt is None:
        return div, nll, None
    pa = form.pa(lt, ls, c)
    ps = torch.exp(ls)
    coef = (kappa * inv_t) * dominant_safe(pa, ps, ls.argmax(-1, keepdim=True))
    if hard_weight > 0:
        hard = torch.softmax(zs_raw, dim=-1)
        hard.scatter_add_(1, y[:, None], hard.new_full((y.shape[0], 1), -1.0))
        coef = coef + hard_weight * hard
    return div, nll, coef * wt[:, None].to(coef.dtype)

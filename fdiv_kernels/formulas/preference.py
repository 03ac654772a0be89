"""DPO-family losses on sequence log-probs (TRL's formulas, evaluated in log space), with their
closed-form derivatives.

With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (differences of sequence log-probs), ``a = pi_c -
ref_c``, ``b = pi_r - ref_r`` (the chosen and rejected log-ratios), ``x = beta h``, ``eps`` =
``label_smoothing``, ``S(x) = -(1-eps) logsigmoid(x) - eps logsigmoid(-x)`` and ``sig`` the sigmoid
(TRL 1.16's ``DPOTrainer`` formulas, ``trl/trainer/dpo_trainer.py``, unless noted):

| loss_type | per-pair loss |
|----------|---------------|
| sigmoid  | ``S(x)`` (TRL 1.16's sigmoid reads no ``eps``: ``eps = 0``; with ``eps`` it is cDPO) |
| robust   | ``(-(1-eps) logsigmoid(x) + eps logsigmoid(-x)) / (1 - 2 eps)`` |
| hinge    | ``relu(1 - x)`` |
| ipo      | ``(h - 1/(2 beta))**2`` (TRL feeds it length-averaged log-probs) |
| simpo    | ``S(beta d - gamma)``, ``d = pi_c - pi_r`` (no reference; TRL's ``CPOTrainer``: ``simpo_gamma`` = ``gamma``; length-averaged log-probs) |
| exo_pair | ``sig(x) (logsigmoid(x) - log(1-eps)) + sig(-x) (logsigmoid(-x) - log eps)`` (needs ``eps > 0``) |
| nca_pair | ``-logsigmoid(beta a) - logsigmoid(-beta a)/2 - logsigmoid(-beta b)/2`` |
| bco_pair | ``-logsigmoid(beta a) - logsigmoid(-beta b)`` (TRL 1.16 and Liger: no running reward mean) |
| sppo_hard | ``(a - 1/(2 beta))**2 + (b + 1/(2 beta))**2`` |
| aot      | ``S(beta (sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i))``: sorted over the batch (per rank ``i``) |
| aot_unpaired | ``S(beta (sort(a)_i - sort(b)_i))`` |
| apo_zero | ``sig(-beta a) + sig(beta b)`` |
| apo_down | ``sig(beta a) + sig(-beta (a - b))`` |
| discopop | ``-logsigmoid(x) (1 - m) + exp(-x) m``, ``m = sig(x / tau)`` (``tau`` = ``discopop_tau``) |
| sigmoid_norm | ``-logsigmoid(x)`` on length-averaged log-probs |
| orpo     | ``-beta logsigmoid(o(pi_c) - o(pi_r))``, ``o(l) = l - log(1 - e^l)`` the log-odds of mean log-probs (no reference; TRL's ``ORPOTrainer``) |
| sft      | the mean NLL of the chosen answers' tokens, ``-sum logp / N_chosen`` (a token term, the same for every pair) |

Several types combine with weights, ``sum_k w_k loss_k`` (TRL's ``loss_type=[...]``,
``loss_weights=[...]``); ``sft`` is the NLL term of every preference loss (formerly TRL's
``rpo_alpha``; Liger's ``compute_nll_loss``/``alpha``; TRL's ``cpo_alpha``). ``logsigmoid`` is
finite for any argument; ``exo_pair`` and ``discopop`` are evaluated so that an infinite margin
gives their limit (``exp(-x) m = exp(-x + logsigmoid(x / tau))``, continued logarithmically above
an exponent of 50 like ipo's f-DPO scores below); ``orpo``'s gradient is formed in log space, finite
up to a rejected answer of probability 1 (mean log-prob 0: an infinite loss, an error).

What each loss type needs is one table, :data:`DPO_LOSS_TYPES`:

| loss_type | needs_reference | length_normalized (default) | uses_label_smoothing | scored (f-DPO) | form |
|---|---|---|---|---|---|
| sigmoid | yes | no | yes | yes | margin |
| robust | yes | no | yes | yes | margin |
| hinge | yes | no | no | yes | margin |
| ipo | yes | yes | no | yes | margin |
| simpo | no | yes | yes | yes (CPO's AlphaPO) | margin |
| exo_pair | yes | no | yes | yes | margin |
| nca_pair, bco_pair, sppo_hard, apo_zero, apo_down | yes | no | no | no | logratios |
| aot, aot_unpaired | yes | no | yes | no | sorted (couples the batch) |
| discopop | yes | no | no | yes | margin |
| sigmoid_norm | yes | yes | no | yes | margin |
| orpo | no | yes | no | no | odds |
| sft | no | (any) | no | yes | nll |

f-divergence DPO (Wang et al. 2023, "Beyond Reverse KL"; TRL's ``f_divergence_type``): the
log-ratios ``lr = pi - ref`` of chosen and rejected are replaced by the score ``s(lr) = f'(u)``,
``u = pi / pi_ref``, of the generator ``f`` of a registry divergence (so ``kl`` is ``u log u``
here as in :func:`fdiv_kernels.loss`) before the difference (``h = s(lr_c) - s(lr_r)``), for the
loss types marked ``scored`` (TRL's list; without a reference, ``lr = pi``: CPO's AlphaPO reward
``(1 - p^-a) / a`` is the ``alpha`` score with ``alpha = 1 - a``). TRL names the direction from the policy, so its names differ
(:data:`TRL_F_DIVERGENCES` maps them):

| divergence | f(u) | s(lr) (up to a constant) | TRL's ``f_divergence_type`` | TRL's code |
|---|---|---|---|---|
| kl (default: standard DPO) | u log u | lr | reverse_kl | same |
| reverse_kl | -log u | 1 - exp(-lr) | forward_kl | unclamped exp: inf/NaN once -lr > 88 (fp32) |
| js | Jensen-Shannon | log 2 + logsigmoid(lr) | js_divergence | same (already stable) |
| alpha (``alpha=a``) | Amari alpha | (exp((a-1) lr) - 1) / (a-1) | alpha_divergence | exponent clamped at 80 |

Here ``exp(x)`` in reverse_kl and alpha is evaluated exactly for ``x <= 50`` and continued
linearly above (value and slope matched at 50), in float64: equal to TRL's values wherever the
exponent is at most 50, finite with a non-zero gradient beyond. ``ipo`` squares the score, so
for it the knee is 30 and the continuation logarithmic (``e^30 (1 + log1p(x - 30))``, at most
``e^30 * 90``): its loss and gradient stay within float32 for any log-ratio.

The formulas take their options as one object (:class:`fdiv_kernels.specs.DPOSpec`, or anything
with the attributes ``components`` (``((loss_type, weight), ...)``), ``beta, label_smoothing,
gamma, alpha, discopop_tau`` and ``score``, a :class:`PreferenceScore`). :func:`pair_losses` gives
the per-pair losses, :func:`pair_loss_grads` their closed-form derivatives in ``pi_c``, ``pi_r``,
``ref_c`` and ``ref_r`` (the ``sft`` term's are per token: the spec's). Without a reference
(``rc = rr = None``: simpo, orpo, sft, or a reference-free spec) the log-ratios are the
policy's log-probs.

KTO (TRL's ``KTOTrainer``; unpaired rows, each desirable or not): with ``u = beta (pi - ref -
z)``, ``z`` the detached batch KL estimate (0 for ``apo_zero_unpaired``), a desirable row's loss
is ``w_d sig(-u)``, an undesirable one's ``w_u sig(u)`` (:func:`kto_losses`, :func:`kto_loss_grads`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .stable import dexp_linear_tail, dexp_log_tail, exp_linear_tail, exp_log_tail

__all__ = ["DPO_LOSS_TYPES", "DPOLossType", "KTO_LOSS_TYPES", "PreferenceScore", "TRL_F_DIVERGENCES",
           "explain_pair", "kto_loss_grads", "kto_losses", "nll_weight", "pair_loss_grads",
           "pair_losses"]


class DPOLossType(NamedTuple):
    """One row of :data:`DPO_LOSS_TYPES`: what a DPO loss type needs and reads."""

    name: str
    needs_reference: bool     #: uses ``ref_chosen``/``ref_rejected`` (simpo, orpo and sft do not)
    length_normalized: bool   #: default ``length_normalize``: mean (not summed) log-probs, as TRL does
    uses_label_smoothing: bool  #: reads ``label_smoothing``
    scored: bool = True       #: takes the f-DPO score of a ``divergence`` other than ``kl``
    form: str = "margin"      #: margin (of ``h``), logratios, sorted (couples the batch), odds, nll (a token term)


DPO_LOSS_TYPES: Dict[str, DPOLossType] = {t.name: t for t in (
    DPOLossType("sigmoid", True, False, True),
    DPOLossType("robust", True, False, True),
    DPOLossType("hinge", True, False, False),
    DPOLossType("ipo", True, True, False),
    DPOLossType("simpo", False, True, True),
    DPOLossType("exo_pair", True, False, True),
    DPOLossType("nca_pair", True, False, False, False, "logratios"),
    DPOLossType("bco_pair", True, False, False, False, "logratios"),
    DPOLossType("sppo_hard", True, False, False, False, "logratios"),
    DPOLossType("aot", True, False, True, False, "sorted"),
    DPOLossType("aot_unpaired", True, False, True, False, "sorted"),
    DPOLossType("apo_zero", True, False, False, False, "logratios"),
    DPOLossType("apo_down", True, False, False, False, "logratios"),
    DPOLossType("discopop", True, False, False),
    DPOLossType("sigmoid_norm", True, True, False),
    DPOLossType("orpo", False, True, False, False, "odds"),
    DPOLossType("sft", False, False, False, True, "nll"),
)}
#: KTO's loss types (TRL's ``KTOConfig.loss_type``), plus ``sft`` (the NLL of the desirable rows)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired", "sft")
#: TRL's ``f_divergence_type`` names -> registry names
TRL_F_DIVERGENCES = {"reverse_kl": "kl", "forward_kl": "reverse_kl", "js_divergence": "js",
                     "alpha_divergence": "alpha"}
_EXP_KNEE = 50.0
_EXP_KNEE_IPO = 30.0


_LN2 = math.log(2.0)


def _exp_grow(x: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``exp`` of the f-DPO scores, finite for any ``x`` (module docstring)."""
    return exp_log_tail(x, _EXP_KNEE_IPO) if loss_type == "ipo" else exp_linear_tail(x, _EXP_KNEE)


def _dexp_grow(x: torch.Tensor, loss_type: str) -> torch.Tensor:
    return dexp_log_tail(x, _EXP_KNEE_IPO) if loss_type == "ipo" else dexp_linear_tail(x, _EXP_KNEE)


@dataclass(frozen=True)
class PreferenceScore:
    """The f-DPO score ``s(lr, alpha, loss_type)`` of a divergence and its derivative in ``lr``."""

    name: str
    score: Callable[[torch.Tensor, float, str], torch.Tensor]
    dscore: Callable[[torch.Tensor, float, str], torch.Tensor]

    def __reduce__(self):  # a built-in entry pickles by name (its functions are lambdas)
        return (_builtin, (self.name,)) if DPO_SCORES.get(self.name) is self else super().__reduce__()


def _builtin(name: str) -> PreferenceScore:
    return DPO_SCORES[name]


def _alpha_score(lr: torch.Tensor, a: float, loss_type: str) -> torch.Tensor:
    return lr if abs(a - 1.0) < 1e-6 else (_exp_grow((a - 1) * lr, loss_type) - 1) / (a - 1)


def _alpha_dscore(lr: torch.Tensor, a: float, loss_type: str) -> torch.Tensor:
    return torch.ones_like(lr) if abs(a - 1.0) < 1e-6 else _dexp_grow((a - 1) * lr, loss_type)


#: the f-DPO scores by the registry name of their divergence (:mod:`.divergences` attaches them)
DPO_SCORES: Dict[str, PreferenceScore] = {s.name: s for s in (
    PreferenceScore("kl", lambda lr, a, t: lr, lambda lr, a, t: torch.ones_like(lr)),
    PreferenceScore("reverse_kl", lambda lr, a, t: 1 - _exp_grow(-lr, t), lambda lr, a, t: _dexp_grow(-lr, t)),
    PreferenceScore("js", lambda lr, a, t: math.log(2) + F.logsigmoid(lr), lambda lr, a, t: torch.sigmoid(-lr)),
    PreferenceScore("alpha", _alpha_score, _alpha_dscore),
)}


def _smoothing(options, loss_type: str) -> float:
    return options.label_smoothing if DPO_LOSS_TYPES[loss_type].uses_label_smoothing else 0.0


def nll_weight(options) -> float:
    """The weight of the ``sft`` term (the NLL of the chosen answers) among ``options.components``."""
    return sum(w for t, w in options.components if t == "sft")


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) logsigmoid(x) - eps logsigmoid(-x)``; the eps term is left out when eps = 0 (so an
    infinite ``x`` gives the limit, not ``0 * inf``)."""
    out = -(1 - eps) * F.logsigmoid(x)
    return out - eps * F.logsigmoid(-x) if eps else out


def _dsmoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``d/dx`` of :func:`_smoothed`: ``-(1-eps) sigmoid(-x) + eps sigmoid(x)``."""
    out = -(1 - eps) * torch.sigmoid(-x)
    return out + eps * torch.sigmoid(x) if eps else out


def _exo(x: torch.Tensor, eps: float) -> torch.Tensor:
    """EXO's ``KL(sig(x), 1 - eps)``: ``q (log q - log(1-eps)) + (1-q) (log(1-q) - log eps)``,
    ``q = sig(x)``; a vanishing ``q`` contributes 0 (its limit) also at ``x = -inf``, and autograd
    sees no ``0 * inf`` (the vanished branch is evaluated at 0)."""
    zero = x.new_zeros(())
    keep_w, keep_l = torch.sigmoid(x) != 0, torch.sigmoid(-x) != 0  # NaN stays NaN
    xw, xl = torch.where(keep_w, x, zero), torch.where(keep_l, x, zero)
    return (torch.where(keep_w, torch.sigmoid(xw) * (F.logsigmoid(xw) - math.log1p(-eps)), zero)
            + torch.where(keep_l, torch.sigmoid(-xl) * (F.logsigmoid(-xl) - math.log(eps)), zero))


def _dexo(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``d/dx`` of :func:`_exo`: ``sig(x) sig(-x) (x - log((1-eps)/eps))`` (0 at ``x = +-inf``)."""
    w = torch.sigmoid(x) * torch.sigmoid(-x)
    return torch.where(w != 0, w * (x - (math.log1p(-eps) - math.log(eps))), x.new_zeros(()))


def _discopop(x: torch.Tensor, tau: float) -> torch.Tensor:
    """DiscoPOP's ``-logsigmoid(x) (1 - m) + exp(-x) m``, ``m = sig(x / tau)``; ``exp(-x) m =
    exp(-x + logsigmoid(x / tau))`` continued logarithmically above an exponent of 50 (at most
    ``e^50 * 90``: float32 holds it for any margin, also with ``tau > 1``, where it grows)."""
    return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + exp_log_tail(-x + F.logsigmoid(x / tau), _EXP_KNEE)


def _ddiscopop(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``d/dx`` of :func:`_discopop`."""
    m, mc = torch.sigmoid(x / tau), torch.sigmoid(-x / tau)
    return (-torch.sigmoid(-x) * mc + F.logsigmoid(x) * m * mc / tau
            + dexp_log_tail(-x + F.logsigmoid(x / tau), _EXP_KNEE) * (mc / tau - 1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0`` (-inf at 0), without cancellation (branch at ``-log 2``)."""
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(torch.minimum(x, torch.full_like(x, -_LN2)))),
                       torch.log(-torch.expm1(torch.maximum(x, torch.full_like(x, -_LN2)))))


def _log_odds(x: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = e^x`` (+inf at ``x = 0``)."""
    return x - _log1mexp(x)


def _orpo_value(pc: torch.Tensor, pr: torch.Tensor, beta: float) -> torch.Tensor:
    c, r = pc.double(), pr.double()
    return (-beta * F.logsigmoid(_log_odds(c) - _log_odds(r))).to(pc.dtype)


class _Orpo(torch.autograd.Function):
    """ORPO's odds-ratio loss, differentiated by :func:`_dorpo` (autograd through ``log1mexp`` would
    meet ``0 * inf`` at a chosen answer of probability 1, where the loss has its limit 0)."""

    @staticmethod
    def forward(ctx, pc, pr, beta):
        ctx.save_for_backward(pc, pr)
        ctx.beta = beta
        return _orpo_value(pc, pr, beta)

    @staticmethod
    def backward(ctx, grad):
        pc, pr = ctx.saved_tensors
        d_c, d_r = _dorpo(pc, pr, ctx.beta)
        return grad * d_c, grad * d_r, None


def _orpo(pc: torch.Tensor, pr: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio loss ``-beta logsigmoid(o(pc) - o(pr))`` (in float64)."""
    return _Orpo.apply(pc, pr, beta)


def _dorpo(pc: torch.Tensor, pr: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``d/dpc`` and ``d/dpr`` of :func:`_orpo`, in log space: ``-beta / ((1 - p_c) + p_c e^{-o_r})``
    and ``beta / ((1 - p_r) + e^{o_c} (1 - p_r)^2 / p_r)`` (finite where the loss is, 0 in its
    limits ``p_c -> 1`` and ``p_r -> 0``)."""
    c, r = pc.double(), pr.double()
    lc, lr_ = _log1mexp(c), _log1mexp(r)
    oc, orr = c - lc, r - lr_
    d_c = -beta * torch.exp(-torch.logaddexp(lc, c - orr))
    d_r = beta * torch.exp(-torch.logaddexp(lr_, oc + 2 * lr_ - r))
    return d_c.to(pc.dtype), d_r.to(pc.dtype)


def _refs(pc: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor], loss_type: str):
    """The references a loss type reads: zeros for a type without one or when none is given."""
    if rc is None or not DPO_LOSS_TYPES[loss_type].needs_reference:
        z = torch.zeros_like(pc)
        return z, z
    return rc, rr


def _margin(pc, pr, rc, rr, options, loss_type: str
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(h, s'(lr_c), s'(lr_r))``: the score margin ``h = s(lr_c) - s(lr_r)`` and, for an f-DPO
    score, its derivatives (``None`` for the plain ``kl`` score, whose derivative is 1)."""
    rc, rr = _refs(pc, rc, rr, loss_type)
    if options.score.name == "kl":
        return (pc - pr) - (rc - rr), None, None
    lr_c, lr_r = (pc - rc).double(), (pr - rr).double()
    s, a = options.score, options.alpha
    h = (s.score(lr_c, a, loss_type) - s.score(lr_r, a, loss_type)).to(pc.dtype)
    return h, s.dscore(lr_c, a, loss_type).to(pc.dtype), s.dscore(lr_r, a, loss_type).to(pc.dtype)


def _margin_loss(loss_type: str, h: torch.Tensor, options) -> torch.Tensor:
    beta, eps = options.beta, _smoothing(options, loss_type)
    x = beta * h
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return _smoothed(x, eps)
    if loss_type == "simpo":
        return _smoothed(x - options.gamma, eps)
    if loss_type == "robust":
        out = -(1 - eps) * F.logsigmoid(x)
        return (out + eps * F.logsigmoid(-x) if eps else out) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        return _exo(x, eps)
    return _discopop(x, options.discopop_tau)


def _dmargin(loss_type: str, h: torch.Tensor, options) -> torch.Tensor:
    """``d loss / dh`` of a margin type (hinge: the subgradient 0 at its kink)."""
    beta, eps = options.beta, _smoothing(options, loss_type)
    x = beta * h
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return beta * _dsmoothed(x, eps)
    if loss_type == "simpo":
        return beta * _dsmoothed(x - options.gamma, eps)
    if loss_type == "robust":
        out = -(1 - eps) * torch.sigmoid(-x)
        return beta * (out - eps * torch.sigmoid(x) if eps else out) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.where(1 - x > 0, torch.full_like(h, -beta), torch.zeros_like(h))
    if loss_type == "ipo":
        return 2 * (h - 1 / (2 * beta))
    if loss_type == "exo_pair":
        return beta * _dexo(x, eps)
    return beta * _ddiscopop(x, options.discopop_tau)


def _logratio_loss(loss_type: str, a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """The types on the chosen (``a``) and rejected (``b``) log-ratios themselves."""
    ra, rb = beta * a, beta * b
    if loss_type == "nca_pair":
        return -F.logsigmoid(ra) - 0.5 * F.logsigmoid(-ra) - 0.5 * F.logsigmoid(-rb)
    if loss_type == "bco_pair":
        return -F.logsigmoid(ra) - F.logsigmoid(-rb)
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return torch.sigmoid(-ra) + torch.sigmoid(rb)
    return torch.sigmoid(ra) + torch.sigmoid(-beta * (a - b))  # apo_down


def _dlogratio(loss_type: str, a: torch.Tensor, b: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d loss / da, d loss / db)`` of :func:`_logratio_loss`."""
    ra, rb = beta * a, beta * b
    if loss_type == "nca_pair":
        return beta * (0.5 * torch.sigmoid(ra) - torch.sigmoid(-ra)), 0.5 * beta * torch.sigmoid(rb)
    if loss_type == "bco_pair":
        return -beta * torch.sigmoid(-ra), beta * torch.sigmoid(rb)
    if loss_type == "sppo_hard":
        return 2 * (a - 0.5 / beta), 2 * (b + 0.5 / beta)
    if loss_type == "apo_zero":
        return -beta * torch.sigmoid(ra) * torch.sigmoid(-ra), beta * torch.sigmoid(rb) * torch.sigmoid(-rb)
    d = beta * (a - b)
    w = beta * torch.sigmoid(d) * torch.sigmoid(-d)
    return beta * torch.sigmoid(ra) * torch.sigmoid(-ra) - w, w


def _sorted_inputs(loss_type: str, pc, pr, rc, rr) -> Tuple[torch.Tensor, torch.Tensor]:
    """What aot sorts: the policy's and the reference's chosen-minus-rejected log-probs; aot_unpaired
    the chosen and the rejected log-ratios."""
    return (pc - pr, rc - rr) if loss_type == "aot" else (pc - rc, pr - rr)


def _sorted_loss(loss_type: str, pc, pr, rc, rr, options) -> torch.Tensor:
    """``S(beta (sort(x)_i - sort(y)_i))`` per rank ``i`` (stable sorts over the batch)."""
    x, y = _sorted_inputs(loss_type, pc, pr, rc, rr)
    delta = torch.sort(x, dim=0, stable=True).values - torch.sort(y, dim=0, stable=True).values
    return _smoothed(options.beta * delta, _smoothing(options, loss_type))


def _dsorted(loss_type: str, pc, pr, rc, rr, options):
    """``(d/dpc, d/dpr, d/drc, d/drr)`` of the sum of :func:`_sorted_loss` over ranks: rank ``i``'s
    derivative goes back to the pair the stable sort put there (as torch.sort's backward does)."""
    x, y = _sorted_inputs(loss_type, pc, pr, rc, rr)
    sx, ix = torch.sort(x, dim=0, stable=True)
    sy, iy = torch.sort(y, dim=0, stable=True)
    g = options.beta * _dsmoothed(options.beta * (sx - sy), _smoothing(options, loss_type))
    gx = torch.zeros_like(g).scatter(0, ix, g)
    gy = -torch.zeros_like(g).scatter(0, iy, g)
    return (gx, -gx, gy, -gy) if loss_type == "aot" else (gx, gy, -gx, -gy)


def pair_losses(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                options, nll: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pair losses ``[B]``: ``sum_k w_k loss_k`` over ``options.components`` (module table; the
    sorted types per rank, as TRL). ``nll``: the 0-d mean NLL of the chosen answers' tokens, which
    the ``sft`` term adds to every pair (required when it is among the components)."""
    total = None
    for t, w in options.components:
        form = DPO_LOSS_TYPES[t].form
        if w == 0:
            continue
        if form == "nll":
            if nll is None:
                raise ValueError("loss_type 'sft' (the NLL of the chosen answers) needs their tokens: pass "
                                 "chosen_tokens= (fk.dpo_loss) or use the fused module")
            part = nll * torch.ones_like(pc)
        elif form == "margin":
            part = _margin_loss(t, _margin(pc, pr, rc, rr, options, t)[0], options)
        elif form == "logratios":
            c, r = _refs(pc, rc, rr, t)
            part = _logratio_loss(t, pc - c, pr - r, options.beta)
        elif form == "sorted":
            part = _sorted_loss(t, pc, pr, *_refs(pc, rc, rr, t), options)
        else:
            part = _orpo(pc, pr, options.beta)
        part = part if w == 1 else w * part
        total = part if total is None else total + part
    return torch.zeros_like(pc) if total is None else total


def pair_loss_grads(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                    options) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d/dpc, d/dpr, d/drc, d/drr)`` of the sum of :func:`pair_losses` over pairs, closed form
    (the ``sft`` term's derivatives are per token, the spec's; hinge takes the subgradient 0 at its
    kink). The reference's are ``None`` without one."""
    acc = None
    for t, w in options.components:
        form = DPO_LOSS_TYPES[t].form
        if w == 0 or form == "nll":
            continue
        if form == "margin":
            h, ds_c, ds_r = _margin(pc, pr, rc, rr, options, t)
            dh = _dmargin(t, h, options)
            gc, gr = (dh, -dh) if ds_c is None else (dh * ds_c, -dh * ds_r)
            parts = (gc, gr, None, None)  # the references': their negatives (filled in below)
        elif form == "logratios":
            c, r = _refs(pc, rc, rr, t)
            da, db = _dlogratio(t, pc - c, pr - r, options.beta)
            parts = (da, db, None, None)
        elif form == "sorted":
            parts = _dsorted(t, pc, pr, *_refs(pc, rc, rr, t), options)
        else:
            parts = _dorpo(pc, pr, options.beta) + (0, 0)
        if rc is not None and DPO_LOSS_TYPES[t].needs_reference and parts[2] is None:
            parts = (parts[0], parts[1], -parts[0], -parts[1])
        elif rc is None or not DPO_LOSS_TYPES[t].needs_reference:
            parts = (parts[0], parts[1], 0, 0)
        parts = parts if w == 1 else tuple(w * q for q in parts)
        acc = parts if acc is None else tuple(x + q for x, q in zip(acc, parts))
    zero = torch.zeros_like(pc)
    acc = (zero, zero, zero, zero) if acc is None else tuple(zero if isinstance(q, int) else q for q in acc)
    return (acc[0], acc[1], None, None) if rc is None else acc


def kto_losses(logratio: torch.Tensor, desirable: torch.Tensor, options) -> torch.Tensor:
    """Per-row KTO losses ``[B]`` (without the ``sft`` term): ``w_d sig(-u)`` for a desirable row,
    ``w_u sig(u)`` for an undesirable one, ``u = beta * logratio`` (``logratio = pi - ref - z``,
    ``z`` the detached KL estimate, 0 for ``apo_zero_unpaired``), times the type's weight."""
    u = options.beta * logratio
    w = sum(wt for t, wt in options.components if t != "sft")
    per = torch.where(desirable, options.desirable_weight * torch.sigmoid(-u),
                      options.undesirable_weight * torch.sigmoid(u))
    return per if w == 1 else w * per


def kto_loss_grads(logratio: torch.Tensor, desirable: torch.Tensor, options) -> torch.Tensor:
    """``d loss_i / d logratio_i`` of :func:`kto_losses`: ``beta sig(u) sig(-u)`` times ``-w_d`` or ``w_u``."""
    u = options.beta * logratio
    w = sum(wt for t, wt in options.components if t != "sft")
    side = torch.where(desirable, torch.full_like(u, -options.desirable_weight),
                       torch.full_like(u, options.undesirable_weight))
    return w * options.beta * torch.sigmoid(u) * torch.sigmoid(-u) * side


def explain_pair(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                 losses: torch.Tensor, options,
                 names=("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")) -> Optional[str]:
    """Why the first non-finite pair loss is not finite (for the data checks), or None."""
    pc, pr, losses = pc.detach(), pr.detach(), losses.detach()
    rc = None if rc is None else rc.detach()
    rr = None if rr is None else rr.detach()
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    loss = float(losses[i])
    types = tuple(t for t, _ in options.components)
    loss_type = "+".join(types)
    needs_ref = options.needs_reference
    given = [(n, t) for n, t in zip(names, (pc, pr, rc, rr)) if t is not None and (needs_ref or n in names[:2])]
    if any(DPO_LOSS_TYPES[t].form == "sorted" for t in types):  # losses per rank: name the pair of the input
        odd = [int(j) for j in (~torch.isfinite(torch.stack([t for _, t in given]))).any(dim=0).nonzero()[:1]]
        i = odd[0] if odd else i
    nonfinite = [(n, float(t[i])) for n, t in given if not math.isfinite(float(t[i]))]
    if "orpo" in types and not any(math.isnan(v) for _, v in nonfinite):
        for n, t in given[:2]:
            v = float(t[i])
            if v >= 0 and (n == names[1] or v > 0):
                return (f"pair {i}: {n} = {v:g}: orpo's odds need mean log-probs < 0 (a rejected answer of "
                        f"probability 1 has infinite odds, so the loss is +inf)")
    if not nonfinite:
        return (f"pair {i}: the {loss_type} loss is {loss} for finite log-probs "
                f"({', '.join(f'{n}={float(t[i]):g}' for n, t in given)}): it overflows float32; lower beta")
    what = ", ".join(f"{n} = {v}" for n, v in nonfinite)
    if any(math.isnan(v) for _, v in nonfinite):
        return f"pair {i}: {what} (NaN input)"
    refs = [v for n, v in nonfinite if n in names[2:]]
    if len(refs) == 2 and refs[0] == refs[1]:
        return f"pair {i}: {what}: the reference log-ratio is undefined (inf - inf)"
    hint = ("; label_smoothing > 0 turns an infinite margin into an infinite loss"
            if any(_smoothing(options, t) for t in types) else "; the limit of the loss is not finite there")
    return f"pair {i}: {what} gives the {loss_type} loss {loss}{hint}"

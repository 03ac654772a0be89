"""DPO-family losses on sequence log-probs (TRL's formulas, evaluated in log space), with their
closed-form derivatives.

With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (differences of sequence log-probs):

| loss_type | per-pair loss                                                               |
|----------|-----------------------------------------------------------------------------|
| sigmoid  | ``-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``                    |
| robust   | ``(-(1-eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)``     |
| hinge    | ``relu(1 - beta h)``                                                        |
| ipo      | ``(h - 1/(2 beta))**2`` (TRL feeds it length-averaged log-probs)             |
| simpo    | ``-(1-eps) logsigmoid(beta d - gamma) - eps logsigmoid(-(beta d - gamma))``, ``d = pi_c - pi_r`` (no reference; TRL's ``simpo_gamma`` = ``gamma``; feed length-averaged log-probs) |

``eps`` is ``label_smoothing``. ``logsigmoid`` is finite for any argument, so the loss and its
gradient are finite for log-ratios of any size.

What each loss type needs is one table, :data:`DPO_LOSS_TYPES`:

| loss_type | needs_reference | length_normalized (default) | uses_label_smoothing |
|---|---|---|---|
| sigmoid | yes | no | yes |
| robust | yes | no | yes |
| hinge | yes | no | no |
| ipo | yes | yes | no |
| simpo | no | yes | yes |

f-divergence DPO (Wang et al. 2023, "Beyond Reverse KL"; TRL's ``f_divergence_type``): the
log-ratios ``lr = pi - ref`` of chosen and rejected are replaced by the score ``s(lr) = f'(u)``,
``u = pi / pi_ref``, of the generator ``f`` of a registry divergence (so ``kl`` is ``u log u``
here as in :func:`fdiv_kernels.loss`) before the difference (``h = s(lr_c) - s(lr_r)``), for loss
types sigmoid, robust, hinge, ipo. TRL names the direction from the policy, so its names differ
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
with the attributes ``loss_type, beta, label_smoothing, gamma, alpha`` and ``score``, a
:class:`PreferenceScore`). :func:`pair_losses` gives the per-pair losses, :func:`pair_loss_grads`
their derivatives in ``pi_c`` and ``pi_r`` (those in ``ref_c``, ``ref_r`` are their negatives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .stable import dexp_linear_tail, dexp_log_tail, exp_linear_tail, exp_log_tail

__all__ = ["DPO_LOSS_TYPES", "DPOLossType", "PreferenceScore", "TRL_F_DIVERGENCES", "explain_pair",
           "pair_loss_grads", "pair_losses"]


class DPOLossType(NamedTuple):
    """One row of :data:`DPO_LOSS_TYPES`: what a DPO loss type needs and reads."""

    name: str
    needs_reference: bool     #: uses ``ref_chosen``/``ref_rejected`` (simpo does not)
    length_normalized: bool   #: default ``length_normalize``: mean (not summed) log-probs, as TRL does
    uses_label_smoothing: bool  #: reads ``label_smoothing`` (hinge and ipo ignore it)


DPO_LOSS_TYPES: Dict[str, DPOLossType] = {t.name: t for t in (
    DPOLossType("sigmoid", True, False, True),
    DPOLossType("robust", True, False, True),
    DPOLossType("hinge", True, False, False),
    DPOLossType("ipo", True, True, False),
    DPOLossType("simpo", False, True, True),
)}
#: TRL's ``f_divergence_type`` names -> registry names
TRL_F_DIVERGENCES = {"reverse_kl": "kl", "forward_kl": "reverse_kl", "js_divergence": "js",
                     "alpha_divergence": "alpha"}
_EXP_KNEE = 50.0
_EXP_KNEE_IPO = 30.0


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


def _smoothing(options) -> float:
    return options.label_smoothing if DPO_LOSS_TYPES[options.loss_type].uses_label_smoothing else 0.0


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) logsigmoid(x) - eps logsigmoid(-x)``; the eps term is left out when eps = 0 (so an
    infinite ``x`` gives the limit, not ``0 * inf``)."""
    out = -(1 - eps) * F.logsigmoid(x)
    return out - eps * F.logsigmoid(-x) if eps else out


def _dsmoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``d/dx`` of :func:`_smoothed`: ``-(1-eps) sigmoid(-x) + eps sigmoid(x)``."""
    out = -(1 - eps) * torch.sigmoid(-x)
    return out + eps * torch.sigmoid(x) if eps else out


def _margin(pc, pr, rc, rr, options) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(h, s'(lr_c), s'(lr_r))``: the margin of the reference loss types and, for an f-DPO score,
    the score's derivatives (``None`` for the plain ``kl`` score, whose derivative is 1)."""
    if options.score.name == "kl":
        return (pc - pr) - (rc - rr), None, None
    lr_c, lr_r = (pc - rc).double(), (pr - rr).double()
    s, t = options.score, options.loss_type
    h = (s.score(lr_c, options.alpha, t) - s.score(lr_r, options.alpha, t)).to(pc.dtype)
    return h, s.dscore(lr_c, options.alpha, t).to(pc.dtype), s.dscore(lr_r, options.alpha, t).to(pc.dtype)


def pair_losses(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                options) -> torch.Tensor:
    """Per-pair losses ``[B]`` of the module table (``rc``/``rr`` unused by simpo)."""
    eps, beta, loss_type = _smoothing(options), options.beta, options.loss_type
    if loss_type == "simpo":
        return _smoothed(beta * (pc - pr) - options.gamma, eps)
    h = _margin(pc, pr, rc, rr, options)[0]
    if loss_type == "sigmoid":
        return _smoothed(beta * h, eps)
    if loss_type == "robust":
        out = -(1 - eps) * F.logsigmoid(beta * h)
        return (out + eps * F.logsigmoid(-beta * h) if eps else out) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2  # ipo


def _dloss_dmargin(h: torch.Tensor, options) -> torch.Tensor:
    """``d loss / dh`` of the reference loss types."""
    eps, beta, loss_type = _smoothing(options), options.beta, options.loss_type
    if loss_type == "sigmoid":
        return beta * _dsmoothed(beta * h, eps)
    if loss_type == "robust":
        out = -(1 - eps) * torch.sigmoid(-beta * h)
        return beta * (out - eps * torch.sigmoid(beta * h) if eps else out) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.where(1 - beta * h > 0, torch.full_like(h, -beta), torch.zeros_like(h))
    return 2 * (h - 1 / (2 * beta))  # ipo


def pair_loss_grads(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                    options) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d loss_i / d pc_i, d loss_i / d pr_i)`` per pair, closed form (the derivatives in
    ``rc_i``, ``rr_i`` are their negatives; hinge takes the subgradient 0 at its kink)."""
    if options.loss_type == "simpo":
        d = options.beta * _dsmoothed(options.beta * (pc - pr) - options.gamma, _smoothing(options))
        return d, -d
    h, ds_c, ds_r = _margin(pc, pr, rc, rr, options)
    dh = _dloss_dmargin(h, options)
    if ds_c is None:
        return dh, -dh
    return dh * ds_c, -dh * ds_r


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
    loss, loss_type = float(losses[i]), options.loss_type
    needs_ref = DPO_LOSS_TYPES[loss_type].needs_reference
    given = [(n, t) for n, t in zip(names, (pc, pr, rc, rr)) if t is not None and (needs_ref or n in names[:2])]
    nonfinite = [(n, float(t[i])) for n, t in given if not math.isfinite(float(t[i]))]
    if not nonfinite:
        return (f"pair {i}: the {loss_type} loss is {loss} for finite log-probs "
                f"({', '.join(f'{n}={float(t[i]):g}' for n, t in given)}): it overflows float32; lower beta")
    what = ", ".join(f"{n} = {v}" for n, v in nonfinite)
    if any(math.isnan(v) for _, v in nonfinite):
        return f"pair {i}: {what} (NaN input)"
    refs = [v for n, v in nonfinite if n in names[2:]]
    if len(refs) == 2 and refs[0] == refs[1]:
        return f"pair {i}: {what}: the reference log-ratio is undefined (inf - inf)"
    hint = ("; label_smoothing > 0 turns an infinite margin into an infinite loss" if _smoothing(options) else
            "; the limit of the loss is not finite there")
    return f"pair {i}: {what} gives the {loss_type} loss {loss}{hint}"

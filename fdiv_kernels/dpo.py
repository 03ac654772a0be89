"""DPO-family losses on sequence log-probs (TRL's formulas, evaluated in log space).

With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (differences of sequence log-probs):

| kind     | per-pair loss                                                               |
|----------|-----------------------------------------------------------------------------|
| sigmoid  | ``-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``                    |
| robust   | ``(-(1-eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)``     |
| hinge    | ``relu(1 - beta h)``                                                        |
| ipo      | ``(h - 1/(2 beta))**2`` (TRL feeds it length-averaged log-probs)             |
| simpo    | ``-(1-eps) logsigmoid(beta d - gamma) - eps logsigmoid(-(beta d - gamma))``, ``d = pi_c - pi_r`` (no reference; TRL's ``simpo_gamma`` = ``gamma``; feed length-averaged log-probs) |

``eps`` is ``label_smoothing``. ``logsigmoid`` is finite for any argument, so the loss and its
gradient are finite for log-ratios of any size.

f-divergence DPO (TRL's ``f_divergence_type``; Wang et al. 2023, "Beyond Reverse KL"): the
log-ratios ``lr = pi - ref`` of chosen and rejected are replaced by scores ``s(lr)`` before the
difference (``h = s(lr_c) - s(lr_r)``), for kinds sigmoid, robust, hinge, ipo:

| f_divergence | s(lr) | TRL's code |
|---|---|---|
| reverse_kl | lr | same |
| forward_kl | 1 - exp(-lr) | unclamped exp: inf/NaN once -lr > 88 (fp32) |
| js | log 2 + logsigmoid(lr) | same (already stable) |
| alpha | (exp((a-1) lr) - 1) / (a-1) | exponent clamped at 80: zero gradient beyond |

Here ``exp(x)`` in forward_kl and alpha is evaluated exactly for ``x <= 50`` and continued
linearly above (value and slope matched at 50), in float64: equal to TRL's values wherever the
exponent is at most 50, finite with a non-zero gradient beyond. ``ipo`` squares the score, so
for it the knee is 30 and the continuation logarithmic (``e^30 (1 + log1p(x - 30))``, at most
``e^30 * 90``): its loss and gradient stay within float32 for any log-ratio (TRL's overflow once
the exponent passes about 44).

Non-finite inputs: the loss is the exact limit where it is finite (e.g. ``ref_chosen = -inf``,
an infinite margin, gives the sigmoid loss 0 with a zero gradient when ``label_smoothing = 0``);
NaN, and infinite inputs whose limit is not finite (``-inf - -inf``, ``label_smoothing > 0`` with
an infinite margin, ipo), raise a ``ValueError`` naming the argument and the pair (data checks,
:mod:`fdiv_kernels._checks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from .divergences import exp_linear_tail, exp_log_tail

DPO_KINDS = ("sigmoid", "robust", "hinge", "ipo", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
_EXP_KNEE = 50.0
_EXP_KNEE_IPO = 30.0


def _exp_grow(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``exp`` of the f-DPO scores, finite for any ``x`` (module docstring): a linear tail above 50,
    a logarithmic one above 30 for ipo (whose loss is the square of the score)."""
    return exp_log_tail(x, _EXP_KNEE_IPO) if kind == "ipo" else exp_linear_tail(x, _EXP_KNEE)


def f_divergence_score(logratio: torch.Tensor, f_divergence: str = "reverse_kl", alpha: float = 1.0, *,
                       kind: str = "sigmoid") -> torch.Tensor:
    """TRL's f-DPO score ``s(lr)`` (see the module table), stable for any ``lr``; float64 math.
    ``kind`` chooses the continuation of ``exp`` (module docstring)."""
    lr = logratio.double()
    if f_divergence == "reverse_kl" or (f_divergence == "alpha" and abs(alpha - 1.0) < 1e-6):
        s = lr
    elif f_divergence == "forward_kl":
        s = 1 - _exp_grow(-lr, kind)
    elif f_divergence == "js":
        s = math.log(2) + F.logsigmoid(lr)
    elif f_divergence == "alpha":
        s = (_exp_grow((alpha - 1) * lr, kind) - 1) / (alpha - 1)
    else:
        raise ValueError(f"f_divergence={f_divergence!r} is not supported; choose one of {sorted(F_DIVERGENCES)}")
    return s


def check_options(*, kind: str, beta: float, label_smoothing: float, f_divergence: str, gamma: float = 0.0,
                  f_alpha: float = 1.0) -> None:
    """Validate DPO options (one place for :func:`dpo_loss`, the DPO spec and module)."""
    _checks.check_choice("kind", kind, DPO_KINDS)
    _checks.check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    if f_divergence != "reverse_kl" and kind == "simpo":
        raise ValueError("f_divergence applies to reference-based kinds (sigmoid, robust, hinge, ipo), not simpo")
    _checks.check_beta(beta)
    if not (_checks._is_real(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _checks.check_finite_number("gamma", gamma)
    _checks.check_finite_number("f_alpha", f_alpha)
    if f_divergence == "alpha" and not f_alpha > 0:
        raise ValueError(f"f_alpha must be > 0 for f_divergence='alpha', got {f_alpha}")


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) logsigmoid(x) - eps logsigmoid(-x)``; the eps term is left out when eps = 0 (so an
    infinite ``x`` gives the limit, not ``0 * inf``)."""
    out = -(1 - eps) * F.logsigmoid(x)
    return out - eps * F.logsigmoid(-x) if eps else out


def pair_losses(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor], *,
                kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                f_divergence: str = "reverse_kl", f_alpha: float = 1.0) -> torch.Tensor:
    """Per-pair losses ``[B]`` of the module table (inputs already validated; ``rc``/``rr`` unused by simpo)."""
    eps = label_smoothing
    if kind == "simpo":
        return _smoothed(beta * (pc - pr) - gamma, eps)
    if f_divergence == "reverse_kl":
        h = (pc - pr) - (rc - rr)
    else:
        h = (f_divergence_score(pc - rc, f_divergence, f_alpha, kind=kind)
             - f_divergence_score(pr - rr, f_divergence, f_alpha, kind=kind)).to(pc.dtype)
    if kind == "sigmoid":
        return _smoothed(beta * h, eps)
    if kind == "robust":
        out = -(1 - eps) * F.logsigmoid(beta * h)
        return (out + eps * F.logsigmoid(-beta * h) if eps else out) / (1 - 2 * eps)
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2  # ipo


def explain_pair(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                 losses: torch.Tensor, *, kind: str, label_smoothing: float,
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
    given = [(n, t) for n, t in zip(names, (pc, pr, rc, rr)) if t is not None and (kind != "simpo" or n in names[:2])]
    nonfinite = [(n, float(t[i])) for n, t in given if not math.isfinite(float(t[i]))]
    if not nonfinite:
        return (f"pair {i}: the {kind} loss is {loss} for finite log-probs "
                f"({', '.join(f'{n}={float(t[i]):g}' for n, t in given)}): it overflows float32; lower beta")
    what = ", ".join(f"{n} = {v}" for n, v in nonfinite)
    if any(math.isnan(v) for _, v in nonfinite):
        return f"pair {i}: {what} (NaN input)"
    refs = [v for n, v in nonfinite if n in names[2:]]
    if len(refs) == 2 and refs[0] == refs[1]:
        return f"pair {i}: {what}: the reference log-ratio is undefined (inf - inf)"
    hint = ("; label_smoothing > 0 turns an infinite margin into an infinite loss" if label_smoothing else
            "; the limit of the loss is not finite there")
    return f"pair {i}: {what} gives the {kind} loss {loss}{hint}"


@dataclass
class DPOOutput:
    """``loss``: mean over pairs. ``losses``: ``[B]``. ``chosen_rewards``/``rejected_rewards``:
    ``beta * (pi - ref)`` (``beta * pi`` for simpo), detached. ``accuracy``: fraction of pairs
    with chosen reward > rejected reward. ``margin``: mean reward margin."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: Optional[torch.Tensor] = None, ref_rejected: Optional[torch.Tensor] = None, *,
             beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.0,
             f_divergence: str = "reverse_kl", f_alpha: float = 1.0) -> DPOOutput:
    """DPO / IPO / hinge / robust DPO / SimPO loss on ``[B]`` sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-probs (e.g. from
            :func:`fdiv_kernels.sequence_logp`), with gradient.
        ref_chosen, ref_rejected: ``[B]`` reference log-probs; required except for ``simpo``.
        beta: inverse temperature (> 0). kind: one of ``sigmoid, robust, hinge, ipo, simpo``.
        label_smoothing: ``eps`` in [0, 0.5) (conservative DPO / robust DPO).
        gamma: SimPO's target margin (TRL's ``simpo_gamma``).
        f_divergence: ``reverse_kl`` (standard DPO), ``forward_kl``, ``js`` or ``alpha`` (with
            ``f_alpha``): TRL's f-DPO scores, evaluated stably (module docstring).
    """
    check_options(kind=kind, beta=beta, label_smoothing=label_smoothing, f_divergence=f_divergence, gamma=gamma,
                  f_alpha=f_alpha)
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected)):
        _checks.check_floating(name, t)
    if policy_chosen.shape != policy_rejected.shape:
        raise ValueError(f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
                         f"{tuple(policy_rejected.shape)} must have the same shape")
    if kind != "simpo":
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"kind={kind!r} needs ref_chosen and ref_rejected")
        for name, t in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            _checks.check_floating(name, t)
            if t.shape != policy_chosen.shape:
                raise ValueError(f"{name} must have shape {tuple(policy_chosen.shape)}, got {tuple(t.shape)}")
    _checks.check_same_device(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                              ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    pc = policy_chosen if policy_chosen.dtype == torch.float64 else policy_chosen.float()
    pr = policy_rejected if policy_rejected.dtype == torch.float64 else policy_rejected.float()
    rc = None if kind == "simpo" else ref_chosen.to(pc.dtype)
    rr = None if kind == "simpo" else ref_rejected.to(pc.dtype)
    losses = pair_losses(pc, pr, rc, rr, kind=kind, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                         f_divergence=f_divergence, f_alpha=f_alpha)
    if torch.compiler.is_compiling():  # the same check, inside a custom op (ops/compiled.py)
        from .ops.compiled import check_dpo
        losses = check_dpo(losses, pc, pr, rc, rr, kind, float(label_smoothing))
    elif _checks.finite_checks_enabled() and not bool(torch.isfinite(losses.detach()).all()):
        raise ValueError(explain_pair(pc, pr, rc, rr, losses, kind=kind, label_smoothing=label_smoothing))
    if kind == "simpo":
        chosen_r, rejected_r = beta * pc.detach(), beta * pr.detach()
    else:
        chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return DPOOutput(
        loss=losses.mean() if losses.numel() else losses.sum(),
        losses=losses,
        chosen_rewards=chosen_r,
        rejected_rewards=rejected_r,
        accuracy=(chosen_r > rejected_r).float().mean() if losses.numel() else losses.new_zeros(()),
        margin=(chosen_r - rejected_r).mean() if losses.numel() else losses.new_zeros(()),
    )

"""DPO-family losses on sequence log-probs (TRL's formulas, evaluated in log space).

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

What each loss type needs is one table, :data:`DPO_LOSS_TYPES` (read by :func:`dpo_loss`,
:class:`~fdiv_kernels.specs.DPOSpec`, :class:`fdiv_kernels.nn.FusedLinearDPOLoss`, the trainer and
the TRL integration):

| loss_type | needs_reference | length_normalized (default) | uses_label_smoothing |
|---|---|---|---|
| sigmoid | yes | no | yes |
| robust | yes | no | yes |
| hinge | yes | no | no |
| ipo | yes | yes | no |
| simpo | no | yes | yes |

f-divergence DPO (Wang et al. 2023, "Beyond Reverse KL"; TRL's ``f_divergence_type``): the
log-ratios ``lr = pi - ref`` of chosen and rejected are replaced by the score ``s(lr) = f'(u)``,
``u = pi / pi_ref``, of the generator ``f`` of a registry divergence (``divergence=``, the names
of :data:`fdiv_kernels.DIVERGENCE_REGISTRY`, so ``kl`` is ``u log u`` here as in
:func:`fdiv_kernels.loss`) before the difference (``h = s(lr_c) - s(lr_r)``), for loss types
sigmoid, robust, hinge, ipo. TRL names the direction from the policy, so its names differ:

| divergence | f(u) | s(lr) (up to a constant) | TRL's ``f_divergence_type`` | TRL's code |
|---|---|---|---|---|
| kl (default: standard DPO) | u log u | lr | reverse_kl | same |
| reverse_kl | -log u | 1 - exp(-lr) | forward_kl | unclamped exp: inf/NaN once -lr > 88 (fp32) |
| js | Jensen-Shannon | log 2 + logsigmoid(lr) | js_divergence | same (already stable) |
| alpha (``alpha=a``) | Amari alpha | (exp((a-1) lr) - 1) / (a-1) | alpha_divergence | exponent clamped at 80 |

The former arguments ``kind=`` (now ``loss_type=``), ``f_divergence=`` (TRL's names, now
``divergence=`` with the registry's) and ``f_alpha=`` (now ``alpha=``) still work and warn
(``DeprecationWarning``); :data:`TRL_F_DIVERGENCES` maps TRL's names to the registry's.

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
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks
from .divergences import exp_linear_tail, exp_log_tail, get_divergence


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
#: the loss type names (kept under its former name)
DPO_KINDS: Tuple[str, ...] = tuple(DPO_LOSS_TYPES)
#: TRL's ``f_divergence_type`` names (and this module's former ``f_divergence=`` names) -> registry names
TRL_F_DIVERGENCES = {"reverse_kl": "kl", "forward_kl": "reverse_kl", "js": "js", "js_divergence": "js",
                     "alpha": "alpha", "alpha_divergence": "alpha"}
#: the former ``f_divergence=`` names
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
_EXP_KNEE = 50.0
_EXP_KNEE_IPO = 30.0


def _exp_grow(x: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``exp`` of the f-DPO scores, finite for any ``x`` (module docstring): a linear tail above 50,
    a logarithmic one above 30 for ipo (whose loss is the square of the score)."""
    return exp_log_tail(x, _EXP_KNEE_IPO) if loss_type == "ipo" else exp_linear_tail(x, _EXP_KNEE)


def _alpha_score(lr: torch.Tensor, a: float, loss_type: str) -> torch.Tensor:
    return lr if abs(a - 1.0) < 1e-6 else (_exp_grow((a - 1) * lr, loss_type) - 1) / (a - 1)


#: the f-DPO scores ``s(lr, alpha, loss_type)`` by registry name (module table): an entry here is what
#: makes a registry entry support ``"dpo"``
DPO_SCORES: Dict[str, Callable[[torch.Tensor, float, str], torch.Tensor]] = {
    "kl": lambda lr, a, t: lr,
    "reverse_kl": lambda lr, a, t: 1 - _exp_grow(-lr, t),
    "js": lambda lr, a, t: math.log(2) + F.logsigmoid(lr),
    "alpha": _alpha_score,
}


def divergence_score(logratio: torch.Tensor, divergence: str = "kl", alpha: float = 1.0, *,
                     loss_type: str = "sigmoid") -> torch.Tensor:
    """The f-DPO score ``s(lr)`` of a registry divergence (module table), stable for any ``lr``;
    float64 math. ``loss_type`` chooses the continuation of ``exp`` (module docstring)."""
    name = get_divergence(divergence, "dpo").name
    return DPO_SCORES[name](logratio.double(), alpha, loss_type)


def f_divergence_score(logratio: torch.Tensor, f_divergence: str = "reverse_kl", alpha: float = 1.0, *,
                       kind: str = "sigmoid") -> torch.Tensor:
    """Deprecated: :func:`divergence_score` under TRL's names (``f_divergence="reverse_kl"`` is ``"kl"``)."""
    warnings.warn("fdiv_kernels.dpo.f_divergence_score(f_divergence=TRL name) is deprecated; use "
                  "divergence_score(divergence=registry name): see fdiv_kernels.dpo.TRL_F_DIVERGENCES",
                  DeprecationWarning, stacklevel=2)
    _checks.check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    return divergence_score(logratio, TRL_F_DIVERGENCES[f_divergence], alpha, loss_type=kind)


def resolve_names(loss_type: str, divergence: str, alpha: float, *, kind: Optional[str] = None,
                  f_divergence: Optional[str] = None, f_alpha: Optional[float] = None,
                  where: str = "dpo_loss") -> Tuple[str, str, float]:
    """``(loss_type, divergence, alpha)`` from the current arguments and the deprecated ``kind=``,
    ``f_divergence=`` (TRL's names) and ``f_alpha=``, each of which warns (``DeprecationWarning``)."""
    def warn(old, new):
        warnings.warn(f"{where}({old}=...) is deprecated; use {new}", DeprecationWarning, stacklevel=4)

    if kind is not None:
        warn("kind", "loss_type=...")
        if loss_type not in ("sigmoid", kind):
            raise ValueError(f"pass loss_type= only, not both kind={kind!r} and loss_type={loss_type!r}")
        loss_type = kind
    if f_divergence is not None:
        _checks.check_choice("f_divergence", f_divergence, F_DIVERGENCES)
        new = TRL_F_DIVERGENCES[f_divergence]
        warn("f_divergence", f"divergence={new!r} (registry names: TRL's {f_divergence!r} is {new!r})")
        if divergence not in ("kl", new):
            raise ValueError(f"pass divergence= only, not both f_divergence={f_divergence!r} and "
                             f"divergence={divergence!r}")
        divergence = new
    if f_alpha is not None:
        warn("f_alpha", "alpha=...")
        alpha = f_alpha
    return loss_type, divergence, alpha


def check_options(*, loss_type: str, beta: float, label_smoothing: float, divergence: str, gamma: float = 0.0,
                  alpha: float = 1.0) -> str:
    """Validate DPO options (one place for :func:`dpo_loss`, the DPO spec and module); returns the
    divergence's registry name."""
    _checks.check_choice("loss_type", loss_type, DPO_KINDS)
    name = get_divergence(divergence, "dpo").name
    if name != "kl" and not DPO_LOSS_TYPES[loss_type].needs_reference:
        refs = ", ".join(t.name for t in DPO_LOSS_TYPES.values() if t.needs_reference)
        raise ValueError(f"divergence={divergence!r} scores log-ratios to a reference: it applies to loss types "
                         f"{refs}, not {loss_type}")
    _checks.check_beta(beta)
    if not (_checks._is_real(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _checks.check_finite_number("gamma", gamma)
    _checks.check_finite_number("alpha", alpha)
    if name == "alpha" and not alpha > 0:
        raise ValueError(f"alpha must be > 0 for divergence='alpha', got {alpha}")
    return name


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) logsigmoid(x) - eps logsigmoid(-x)``; the eps term is left out when eps = 0 (so an
    infinite ``x`` gives the limit, not ``0 * inf``)."""
    out = -(1 - eps) * F.logsigmoid(x)
    return out - eps * F.logsigmoid(-x) if eps else out


def pair_losses(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor], *,
                loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                divergence: str = "kl", alpha: float = 1.0) -> torch.Tensor:
    """Per-pair losses ``[B]`` of the module table (inputs already validated, ``divergence`` a
    registry name; ``rc``/``rr`` unused by simpo)."""
    eps = label_smoothing if DPO_LOSS_TYPES[loss_type].uses_label_smoothing else 0.0
    if loss_type == "simpo":
        return _smoothed(beta * (pc - pr) - gamma, eps)
    if divergence == "kl":
        h = (pc - pr) - (rc - rr)
    else:
        score = DPO_SCORES[divergence]
        h = (score((pc - rc).double(), alpha, loss_type) - score((pr - rr).double(), alpha, loss_type)).to(pc.dtype)
    if loss_type == "sigmoid":
        return _smoothed(beta * h, eps)
    if loss_type == "robust":
        out = -(1 - eps) * F.logsigmoid(beta * h)
        return (out + eps * F.logsigmoid(-beta * h) if eps else out) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2  # ipo


def explain_pair(pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor], rr: Optional[torch.Tensor],
                 losses: torch.Tensor, *, loss_type: str, label_smoothing: float,
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
    smoothing = label_smoothing and DPO_LOSS_TYPES[loss_type].uses_label_smoothing
    hint = ("; label_smoothing > 0 turns an infinite margin into an infinite loss" if smoothing else
            "; the limit of the loss is not finite there")
    return f"pair {i}: {what} gives the {loss_type} loss {loss}{hint}"


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
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.0,
             divergence: str = "kl", alpha: float = 1.0, kind: Optional[str] = None,
             f_divergence: Optional[str] = None, f_alpha: Optional[float] = None) -> DPOOutput:
    """DPO / IPO / hinge / robust DPO / SimPO loss on ``[B]`` sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-probs (e.g. from
            :func:`fdiv_kernels.sequence_logp`), with gradient.
        ref_chosen, ref_rejected: ``[B]`` reference log-probs; required by the loss types that
            need a reference (all but ``simpo``; :data:`DPO_LOSS_TYPES`).
        beta: inverse temperature (> 0). loss_type: one of ``sigmoid, robust, hinge, ipo, simpo``
            (TRL's and Liger's name; ``kind=`` is its deprecated spelling).
        label_smoothing: ``eps`` in [0, 0.5) (conservative DPO / robust DPO / SimPO; hinge and ipo
            ignore it).
        gamma: SimPO's target margin (TRL's ``simpo_gamma``).
        divergence: the f-DPO score, a registry name that supports ``"dpo"`` (``kl``, standard DPO;
            ``reverse_kl``, ``js``, ``alpha`` with ``alpha``): module docstring, with TRL's names.
        kind, f_divergence, f_alpha: deprecated spellings of ``loss_type``, ``divergence`` (with
            TRL's names: ``f_divergence="reverse_kl"`` is ``divergence="kl"``) and ``alpha``.
    """
    loss_type, divergence, alpha = resolve_names(loss_type, divergence, alpha, kind=kind, f_divergence=f_divergence,
                                                 f_alpha=f_alpha)
    divergence = check_options(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                               divergence=divergence, gamma=gamma, alpha=alpha)
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected)):
        _checks.check_floating(name, t)
    if policy_chosen.shape != policy_rejected.shape:
        raise ValueError(f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
                         f"{tuple(policy_rejected.shape)} must have the same shape")
    needs_ref = DPO_LOSS_TYPES[loss_type].needs_reference
    if needs_ref:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen and ref_rejected")
        for name, t in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            _checks.check_floating(name, t)
            if t.shape != policy_chosen.shape:
                raise ValueError(f"{name} must have shape {tuple(policy_chosen.shape)}, got {tuple(t.shape)}")
    _checks.check_same_device(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                              ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    pc = policy_chosen if policy_chosen.dtype == torch.float64 else policy_chosen.float()
    pr = policy_rejected if policy_rejected.dtype == torch.float64 else policy_rejected.float()
    rc = ref_chosen.to(pc.dtype) if needs_ref else None
    rr = ref_rejected.to(pc.dtype) if needs_ref else None
    losses = pair_losses(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                         divergence=divergence, alpha=alpha)
    if torch.compiler.is_compiling():  # the same check, inside a custom op (ops/compiled.py)
        from .ops.compiled import check_dpo
        losses = check_dpo(losses, pc, pr, rc, rr, loss_type, float(label_smoothing))
    elif _checks.finite_checks_enabled() and not bool(torch.isfinite(losses.detach()).all()):
        raise ValueError(explain_pair(pc, pr, rc, rr, losses, loss_type=loss_type, label_smoothing=label_smoothing))
    if needs_ref:
        chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    else:
        chosen_r, rejected_r = beta * pc.detach(), beta * pr.detach()
    return DPOOutput(
        loss=losses.mean() if losses.numel() else losses.sum(),
        losses=losses,
        chosen_rewards=chosen_r,
        rejected_rewards=rejected_r,
        accuracy=(chosen_r > rejected_r).float().mean() if losses.numel() else losses.new_zeros(()),
        margin=(chosen_r - rejected_r).mean() if losses.numel() else losses.new_zeros(()),
    )

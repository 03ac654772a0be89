"""The registry of f-divergences: one name (and its aliases) = one generator ``f`` everywhere.

An entry (:class:`Divergence`) holds every form the package has of its divergence, and what it
supports follows from which forms it holds (:attr:`Divergence.supports`):

* ``"variational"``: the paper's SFT objective ``phi`` below (:func:`fdiv_kernels.loss`);
* ``"primal"``: the per-token ``D_f(onehot(y) || p)`` (:attr:`Divergence.primal`, a
  :class:`~fdiv_kernels.formulas.primal.PrimalLoss`; :func:`fdiv_kernels.primal_loss`);
* ``"dpo"``: the f-DPO score ``f'(pi / pi_ref)`` (:attr:`Divergence.preference`, a
  :class:`~fdiv_kernels.formulas.preference.PreferenceScore`; :func:`fdiv_kernels.dpo_loss`);
* ``"distill"``: ``D_f(P_teacher || P_student)`` over the vocabulary (:attr:`Divergence.distill`, a
  :class:`~fdiv_kernels.formulas.distill.DistillForm`; :func:`fdiv_kernels.distill_loss`).

:func:`get_divergence` looks a name up for one of these uses and raises a ``ValueError`` naming
the argument and the names that use supports.

For a divergence with generator ``f`` and convex conjugate ``f*``, the paper's SFT objective
maximises ``E[phi(r)]`` with ``phi(r) = -f*(-r)`` and the implicit reward
``r = beta * log(pi / pi_ref) (+ value terms)``. ``phi`` is only defined on a domain, so each
entry maps an unconstrained score ``u`` into it with a smooth *activation* ``r = a(u)`` (never a
clamp), and evaluates ``phi(a(u))`` in log space. See ``docs/math.md`` for the derivations.

Two aggregations exist:

* ``"mean"``: the loss is ``-mean(phi(a(u)))``; ``phi`` has bounded growth.
* ``"logmeanexp"``: ``-phi(a(u)) = psi(u) - offset`` with ``psi > 0`` growing like ``exp(-u)``
  (KL, squared Hellinger). The loss is ``log(mean(psi(u)))`` computed as
  ``logsumexp(log_psi(u)) - log(n)``: a monotone transform of the exact objective (same
  minimiser, Donsker-Varadhan form for KL) whose gradient is a batch softmax of bounded terms,
  so one sample with ``u = -1000`` cannot overflow anything.

Every function here takes and returns tensors elementwise and is finite for every finite
input; ``dphi`` and ``dlog_psi`` are the closed-form derivatives (the fused kernels' per-token
coefficients, and the backward of :meth:`Divergence.objective` / :meth:`Divergence.neg_log_psi`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .distill import DISTILL_FORMS, DistillForm
from .preference import DPO_SCORES, PreferenceScore
from .primal import PRIMAL_LOSSES, PrimalLoss
from .stable import apply_elementwise, dlog_softplus, log_softplus

__all__ = ["DIVERGENCES", "DIVERGENCE_REGISTRY", "Divergence", "USES", "divergence_names", "get_divergence",
           "register_divergence"]

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Divergence:
    """One f-divergence and the forms the package has of it.

    Attributes:
        name, aliases: how :func:`get_divergence` finds it.
        generator, conjugate, conjugate_domain: ``f(u)``, ``f*(t)`` and the domain of ``f*`` as text.
        activation: the map ``u -> r`` into the domain of ``phi``, as text.
        phi, dphi: ``phi(a(u))`` and its derivative in ``u``, elementwise, stable; ``None`` for an
            entry with no variational objective (``alpha``: primal and DPO only).
        aggregate: ``"mean"`` or ``"logmeanexp"`` (see the module docstring).
        log_psi, dlog_psi, psi_offset: for ``"logmeanexp"``: ``-phi(a(u)) = exp(log_psi(u)) - psi_offset``.
        paper_form: the paper's Table 4 objective, when it gives one.
        primal: the closed form of ``D_f(onehot(y) || p)``, or ``None`` (``f(0) = inf``).
        preference: the f-DPO score, or ``None``.
        distill: the distillation form (per-entry ``p_s f(p_t / p_s)`` and its coefficient), or ``None``.
    """

    name: str
    aliases: Tuple[str, ...]
    generator: str
    conjugate: str
    conjugate_domain: str
    activation: str
    phi: Optional[Callable[[torch.Tensor], torch.Tensor]]
    dphi: Optional[Callable[[torch.Tensor], torch.Tensor]]
    aggregate: str = "mean"
    log_psi: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    dlog_psi: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    psi_offset: float = 0.0
    paper_form: Optional[str] = None
    primal: Optional[PrimalLoss] = None
    preference: Optional[PreferenceScore] = None
    distill: Optional[DistillForm] = None

    @property
    def supports(self) -> Tuple[str, ...]:
        """The uses of :data:`USES` this entry has forms for."""
        has = {"variational": self.phi is not None, "primal": self.primal is not None,
               "dpo": self.preference is not None, "distill": self.distill is not None}
        return tuple(use for use in USES if has[use])

    def __reduce__(self):
        """A registered entry pickles by name (its functions are lambdas), so specs and the ``fk.nn``
        modules holding them pickle."""
        if DIVERGENCE_REGISTRY.get(self.name) is self:
            return (_registered, (self.name,))
        return super().__reduce__()

    def objective(self, u: torch.Tensor) -> torch.Tensor:
        """``phi(a(u))`` elementwise with a stable backward."""
        if self.phi is None:
            raise ValueError(f"divergence {self.name!r} has no variational objective")
        return apply_elementwise(self.phi, self.dphi, u)

    def neg_log_psi(self, u: torch.Tensor) -> torch.Tensor:
        """``log_psi(u)`` with a stable backward (``"logmeanexp"`` divergences only)."""
        if self.log_psi is None:
            raise ValueError(f"divergence {self.name!r} aggregates by mean; it has no log_psi")
        return apply_elementwise(self.log_psi, self.dlog_psi, u)


def _pearson_phi(u):
    return torch.where(u <= 2.0, u - 0.25 * u * u, torch.ones_like(u))


def _neyman_phi(u):
    return 2.0 * torch.exp(0.5 * log_softplus(u)) - 2.0


def _neyman_dphi(u):
    return torch.exp(0.5 * log_softplus(u)) * dlog_softplus(u)


_FORMS = [
    Divergence(
        name="tv", aliases=("sft", "total_variation"),
        generator="0.5*|u-1|", conjugate="t", conjugate_domain="|t| <= 1/2 (dropped, as in the paper)",
        activation="r = u (identity; with beta=1 and no reference the loss is the NLL)",
        phi=lambda u: u, dphi=torch.ones_like,
        paper_form="beta*log pi(y|x) + log pi_ref(y|x) - V(s_t)",
    ),
    Divergence(
        name="kl", aliases=("forward_kl",),
        generator="u*log(u)", conjugate="exp(t-1)", conjugate_domain="all t",
        activation="r = u (identity); loss in Donsker-Varadhan form log mean exp(-u-1)",
        phi=lambda u: -torch.exp(-u - 1.0), dphi=lambda u: torch.exp(-u - 1.0),
        aggregate="logmeanexp",
        log_psi=lambda u: -u - 1.0, dlog_psi=lambda u: -torch.ones_like(u), psi_offset=0.0,
    ),
    Divergence(
        name="reverse_kl", aliases=("rkl",),
        generator="-log(u)", conjugate="-1-log(-t)", conjugate_domain="t < 0",
        activation="r = softplus(u) in (0, inf)",
        phi=lambda u: 1.0 + log_softplus(u), dphi=dlog_softplus,
    ),
    Divergence(
        name="pearson", aliases=("pearson_chi2", "chi2"),
        generator="(u-1)^2", conjugate="t + t^2/4 (t >= -2), -1 (t < -2)",
        conjugate_domain="all t (exact conjugate of f restricted to u >= 0)",
        activation="r = u; phi(r) = r - r^2/4 for r <= 2 and 1 beyond (C1, exact)",
        phi=_pearson_phi, dphi=lambda u: torch.clamp(1.0 - 0.5 * u, min=0.0),
        paper_form="pi(y|x) - pi_ref(y|x) * exp(dV)",
    ),
    Divergence(
        name="neyman", aliases=("neyman_chi2",),
        generator="(1-u)^2/u", conjugate="2 - 2*sqrt(1-t)", conjugate_domain="t < 1",
        activation="r = softplus(u) - 1 in (-1, inf)",
        phi=_neyman_phi, dphi=_neyman_dphi,
    ),
    Divergence(
        name="squared_hellinger", aliases=("hellinger", "sh"),
        generator="(sqrt(u)-1)^2", conjugate="t/(1-t)", conjugate_domain="t < 1",
        activation="r = softplus(u) - 1 in (-1, inf); loss log mean(1/softplus(u))",
        phi=lambda u: 1.0 - torch.exp(-log_softplus(u)),
        dphi=lambda u: torch.exp(-log_softplus(u)) * dlog_softplus(u),
        aggregate="logmeanexp",
        log_psi=lambda u: -log_softplus(u), dlog_psi=lambda u: -dlog_softplus(u), psi_offset=1.0,
        paper_form="sqrt(pi_ref(y|x)) * exp(dV/2) - sqrt(pi(y|x))",
    ),
    Divergence(
        name="js", aliases=("jensen_shannon", "jsd"),
        generator="u*log(u) - (1+u)*log((1+u)/2)", conjugate="-log(2 - exp(t))", conjugate_domain="t < log 2",
        activation="r = softplus(u) - log 2 (the f-GAN output activation): phi = log 2 + logsigmoid(u)",
        phi=lambda u: LOG2 + F.logsigmoid(u), dphi=lambda u: torch.sigmoid(-u),
        paper_form="log(1 + exp(log pi_ref(y|x) + dV)) - log(1 + exp(log pi(y|x)))",
    ),
    Divergence(
        name="alpha", aliases=("alpha_divergence",),
        generator="(u^a - 1 - a*(u-1)) / (a*(a-1)) (Amari; a -> 1: kl)", conjugate="-", conjugate_domain="-",
        activation="none: no variational objective (fk.primal_loss and fk.dpo_loss, with alpha=a)",
        phi=None, dphi=None,
    ),
]


#: what an entry can be used for, and the API that uses it
USES = ("variational", "primal", "dpo", "distill")
_API = {"variational": "fk.loss", "primal": "fk.primal_loss", "dpo": "fk.dpo_loss", "distill": "fk.distill_loss"}

# each entry with the primal form, the f-DPO score and the distillation form of the same name, where they exist
_ENTRIES = [dataclasses.replace(d, primal=PRIMAL_LOSSES.get(d.name), preference=DPO_SCORES.get(d.name),
                                distill=DISTILL_FORMS.get(d.name))
            for d in _FORMS]

#: every entry, by canonical name
DIVERGENCE_REGISTRY: Dict[str, Divergence] = {d.name: d for d in _ENTRIES}
#: the entries :func:`fdiv_kernels.loss` supports (those with a variational ``phi``)
DIVERGENCES: Dict[str, Divergence] = {d.name: d for d in _ENTRIES if d.phi is not None}
_ALIASES: Dict[str, str] = {a: d.name for d in _ENTRIES for a in (d.name, *d.aliases)}


def _registered(name: str) -> Divergence:
    return DIVERGENCE_REGISTRY[name]


def divergence_names(use: Optional[str] = None) -> Tuple[str, ...]:
    """Canonical names of the registry entries that support ``use`` (one of :data:`USES`; all when ``None``)."""
    if use is not None and use not in USES:
        raise ValueError(f"use={use!r} is not supported; choose one of {', '.join(USES)}")
    return tuple(n for n, d in DIVERGENCE_REGISTRY.items() if use is None or use in d.supports)


def get_divergence(name, use: str = "variational", *, argument: str = "divergence") -> Divergence:
    """Look a divergence up by name or alias (case-insensitive) for ``use`` (``"variational"``:
    :func:`fdiv_kernels.loss`, ``"primal"``, ``"dpo"``, ``"distill"``); a :class:`Divergence` passes through.

    ``ValueError`` naming ``argument`` and listing the names ``use`` supports for an unknown name or
    an entry without that use.
    """
    if isinstance(name, Divergence):
        entry = name
    else:
        key = str(name).lower().replace("-", "_")
        if key not in _ALIASES:
            names = sorted(a for a, n in _ALIASES.items() if use in DIVERGENCE_REGISTRY[n].supports)
            where = "" if argument == "divergence" else f"{argument}: "  # the message names the argument
            raise ValueError(f"{where}unknown divergence {name!r}; known: {', '.join(names)}")
        entry = DIVERGENCE_REGISTRY[_ALIASES[key]]
    if use not in entry.supports:
        names = sorted(a for a, n in _ALIASES.items() if use in DIVERGENCE_REGISTRY[n].supports)
        hint = " (no primal form where f(0) = inf, as for reverse_kl and neyman)" if use == "primal" else ""
        raise ValueError(f"{argument}={getattr(name, 'name', name)!r} has no {use} form, so {_API[use]} does not "
                         f"support it; {_API[use]} supports: {', '.join(names)}{hint}")
    return entry


def register_divergence(div: Divergence) -> None:
    """Add a user-defined divergence (same contract as the built-in entries)."""
    DIVERGENCE_REGISTRY[div.name] = div
    if div.phi is not None:
        DIVERGENCES[div.name] = div
    for a in (div.name, *div.aliases):
        _ALIASES[a] = div.name

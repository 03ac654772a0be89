"""The loss protocol: every loss of the package as a function of complete rows' per-token statistics.

A spec is a frozen, validated description of one loss (the f-divergence SFT objectives of
:func:`fdiv_kernels.loss`, the primal per-token losses, the DPO family). It is the one object
the API, the ``nn`` modules, the integrations and the trainer hand to the kernels, and the one
extension point for a new loss (:class:`LossSpec`; ``docs/design.md``, "Adding a loss"). Given
one *chunk* of complete rows (their ``logp``, ``lse``, supervision mask and reference log-probs,
:class:`Rows`), a spec returns

* :meth:`~LossSpec.terms`: that chunk's contribution to the loss, differentiable by torch
  autograd (the two-pass and ``logits=`` paths, and the tests' oracle);
* :meth:`~LossSpec.coefficients`: the closed-form derivative of the chunk's *target* (``lme`` for
  the log-mean-exp losses, else ``linear``) with respect to ``logp``, ``lse`` and the references:
  the per-token coefficients ``g = dL/dlogp``, ``k = dL/dlse`` of the fused one-pass kernels,
  which need no autograd (so they run inside a ``torch.library`` custom op too). Each spec's
  coefficients are tested against autograd on :meth:`terms` in float64 (tests/test_specs.py).

The whole-batch loss is put together by :meth:`~LossSpec.finish`:

    loss = finish(sum_c linear_c, logsumexp_c lme_c)

* ``linear``: terms that add over chunks (means divide by the batch's token/row/pair count,
  which :meth:`~LossSpec.normalizers` reads off the labels before the first GEMM);
* ``lme``: the log-sum-exp of the log-mean-exp divergences (KL, squared Hellinger), combined
  across chunks exactly by :class:`LogSumExpAccumulator`.

Conventions and derivations: ``docs/math.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Tuple, Union

import torch

from . import checks
from .formulas.distill import DistillForm
from .formulas.distill import chunk_epilogue as distill_epilogue
from .formulas.distill import resolve as resolve_distill
from .formulas.divergences import Divergence, get_divergence
from .formulas.preference import DPO_LOSS_TYPES, PreferenceScore, explain_pair, pair_loss_grads, pair_losses
from .formulas.primal import PrimalLoss
from .formulas.stable import exp_linear_tail

__all__ = ["DPOSpec", "DistillSpec", "FDivSpec", "Coefficients", "HeadSpec", "LEVELS", "LogSumExpAccumulator", "LossSpec", "Norms",
           "PER_ELEMENT_KNEE", "PrimalSpec", "REDUCTIONS", "Rows", "Terms", "VALUE_MODES", "is_loss_spec", "normalizers"]

LEVELS = ("token", "sequence")
REDUCTIONS = ("mean", "sum", "none")
VALUE_MODES = ("drop", "detach", "free")
#: ``reduction="none"`` of the log-mean-exp divergences: ``psi = exp(log psi)`` is exact for
#: ``log psi <= 50`` (KL: rewards ``u >= -51``) and continued linearly in ``log psi`` above, so every
#: per-element loss and its gradient stay finite (docs/math.md, reductions)
PER_ELEMENT_KNEE = 50.0


class Rows(NamedTuple):
    """Statistics of a set of complete rows, ``[r, T]`` each (0 at unsupervised positions).

    ``ref_tok``: per-token reference log-probs ``[r, T]`` (0 where unsupervised) or a 0-d zero;
    ``ref_seq``: per-row reference log-probs ``[r]`` or ``None``.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor
    ref_tok: torch.Tensor
    ref_seq: Optional[torch.Tensor]

    def select(self, rows: torch.Tensor) -> "Rows":
        """The same statistics for the rows ``rows`` (an index tensor)."""
        pick = lambda t: t if t is None or t.dim() == 0 else t.index_select(0, rows)  # noqa: E731
        return Rows(*(pick(t) for t in self))


class Norms(NamedTuple):
    """Batch-level counts a mean divides by (0-d tensors): supervised tokens, rows with one, pairs."""

    tokens: torch.Tensor
    rows: torch.Tensor
    pairs: int = 0


class Terms(NamedTuple):
    """A chunk's contribution: ``linear`` (0-d) and, for log-mean-exp losses, ``lme`` (0-d, may be -inf)."""

    linear: torch.Tensor
    lme: Optional[torch.Tensor] = None


class Coefficients(NamedTuple):
    """Derivatives of a chunk's target (:class:`LossSpec`) with respect to the fields of
    :class:`Rows`: ``logp``, ``lse`` ``[r, T]`` (0 where unsupervised), ``ref_tok`` ``[r, T]`` (None
    when the reference is not per token) and ``ref_seq`` ``[r]`` (None without one)."""

    logp: torch.Tensor
    lse: torch.Tensor
    ref_tok: Optional[torch.Tensor] = None
    ref_seq: Optional[torch.Tensor] = None


class LossSpec(Protocol):
    """What the kernels need of a loss (every spec of this module implements it).

    Attributes: ``reduction`` (``"mean"``, ``"sum"`` or ``"none"``), ``references`` (the reference
    shapes it takes: ``"token"`` ``[..., T]``, ``"row"`` ``[...]``), ``token_local`` (a token's
    terms depend on that token alone: chunks may split rows anywhere), ``uses_lme`` (a log-mean-exp
    part: the target is ``lme``), ``single_pass`` (the one-pass fused path applies), ``divergence``
    (the registry entry or primal form, reported in the output).

    Methods: ``row_groups(num_rows)`` (rows that must share a chunk, or None), ``normalizers(mask2)``,
    ``terms(rows, norms)``, ``coefficients(rows, norms)``, ``finish(terms, norms)``,
    ``per_element(rows)`` (``reduction="none"``), ``rewards(rows)`` (``(u, where it counts,
    value_s0)``, reported in :class:`fdiv_kernels.LossOutput`), ``explain(rows)`` (why the loss is
    not finite).
    """

    reduction: str
    references: Tuple[str, ...]
    token_local: bool
    uses_lme: bool
    single_pass: bool

    def row_groups(self, num_rows: int) -> Optional[torch.Tensor]: ...
    def normalizers(self, mask2: torch.Tensor) -> Norms: ...
    def terms(self, rows: Rows, norms: Norms) -> Terms: ...
    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients: ...
    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor: ...
    def per_element(self, rows: Rows) -> torch.Tensor: ...
    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def explain(self, rows: Rows) -> Optional[str]: ...


def is_loss_spec(obj) -> bool:
    """Whether ``obj`` has every attribute of :class:`LossSpec` (traceable by ``torch.compile``,
    unlike ``isinstance`` with a protocol)."""
    return all(hasattr(obj, name) for name in ("reduction", "references", "token_local", "uses_lme", "single_pass",
                                               "row_groups", "normalizers", "terms", "coefficients", "finish",
                                               "per_element", "rewards", "explain"))


@dataclass(frozen=True)
class HeadSpec:
    """How logits are formed from the LM head: ``z = cap(h W^T + b) / temperature`` with the
    soft-cap ``cap(x) = softcap * tanh(x / softcap)`` (``None``: none), and which backend runs it
    (``"auto"`` or a name of :func:`fdiv_kernels.available_backends`)."""

    softcap: Optional[float] = None
    temperature: float = 1.0
    backend: str = "auto"

    def __post_init__(self):
        checks.check_head_options(self)
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a name (str), got {type(self.backend).__name__}")


def normalizers(mask2: torch.Tensor, pairs: int = 0) -> Norms:
    return Norms(mask2.sum(), mask2.any(dim=1).sum(), pairs)


def first_last_next(mask2: torch.Tensor):
    """Indices of each row's first and last supervised position and, per position, the next one
    (the position itself when there is none)."""
    b, t = mask2.shape
    if t == 0:  # rows of no tokens: nothing is supervised, every index is a dummy 0
        z = torch.zeros(b, dtype=torch.long, device=mask2.device)
        return z, z, torch.zeros((b, 0), dtype=torch.long, device=mask2.device)
    pos = torch.arange(t, device=mask2.device).expand(b, t)
    big = torch.full_like(pos, t)
    first = torch.where(mask2, pos, big).min(dim=1).values.clamp(max=t - 1)
    last = torch.where(mask2, pos, torch.full_like(pos, -1)).max(dim=1).values.clamp(min=0)
    # next supervised position strictly after each t (t itself when none): reverse cummin
    cand = torch.where(mask2, pos, big)
    shifted = torch.cat([cand[:, 1:], big[:, :1]], dim=1)
    nxt = torch.flip(torch.cummin(torch.flip(shifted, [1]), dim=1).values, [1])
    nxt = torch.where(nxt >= t, pos, nxt)
    return first, last, nxt


def _at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[r, idx[r]]`` per row of ``x [r, T]``; zeros (still attached to ``x``'s graph) when ``T = 0``."""
    if x.shape[1] == 0:
        return x.sum(dim=1) * 0
    return x.gather(1, idx[:, None]).squeeze(1)


def _scatter_rows(values: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out[r, idx[r]] += values[r]`` into zeros shaped like ``like [r, T]`` (nothing when ``T = 0``)."""
    out = torch.zeros_like(like)
    if like.shape[1]:
        out.scatter_add_(1, idx[:, None], values[:, None].to(like.dtype))
    return out


def value_s0(rows: Rows) -> torch.Tensor:
    """``[r]`` lse at each row's first supervised position (0 for rows with none)."""
    first = first_last_next(rows.mask)[0]
    return torch.where(rows.mask.any(dim=1), _at(rows.lse, first), rows.lse.new_zeros(()))


def _masked_logsumexp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``logsumexp(x[w])`` (``-inf`` with a zero gradient when ``w`` is all False); no host sync."""
    has = w.any()
    fill = torch.where(has, x.new_full((), -math.inf), x.new_zeros(()))
    lse = torch.logsumexp(torch.where(w, x, fill).reshape(-1), dim=0)
    return torch.where(has, lse, x.new_full((), -math.inf))


def _masked_softmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d/dx`` of :func:`_masked_logsumexp`: the softmax of ``x`` over ``w`` (zeros elsewhere and
    when ``w`` is all False)."""
    lse = _masked_logsumexp(x.detach(), w)
    safe = torch.where(torch.isfinite(lse), lse, lse.new_zeros(()))
    return torch.where(w, torch.exp(torch.where(w, x, safe) - safe), x.new_zeros(()))


def _scale(count: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(count, 1)`` for a mean, 1 for a sum (0-d, ``dtype``)."""
    one = torch.ones((), dtype=dtype, device=count.device)
    return one if reduction == "sum" else one / count.clamp(min=1).to(dtype)


def _mean_or_sum(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    return total if reduction == "sum" else total / count.clamp(min=1)


def _finish_lme(linear: torch.Tensor, lme: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """``linear + lme (- log n)``; 0 with a zero gradient when nothing is supervised (``n = 0``).

    With ``n > 0`` and ``lme = -inf`` (every ``psi = 0``: every reward is ``+inf``) the value is
    the true one, ``-inf``, which the data checks report as an error."""
    empty = count == 0
    zero = lme.new_zeros(())
    safe = torch.where(empty, zero, lme)
    if reduction == "mean":
        safe = safe - torch.log(count.clamp(min=1).to(lme.dtype))
    return linear + torch.where(empty, zero, safe)


def _z_loss_k(rows: Rows, norms: Norms, z_loss: float, reduction: str) -> torch.Tensor:
    """``d/dlse`` of the z-loss term ``z_loss * sum_mask lse^2`` (mean over tokens or sum)."""
    zero = rows.lse.new_zeros(())
    if z_loss <= 0:
        return torch.zeros_like(rows.lse)
    return torch.where(rows.mask, 2.0 * z_loss * rows.lse, zero) * _scale(norms.tokens, reduction, rows.lse.dtype)


def _z_loss_term(rows: Rows, norms: Norms, z_loss: float, reduction: str) -> torch.Tensor:
    zero = rows.lse.new_zeros(())
    return z_loss * _mean_or_sum(torch.where(rows.mask, rows.lse * rows.lse, zero).sum(), norms.tokens, reduction)


class LogSumExpAccumulator:
    """``L = logsumexp_j A_j`` over parts that arrive one at a time, with the factors that make
    gradients accumulated part by part exact: the log-mean-exp divergences (KL, squared
    Hellinger) over the chunks of one call (the fused pass) or over the micro-batches of one
    optimiser step (gradient accumulation; ``docs/math.md``).

    ``A_j`` is a part's ``log sum_i psi_i`` (``fk.loss(..., reduction="sum").loss`` of a batch
    whose loss is a log-mean-exp alone: ``values`` "drop" or "detach", ``z_loss=0``). Since
    ``dL = sum_j exp(A_j - L) dA_j``, keeping the accumulated gradient ``G`` in the frame of the
    running total, ``G <- rescale * G + weight * dA_j``, with ``(rescale, weight) = add(A_j)`` =
    ``(exp(L_old - L_new), exp(A_j - L_new))``, leaves ``G = dL`` after the last part. A trainer:

        acc = fk.LogSumExpAccumulator()
        for mb in micro_batches:
            out = fk.loss(..., divergence="kl", reduction="sum")
            rescale, weight = acc.add(out.loss.detach(), count=int(out.num_tokens))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(rescale)
            (weight * out.loss).backward()
        acc.loss()   # = log mean psi over the whole step (the global batch's loss)

    (With data parallelism the parts of every process enter the same total: gather the ``A_j``
    first.) A part with ``A_j = -inf`` (nothing supervised) changes nothing: ``(1.0, 0.0)``.
    """

    def __init__(self) -> None:
        self.total = -math.inf
        self.count = 0

    def add(self, log_sum, count: int = 0) -> Tuple[float, float]:
        """Register part ``A_j = log_sum`` (a float or 0-d tensor, read on the host) with ``count``
        elements; returns ``(rescale, weight)`` (both in ``[0, 1]``)."""
        a = float(log_sum)
        if math.isnan(a) or a == math.inf:
            raise ValueError(f"log_sum must be finite or -inf, got {a}")
        self.count += int(count)
        if a == -math.inf:
            return 1.0, 0.0
        old = self.total
        new = a if old == -math.inf else max(old, a) + math.log1p(math.exp(-abs(old - a)))
        self.total = new
        return (math.exp(old - new) if old > -math.inf else 0.0), math.exp(a - new)

    def weight(self, log_sum) -> float:
        """The final weight ``exp(A_j - L)`` of a part (for gradients kept per part)."""
        a = float(log_sum)
        return 0.0 if a == -math.inf else math.exp(a - self.total)

    def loss(self, reduction: str = "mean") -> float:
        """``L - log n`` (``"mean"``: log mean psi) or ``L`` (``"sum"``); 0 when ``n = 0``."""
        if self.total == -math.inf and self.count == 0:
            return 0.0
        return self.total - math.log(self.count) if reduction == "mean" else self.total


def _reference_culprit(rows: Rows, pos: Tuple[int, ...], level: str) -> Optional[str]:
    """``"ref_logp is -inf at ..."`` when a -inf reference explains the reward at ``pos``."""
    r = pos[0]
    if rows.ref_seq is not None and float(rows.ref_seq[r]) == -math.inf:
        return f"ref_logp is -inf for row {r} (pi_ref = 0)"
    if rows.ref_tok.dim() == 0:
        return None
    ref = rows.ref_tok[r] if level == "sequence" else rows.ref_tok[pos]
    bad = (ref == -math.inf) & (rows.mask[r] if level == "sequence" else torch.ones((), dtype=torch.bool))
    if not bool(bad.any()):
        return None
    where = pos if level == "token" else (r, int(bad.nonzero()[0]))
    return f"ref_logp is -inf at supervised position {where} (pi_ref = 0)"


def _check_z_loss(z_loss: float) -> None:
    if not (checks.is_real(z_loss) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


# ---------------------------------------------------------------------------------------------
# f-divergence SFT objectives (the paper's variational form)
# ---------------------------------------------------------------------------------------------

class _Reward(NamedTuple):
    """The implicit reward of :meth:`FDivSpec.rewards` and what it is built from."""

    u: torch.Tensor          # [r, T] (token level) or [r] (sequence level), 0 where it does not count
    weight: torch.Tensor     # bool, where u counts
    value_s0: torch.Tensor   # [r]
    first: torch.Tensor      # [r] first supervised position per row
    last: torch.Tensor       # [r] last one
    nxt: torch.Tensor        # [r, T] next supervised position (itself when none)


@dataclass(frozen=True)
class FDivSpec:
    """The variational f-divergence SFT loss of :func:`fdiv_kernels.loss` (validated on creation).

    ``divergence`` is a registry entry or a name/alias; the other fields are the arguments of
    :func:`fdiv_kernels.loss` of the same names.
    """

    divergence: Union[str, Divergence] = "sft"
    beta: float = 1.0
    level: str = "token"
    values: str = "drop"
    z_loss: float = 0.0
    length_normalize: bool = False
    reduction: str = "mean"

    def __post_init__(self):
        object.__setattr__(self, "divergence", get_divergence(self.divergence))
        checks.check_choice("level", self.level, LEVELS)
        checks.check_choice("reduction", self.reduction, REDUCTIONS)
        checks.check_choice("values", self.values, VALUE_MODES)
        checks.check_beta(self.beta)
        _check_z_loss(self.z_loss)
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "z_loss", float(self.z_loss))
        if self.reduction == "none" and (self.values == "free" or self.z_loss > 0):
            raise ValueError("values='free' and z_loss add batch-level terms; use reduction='mean' or 'sum' with them")
        if self.length_normalize and self.level != "sequence":
            raise ValueError("length_normalize=True applies to level='sequence' only")

    # --- what the fused kernels need to know ---
    @property
    def references(self) -> Tuple[str, ...]:
        """Per-token references, and per-row ones at sequence level."""
        return ("token",) if self.level == "token" else ("token", "row")

    @property
    def token_local(self) -> bool:
        """True when a token's terms depend on that token alone (chunks may split rows anywhere)."""
        return self.level == "token" and self.values == "drop"

    @property
    def uses_lme(self) -> bool:
        return self.divergence.aggregate == "logmeanexp" and self.reduction != "none"

    @property
    def single_pass(self) -> bool:
        """Whether the one-pass fused path applies: a log-mean-exp loss mixed with linear terms
        (``values="free"``/``z_loss``) and ``reduction="none"`` need the two-pass path."""
        if self.reduction == "none":
            return False
        return not (self.uses_lme and (self.values == "free" or self.z_loss > 0))

    def row_groups(self, num_rows: int) -> Optional[torch.Tensor]:
        """Rows that must share a chunk (``None``: any complete rows)."""
        return None

    def normalizers(self, mask2: torch.Tensor) -> Norms:
        return normalizers(mask2)

    # --- the math ---
    def _reward(self, rows: Rows) -> _Reward:
        m2, lse2 = rows.mask, rows.lse
        zero = rows.logp.new_zeros(())
        logratio = torch.where(m2, rows.logp - rows.ref_tok, zero)
        first, last, nxt = first_last_next(m2)
        row_valid = m2.any(dim=1)
        v_s0 = torch.where(row_valid, _at(lse2, first), zero)
        vm = lse2 if self.values == "free" else lse2.detach()
        if self.level == "token":
            u = self.beta * logratio
            if self.values != "drop":
                u = u + torch.where(m2, vm - vm.gather(1, nxt), zero)
            return _Reward(torch.where(m2, u, zero), m2, v_s0, first, last, nxt)
        s = logratio.sum(dim=1)
        if self.length_normalize:
            s = s / m2.sum(dim=1).clamp(min=1)
        if rows.ref_seq is not None:
            s = s - rows.ref_seq
        u = self.beta * s
        if self.values != "drop":
            u = u + _at(vm, first) - _at(vm, last)
        return _Reward(torch.where(row_valid, u, zero), row_valid, v_s0, first, last, nxt)

    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, weight_mask, value_s0)``: the implicit reward (``[r, T]`` at token level, ``[r]`` at
        sequence level), where it counts, and ``V(s0)`` per row (see ``docs/math.md`` section 2)."""
        rw = self._reward(rows)
        return rw.u, rw.weight, rw.value_s0

    def _count(self, norms: Norms) -> torch.Tensor:
        return norms.tokens if self.level == "token" else norms.rows

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        """This chunk's ``linear`` terms and (KL, squared Hellinger) its log-sum-exp ``lme``."""
        rw = self._reward(rows)
        u, w = rw.u, rw.weight
        div, red = self.divergence, self.reduction
        zero = u.new_zeros(())
        linear, lme = zero, None
        if div.aggregate == "mean":
            linear = _mean_or_sum(torch.where(w, -div.objective(u), zero).sum(), self._count(norms), red)
        else:
            lme = _masked_logsumexp(div.neg_log_psi(u), w)
        if self.values == "free":  # the paper's -V(s0) term of J, with gradient
            linear = linear + _mean_or_sum(torch.where(rows.mask.any(dim=1), rw.value_s0, zero).sum(), norms.rows, red)
        if self.z_loss > 0:
            linear = linear + _z_loss_term(rows, norms, self.z_loss, red)
        return Terms(linear, lme)

    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients:
        """Closed-form derivatives of the target (``lme`` for KL and squared Hellinger, else
        ``linear``): the reward's derivative ``D = dT/du`` (``-phi'(u)`` per unit, or the batch
        softmax of ``log psi`` times ``(log psi)'``), chained through ``u`` (module docstring of
        :mod:`fdiv_kernels.specs`; ``docs/math.md``, "The one-pass coefficients")."""
        with torch.no_grad():
            rw = self._reward(rows)
            u, w, div, red = rw.u, rw.weight, self.divergence, self.reduction
            zero = u.new_zeros(())
            if div.aggregate == "mean":
                d = torch.where(w, -div.dphi(u), zero) * _scale(self._count(norms), red, u.dtype)
            else:
                d = _masked_softmax(div.log_psi(u), w) * torch.where(w, div.dlog_psi(u), zero)
            m2 = rows.mask
            k = torch.zeros_like(rows.lse)
            if self.level == "token":
                g = self.beta * d
                if self.values == "free":  # u_t = ... + V_t - V_next(t)
                    k = d.clone()
                    if k.shape[1]:
                        k.scatter_add_(1, rw.nxt, -d)
            else:
                per_tok = self.beta * d
                if self.length_normalize:
                    per_tok = per_tok / m2.sum(dim=1).clamp(min=1).to(d.dtype)
                g = torch.where(m2, per_tok[:, None], zero)
                if self.values == "free":  # u_r = ... + V(first) - V(last)
                    k = _scatter_rows(d, rw.first, k) - _scatter_rows(d, rw.last, k)
            if not self.uses_lme:
                if self.values == "free":
                    k = k + _scatter_rows(torch.where(m2.any(dim=1), _scale(norms.rows, red, u.dtype), zero),
                                          rw.first, k)
                k = k + _z_loss_k(rows, norms, self.z_loss, red)
            ref_seq = None
            if rows.ref_seq is not None:
                ref_seq = -self.beta * d
            ref_tok = None if rows.ref_tok.dim() == 0 else -g
            return Coefficients(torch.where(m2, g, zero), torch.where(m2, k, zero), ref_tok, ref_seq)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        if terms.lme is None:
            return terms.linear
        return _finish_lme(terms.linear, terms.lme, self._count(norms), self.reduction)

    def per_element(self, rows: Rows) -> torch.Tensor:
        """``reduction="none"``: ``-phi(u)`` (``psi - offset`` for log-mean-exp divergences) per
        token / row, 0 where nothing is supervised."""
        u, w, _ = self.rewards(rows)
        div = self.divergence
        zero = u.new_zeros(())
        if div.aggregate == "mean":
            return torch.where(w, -div.objective(u), zero)
        return torch.where(w, exp_linear_tail(div.neg_log_psi(u), PER_ELEMENT_KNEE) - div.psi_offset, zero)

    def explain(self, rows: Rows) -> Optional[str]:
        """Why this loss is not finite on finite statistics (for the data checks), or None."""
        with torch.no_grad():
            u, w, _ = self.rewards(rows)
            div = self.divergence
            if div.aggregate == "mean":
                per = torch.where(w, -div.objective(u), u.new_zeros(()))
            else:
                per = torch.where(w, div.neg_log_psi(u), u.new_full((), -math.inf))
            unit = "position" if self.level == "token" else "row"
            bad = w & ~torch.isfinite(per) if div.aggregate == "mean" else w & (torch.isnan(per) | (per == math.inf))
            if bool(bad.any()):
                pos = checks.first_position(bad)
                uu = float(u[pos])
                culprit = _reference_culprit(rows, pos, self.level)
                if culprit is None and not math.isfinite(uu):
                    return (f"the reward beta * (logp - ref_logp) at {unit} {pos} overflows float32 to {uu} "
                            f"(beta={self.beta:g}); lower beta or check ref_logp there")
                if uu == math.inf:
                    return (f"{culprit}: the reward there is +inf and divergence {div.name!r} has no finite limit as "
                            f"the reward grows (phi -> inf); mask that {unit} (ignore_index) or give ref_logp a "
                            f"finite floor")
                return (f"the implicit reward u = {uu:g} at {unit} {pos} (beta={self.beta:g}) makes divergence "
                        f"{div.name!r} overflow float32; lower beta or check ref_logp there")
            if div.aggregate == "logmeanexp" and bool(w.any()) and not bool(torch.isfinite(per[w]).any()):
                return (f"every supervised reward is +inf (ref_logp = -inf at every supervised {unit}), so every psi is "
                        f"0 and the loss log mean psi = -inf; divergence {div.name!r} needs one finite reward")
            if not bool(torch.isfinite(per).all()):
                return None
            return (f"the {self.reduction} of the per-{unit} losses overflows float32 (largest "
                    f"{float(per.abs().max()):g}); use reduction='mean' or a smaller beta")


# ---------------------------------------------------------------------------------------------
# Primal per-token losses D_f(onehot(y) || p)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrimalSpec:
    """The primal per-token loss of :func:`fdiv_kernels.primal_loss`
    (:mod:`fdiv_kernels.formulas.primal`). ``divergence``: a registry name with a primal form, or
    a :class:`~fdiv_kernels.formulas.primal.PrimalLoss`; ``alpha``: Amari's coefficient (> 0) of
    ``divergence="alpha"``; ``z_loss``: weight of ``lse**2`` per supervised token."""

    divergence: Union[str, PrimalLoss] = "kl"
    alpha: float = 1.5
    z_loss: float = 0.0
    reduction: str = "mean"

    def __post_init__(self):
        if not isinstance(self.divergence, PrimalLoss):
            object.__setattr__(self, "divergence", get_divergence(self.divergence, "primal").primal)
        checks.check_choice("reduction", self.reduction, REDUCTIONS)
        if not (checks.is_real(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        _check_z_loss(self.z_loss)
        if self.reduction == "none" and self.z_loss > 0:
            raise ValueError("z_loss adds a batch-level term; use reduction='mean' or 'sum' with it")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "z_loss", float(self.z_loss))

    references = ()  # a function of log p_y alone
    token_local = True
    uses_lme = False

    @property
    def single_pass(self) -> bool:
        return self.reduction != "none"

    def row_groups(self, num_rows: int) -> Optional[torch.Tensor]:
        return None

    def normalizers(self, mask2: torch.Tensor) -> Norms:
        return normalizers(mask2)

    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return rows.logp, rows.mask, value_s0(rows)

    def per_element(self, rows: Rows) -> torch.Tensor:
        return torch.where(rows.mask, self.divergence(rows.logp, self.alpha), rows.logp.new_zeros(()))

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        linear = _mean_or_sum(self.per_element(rows).sum(), norms.tokens, self.reduction)
        if self.z_loss > 0:
            linear = linear + _z_loss_term(rows, norms, self.z_loss, self.reduction)
        return Terms(linear)

    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients:
        """``g = D'(logp)`` per supervised token (over the token count for a mean), ``k`` the z-loss's."""
        with torch.no_grad():
            zero = rows.logp.new_zeros(())
            g = torch.where(rows.mask, self.divergence.grad(rows.logp, self.alpha), zero)
            g = g * _scale(norms.tokens, self.reduction, g.dtype)
            k = _z_loss_k(rows, norms, self.z_loss, self.reduction)
            return Coefficients(g, k, None if rows.ref_tok.dim() == 0 else torch.zeros_like(g), None)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        return terms.linear

    def explain(self, rows: Rows) -> Optional[str]:
        with torch.no_grad():
            per = self.per_element(rows)
        if bool(torch.isfinite(per).all()):
            return (f"the {self.reduction} of the per-token losses overflows float32 (largest "
                    f"{float(per.abs().max()):g}); use reduction='mean'")
        return None


# ---------------------------------------------------------------------------------------------
# DPO family on the sequence log-probs of (chosen, rejected) row pairs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DPOSpec:
    """A DPO-family loss on ``2B`` rows (``0..B-1`` chosen, ``B..2B-1`` rejected), mean over pairs;
    the one home of the DPO options (validated here; :mod:`fdiv_kernels.formulas.preference`).

    ``loss_type``: a name of :data:`fdiv_kernels.DPO_LOSS_TYPES`; ``beta`` (> 0);
    ``label_smoothing`` in [0, 0.5) (read by the loss types that use it); ``gamma``: SimPO's target
    margin (TRL's ``simpo_gamma``); ``divergence``: the f-DPO score, a registry name or entry that
    supports ``"dpo"`` (``kl`` is standard DPO); ``alpha``: its coefficient for ``divergence="alpha"``;
    ``length_normalize``: mean instead of summed sequence log-probs (``None``: the loss type's
    default, True for ipo and simpo as TRL does). The reference is per row (``Rows.ref_seq``,
    same layout and normalisation); ``simpo`` needs none.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    divergence: Union[str, Divergence] = "kl"
    alpha: float = 1.0
    length_normalize: Optional[bool] = None

    def __post_init__(self):
        checks.check_choice("loss_type", self.loss_type, tuple(DPO_LOSS_TYPES))
        entry = get_divergence(self.divergence, "dpo")
        if entry.name != "kl" and not DPO_LOSS_TYPES[self.loss_type].needs_reference:
            refs = ", ".join(t.name for t in DPO_LOSS_TYPES.values() if t.needs_reference)
            raise ValueError(f"divergence={entry.name!r} scores log-ratios to a reference: it applies to loss types "
                             f"{refs}, not {self.loss_type}")
        checks.check_beta(self.beta)
        if not (checks.is_real(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        checks.check_finite_number("gamma", self.gamma)
        checks.check_finite_number("alpha", self.alpha)
        if entry.name == "alpha" and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 for divergence='alpha', got {self.alpha}")
        length_normalize = self.length_normalize
        if length_normalize is None:
            length_normalize = DPO_LOSS_TYPES[self.loss_type].length_normalized
        for name, value in (("divergence", entry), ("beta", float(self.beta)),
                            ("label_smoothing", float(self.label_smoothing)), ("gamma", float(self.gamma)),
                            ("alpha", float(self.alpha)), ("length_normalize", bool(length_normalize))):
            object.__setattr__(self, name, value)

    reduction = "mean"
    references = ("row",)  # sequence log-probs in the spec's normalisation
    token_local = False
    uses_lme = False
    single_pass = True

    @property
    def score(self) -> PreferenceScore:
        """The f-DPO score of :attr:`divergence` (what the formulas read)."""
        return self.divergence.preference

    @property
    def needs_reference(self) -> bool:
        return DPO_LOSS_TYPES[self.loss_type].needs_reference

    def row_groups(self, num_rows: int) -> torch.Tensor:
        """Pair ``i`` is rows ``i`` and ``i + B``: they share a chunk."""
        if num_rows % 2:
            raise ValueError(f"a DPO batch has 2B rows (chosen then rejected), got {num_rows}")
        return torch.arange(num_rows) % (num_rows // 2)

    def normalizers(self, mask2: torch.Tensor) -> Norms:
        return normalizers(mask2, pairs=mask2.shape[0] // 2)

    def sequence_logps(self, rows: Rows) -> torch.Tensor:
        """``[r]`` summed (or, with ``length_normalize``, mean) log-probs of each row."""
        s = torch.where(rows.mask, rows.logp, rows.logp.new_zeros(())).sum(dim=1)
        return s / rows.mask.sum(dim=1).clamp(min=1) if self.length_normalize else s

    def _pairs(self, rows: Rows):
        """``(pc, pr, rc, rr)`` of rows laid out as ``(chosen_0, rejected_0, chosen_1, ...)``."""
        s = self.sequence_logps(rows).view(-1, 2)
        ref = None if rows.ref_seq is None else rows.ref_seq.view(-1, 2)
        return s[:, 0], s[:, 1], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1]

    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([r] beta * (s - ref), rows with a token, value_s0)``: the rows' implicit rewards
        (``beta * s`` without a reference)."""
        s = self.sequence_logps(rows)
        if rows.ref_seq is not None and self.needs_reference:
            s = s - rows.ref_seq
        return self.beta * s, rows.mask.any(dim=1), value_s0(rows)

    def pair_losses(self, rows: Rows) -> torch.Tensor:
        """``[pairs]`` losses of rows laid out as ``(chosen_0, rejected_0, chosen_1, ...)``."""
        return pair_losses(*self._pairs(rows), self)

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        return Terms(self.pair_losses(rows).sum() / max(1, norms.pairs))

    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients:
        """``g = d loss / d s_row`` spread over the row's supervised tokens (divided by their count
        when length-normalised); the per-row reference gets ``-d loss / d s_row``."""
        with torch.no_grad():
            d_c, d_r = pair_loss_grads(*self._pairs(rows), self)
            ds = torch.stack([d_c, d_r], dim=1).reshape(-1) / max(1, norms.pairs)
            per_tok = ds / rows.mask.sum(dim=1).clamp(min=1).to(ds.dtype) if self.length_normalize else ds
            zero = rows.logp.new_zeros(())
            g = torch.where(rows.mask, per_tok[:, None].to(rows.logp.dtype), zero)
            ref_seq = None if rows.ref_seq is None or not self.needs_reference else -ds
            ref_tok = None if rows.ref_tok.dim() == 0 else torch.zeros_like(g)
            return Coefficients(g, torch.zeros_like(g), ref_tok, ref_seq)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        return terms.linear

    def per_element(self, rows: Rows) -> torch.Tensor:
        return self.pair_losses(rows)

    def explain(self, rows: Rows) -> Optional[str]:
        with torch.no_grad():
            pc, pr, rc, rr = self._pairs(rows)
            losses = pair_losses(pc, pr, rc, rr, self)
        return explain_pair(pc, pr, rc, rr, losses, self,
                            names=("policy chosen", "policy rejected", "ref_logp (chosen)", "ref_logp (rejected)"))


# ---------------------------------------------------------------------------------------------
# Distillation D_f(P_teacher || P_student) over the vocabulary
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillSpec:
    """The distillation loss of :func:`fdiv_kernels.distill_loss` (validated on creation; the one
    home of its options, from the public signature down to the kernels' epilogue).

    Per counted token, with ``p_t = softmax(z_t / T)``, ``p_s = softmax(z_s / T)``:

        loss_token = kappa D_f(P_t || P_s) + hard_label_weight * NLL(y | softmax(z_s)),

    ``kappa = T^2`` with ``t2_scaling`` (Hinton et al.: keeps the soft gradients' scale as ``T``
    changes) and 1 otherwise (TRL, Liger); the hard-label NLL uses the untempered student logits.
    ``reduction``: mean over counted tokens, sum, or none (per token).

    ``divergence``: a registry name or entry with a ``"distill"`` form
    (:mod:`fdiv_kernels.formulas.distill`); ``beta`` in ``[0, 1]``: the mixture weight of ``js``
    (TRL's ``generalized_jsd_loss``: 0 = forward KL, 1 = reverse KL); ``alpha``: Amari's
    coefficient, required by (and only by) ``divergence="alpha"``.
    """

    divergence: Union[str, Divergence] = "kl"
    beta: float = 0.5
    alpha: Optional[float] = None
    temperature: float = 1.0
    hard_label_weight: float = 0.0
    reduction: str = "mean"
    t2_scaling: bool = False

    def __post_init__(self):
        entry = get_divergence(self.divergence, "distill")
        checks.check_choice("reduction", self.reduction, REDUCTIONS)
        checks.check_unit_interval("beta", self.beta)
        checks.check_finite_number("temperature", self.temperature)
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        checks.check_finite_number("hard_label_weight", self.hard_label_weight, minimum=0.0)
        if entry.name == "alpha":
            if self.alpha is None:
                raise ValueError("divergence='alpha' needs alpha= (Amari's coefficient; 1 is forward KL, 0 reverse KL)")
            checks.check_finite_number("alpha", self.alpha)
        elif self.alpha is not None:
            raise ValueError(f"alpha= applies to divergence='alpha' only, got alpha={self.alpha!r} with "
                             f"divergence={entry.name!r}")
        if not isinstance(self.t2_scaling, bool):
            raise TypeError(f"t2_scaling must be a bool, got {type(self.t2_scaling).__name__}")
        for name, value in (("divergence", entry), ("beta", float(self.beta)),
                            ("alpha", None if self.alpha is None else float(self.alpha)),
                            ("temperature", float(self.temperature)),
                            ("hard_label_weight", float(self.hard_label_weight))):
            object.__setattr__(self, name, value)

    @property
    def form(self) -> DistillForm:
        """The form computed (``js`` at ``beta`` 0 / 1 is forward / reverse KL, as in TRL and Liger)."""
        return resolve_distill(self.divergence.name, self.beta, self.alpha)[0]

    @property
    def param(self) -> float:
        """The form's parameter ``c`` (``beta`` of ``js``, ``alpha`` of ``alpha``, else 0)."""
        return resolve_distill(self.divergence.name, self.beta, self.alpha)[1]

    @property
    def inv_temperature(self) -> float:
        """``1 / T`` as every backend multiplies the logits by it (one rounding, the same bits)."""
        return 1.0 / self.temperature

    @property
    def kappa(self) -> float:
        """The divergence's weight: ``T^2`` with ``t2_scaling``, else 1."""
        return self.temperature ** 2 if self.t2_scaling else 1.0

    def epilogue(self, zt_raw: torch.Tensor, zs_raw: torch.Tensor, y: torch.Tensor, wt: Optional[torch.Tensor]):
        """``(div, nll, coef | None)`` of one chunk of rows in closed form (no autograd):
        :func:`fdiv_kernels.formulas.distill.chunk_epilogue` with this spec's options."""
        with torch.no_grad():
            return distill_epilogue(zt_raw, zs_raw, y, wt, form=self.form, c=self.param, inv_t=self.inv_temperature,
                                    kappa=self.kappa, hard_weight=self.hard_label_weight)

    def token_terms(self, zt_raw: torch.Tensor, zs_raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per row ``kappa D + hard_label_weight NLL`` from ``[n, V]`` logits, differentiable by
        autograd in ``zs_raw`` (the reference :meth:`epilogue`'s coefficient is checked against:
        tests/test_specs.py)."""
        inv_t = self.inv_temperature
        lt = torch.log_softmax(zt_raw * inv_t, dim=-1)
        ls = torch.log_softmax(zs_raw * inv_t, dim=-1)
        out = self.kappa * self.form.term(lt, ls, self.param).sum(-1)
        if self.hard_label_weight > 0:
            nll = torch.logsumexp(zs_raw, dim=-1) - zs_raw.gather(1, y[:, None]).squeeze(1)
            out = out + self.hard_label_weight * nll
        return out

    def explain(self, zt_raw: torch.Tensor, zs_raw: torch.Tensor, label: int, pos: Tuple[int, ...]) -> str:
        """Why the loss of the token at ``pos`` (its ``[V]`` raw logits, recomputed in float64) is
        not finite in float32: a masked or non-finite vocabulary, a hard label on a masked
        token, a divergence infinite on these distributions, or one beyond float32."""
        zt, zs = zt_raw.double(), zs_raw.double()
        div = self.divergence.name
        for who, z, arg in (("teacher", zt, "teacher_hidden, teacher_weight, teacher_bias or teacher_logits"),
                            ("student", zs, "hidden, weight or bias")):
            if bool(torch.isnan(z).any() or (z == math.inf).any()):
                return (f"the {who}'s logits at position {pos} are not finite: {arg} hold NaN/inf, or the logits "
                        f"overflow float32")
            if bool((z == -math.inf).all()):
                return (f"every {who} logit at position {pos} is -inf (the whole vocabulary is masked): its softmax is "
                        f"undefined there; set labels{list(pos)} to ignore_index")
        if self.hard_label_weight > 0 and float(zs[label]) == -math.inf:
            return (f"labels{list(pos)} = {label} is a masked token of the student (its logit is -inf), so the hard-label "
                    f"NLL (hard_label_weight={self.hard_label_weight:g}) is infinite; mask that position "
                    f"(ignore_index) or unmask the token")
        inv_t = self.inv_temperature
        lt, ls = torch.log_softmax(zt * inv_t, -1), torch.log_softmax(zs * inv_t, -1)
        terms = self.form.term(lt, ls, self.param)
        bad = ~torch.isfinite(terms)
        if bool(bad.any()):
            v = int(bad.nonzero()[0])
            if float(ls[v]) == -math.inf:
                side = (f"the teacher gives token {v} probability {math.exp(float(lt[v])):.3g} where the student's is 0 "
                        f"(its logit is -inf)")
            else:
                side = (f"the student gives token {v} probability {math.exp(float(ls[v])):.3g} where the teacher's is "
                        f"0 (its logit is -inf)")
            return (f"divergence {div!r} is infinite at position {pos}: {side}, and {div}'s generator f has no finite "
                    f"limit there; mask that position (ignore_index), unmask the token, or use a bounded divergence "
                    f"(tv, js, squared_hellinger)")
        value = float(self.kappa * terms.sum())
        lr = lt - ls
        v = int(torch.argmax(lr.abs().nan_to_num(0.0)))
        return (f"divergence {div!r} at position {pos} is {value:.3g} in float64, beyond float32 (or its gradient is): "
                f"token {v} has log p_t - log p_s = {float(lr[v]):.4g} at temperature {self.temperature:g}; a bounded "
                f"divergence (tv, js, squared_hellinger), a higher temperature or reduction='mean' keep it finite")

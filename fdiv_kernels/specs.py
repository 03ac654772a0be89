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
from typing import Any, NamedTuple, Optional, Protocol, Tuple, Union

import torch

from . import checks
from .formulas.distill import DistillForm
from .formulas.distill import chunk_epilogue as distill_epilogue
from .formulas.distill import resolve as resolve_distill
from .formulas.divergences import Divergence, get_divergence
from .formulas.preference import (DPO_LOSS_TYPES, KTO_LOSS_TYPES, PreferenceScore, explain_pair, kto_loss_grads,
                                  kto_losses, nll_weight, pair_loss_grads, pair_losses)
from .formulas.primal import PrimalLoss
from .formulas.stable import exp_linear_tail

__all__ = ["CPO_LOSS_TYPES", "DPOSpec", "DistillSpec", "FDivSpec", "Coefficients", "HeadSpec", "KTOSpec", "LEVELS",
           "LogSumExpAccumulator", "LossSpec", "Norms", "PER_ELEMENT_KNEE", "PrimalSpec", "REDUCTIONS", "Rows", "Terms",
           "VALUE_MODES", "VocabShard", "cpo_spec", "is_loss_spec", "normalizers", "orpo_spec"]

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
    ``ref_seq``: per-row reference log-probs ``[r]`` or ``None``; ``start``: the index of the first
    of these rows in the spec's row order (a chunk's offset: for per-row options such as KTO's
    desirable flags). The cross-entropy options (``fk.loss(class_weight=, label_smoothing=)``,
    ``docs/math.md`` section 3, "Class weights and label smoothing"): ``weight`` ``[r, T]`` each
    token's class weight ``c[y_t]`` (0 where unsupervised; None: the options are off) and
    ``mean_logit`` ``[r, T]`` each token's class-weighted mean logit ``(1/V) sum_v c_v z_v`` and
    ``class_mean`` the mean class weight ``C / V = (1/V) sum_v c_v`` (0-d), both None without label
    smoothing.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor
    ref_tok: torch.Tensor
    ref_seq: Optional[torch.Tensor]
    start: int = 0
    weight: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    class_mean: Optional[torch.Tensor] = None

    def select(self, rows: torch.Tensor) -> "Rows":
        """The same statistics for the rows ``rows`` (an index tensor into a whole batch: ``start`` 0)."""
        pick = lambda t: t if t is None or t.dim() == 0 else t.index_select(0, rows)  # noqa: E731
        return Rows(*(pick(t) for t in self[:5]), 0, pick(self.weight), pick(self.mean_logit), self.class_mean)


class Norms(NamedTuple):
    """Batch-level counts a mean divides by (0-d tensors): supervised tokens, rows with one, pairs
    (a preference loss's examples: DPO's pairs, KTO's rows) and ``chosen_tokens``, the count the NLL
    term of a preference loss divides by (the chosen / desirable rows' tokens, or a global count
    the spec was given; None without that term). ``weight``: with class weights (:attr:`Rows.weight`)
    the sum of the supervised tokens' class weights, what a token mean divides by (0-d; else None)."""

    tokens: torch.Tensor
    rows: torch.Tensor
    pairs: int = 0
    chosen_tokens: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None


class Terms(NamedTuple):
    """A chunk's contribution: ``linear`` (0-d) and, for log-mean-exp losses, ``lme`` (0-d, may be -inf)."""

    linear: torch.Tensor
    lme: Optional[torch.Tensor] = None


class Coefficients(NamedTuple):
    """Derivatives of a chunk's target (:class:`LossSpec`) with respect to the fields of
    :class:`Rows`: ``logp``, ``lse`` ``[r, T]`` (0 where unsupervised), ``ref_tok`` ``[r, T]`` (None
    when the reference is not per token), ``ref_seq`` ``[r]`` (None without one) and ``mean_logit``
    ``[r, T]`` (None when the spec does not read :attr:`Rows.mean_logit`)."""

    logp: torch.Tensor
    lse: torch.Tensor
    ref_tok: Optional[torch.Tensor] = None
    ref_seq: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None


class LossSpec(Protocol):
    """What the kernels need of a loss (every spec of this module implements it).

    Attributes: ``reduction`` (``"mean"``, ``"sum"`` or ``"none"``), ``references`` (the reference
    shapes it takes: ``"token"`` ``[..., T]``, ``"row"`` ``[...]``), ``token_local`` (a token's
    terms depend on that token alone: chunks may split rows anywhere), ``uses_lme`` (a log-mean-exp
    part: the target is ``lme``), ``single_pass`` (the one-pass fused path applies), ``divergence``
    (the registry entry or primal form, reported in the output).

    Methods: ``row_groups(num_rows)`` (rows that must share a chunk, or None), ``normalizers(mask2)``,
    ``units(norms)`` (a log-mean-exp spec only: the ``n`` of its ``log mean``),
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
class VocabShard:
    """This process's slice of a vocabulary-parallel LM head (``docs/design.md``, "Vocabulary
    parallelism"): the ``[V, H]`` head is split along the vocabulary into contiguous shards, one per
    rank of ``group`` (a ``torch.distributed`` process group), shard ``index`` holding rows
    ``[offset, offset + size)`` of the global vocabulary; ``sizes`` are every shard's rows in
    vocabulary order (they may differ; each is >= 1).

    Built by the API layer (``fk.loss(..., vocab_group=)`` or a ``DTensor`` weight placed
    ``Shard(0)``) from one all-gather of the shards' sizes, and carried by the
    :class:`HeadSpec`; the autograd layer combines the shards' per-token statistics with
    all-reduces over ``group``; the kernels see only their local shard.
    """

    group: Any
    index: int
    sizes: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        checks.check_vocab_shard(self.index, self.sizes)

    @property
    def offset(self) -> int:
        """Global id of this shard's first row."""
        return sum(self.sizes[:self.index])

    @property
    def size(self) -> int:
        """Rows of this shard (``V_r``)."""
        return self.sizes[self.index]

    @property
    def vocab_size(self) -> int:
        """Rows of the whole head (``V``)."""
        return sum(self.sizes)


@dataclass(frozen=True)
class HeadSpec:
    """How logits are formed from the LM head: ``z = cap(h W^T + b) / temperature`` with the
    soft-cap ``cap(x) = softcap * tanh(x / softcap)`` (``None``: none), which backend runs it
    (``"auto"`` or a name of :func:`fdiv_kernels.available_backends`), and, for a head split along
    the vocabulary across a tensor-parallel group, this process's shard (:class:`VocabShard`;
    ``None``: the whole head; set by the API layer from ``vocab_group=`` or a ``DTensor`` weight)."""

    softcap: Optional[float] = None
    temperature: float = 1.0
    backend: str = "auto"
    vocab: Optional[VocabShard] = None

    def __post_init__(self):
        checks.check_head_options(self)
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a name (str), got {type(self.backend).__name__}")
        if self.vocab is not None and not isinstance(self.vocab, VocabShard):
            raise TypeError(f"vocab must be a VocabShard or None, got {type(self.vocab).__name__} (pass a process "
                            f"group as vocab_group= to the API instead)")


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


def _token_scale(norms: Norms, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """What a token mean's terms are multiplied by: ``1 / D`` with ``D`` the supervised tokens, or
    with class weights the sum of their weights (0 when that sum is 0: nothing counts); 1 for a sum."""
    if norms.weight is None or reduction == "sum":
        return _scale(norms.tokens, reduction, dtype)
    d = norms.weight.to(dtype)
    one = torch.ones((), dtype=dtype, device=d.device)
    return torch.where(d > 0, one / torch.where(d > 0, d, one), one.new_zeros(()))


def _class_options(per: torch.Tensor, rows: Rows, eps: float) -> torch.Tensor:
    """Per-token losses ``per [r, T]`` with the cross-entropy options: ``(1 - eps) c[y_t] per_t +
    eps U_t``, ``U_t = -(1/V) sum_v c_v log p_v = (C/V) lse_t - mean_logit_t`` (``docs/math.md``
    section 3); ``per`` itself when they are off (:attr:`Rows.weight` None)."""
    if rows.weight is None:
        return per
    out = per * rows.weight.to(per.dtype)
    if eps:
        uniform = rows.class_mean.to(per.dtype) * rows.lse - rows.mean_logit
        out = (1.0 - eps) * out + eps * torch.where(rows.mask, uniform, per.new_zeros(()))
    return out


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
    :func:`fdiv_kernels.loss` of the same names. ``label_smoothing`` ``eps`` in ``[0, 1]`` (and the
    class weights, :attr:`Rows.weight`, which the API layer gives the rows): each token's loss is
    ``(1 - eps) c[y_t] L_t + eps U_t`` with ``U_t = -(1/V) sum_v c_v log p_v``, a mean divides by
    ``sum_t c[y_t]`` (``docs/math.md`` section 3): with ``divergence="sft"``, ``beta=1`` and no
    reference, ``F.cross_entropy(weight=c, label_smoothing=eps)``. Token level, ``values="drop"``
    and the divergences averaged per token (not ``kl``, ``squared_hellinger``) only.
    """

    divergence: Union[str, Divergence] = "sft"
    beta: float = 1.0
    level: str = "token"
    values: str = "drop"
    z_loss: float = 0.0
    length_normalize: bool = False
    reduction: str = "mean"
    label_smoothing: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "divergence", get_divergence(self.divergence))
        checks.check_unit_interval("label_smoothing", self.label_smoothing)
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        if self.label_smoothing and not self.takes_class_options:
            raise ValueError(checks.class_options_refusal("label_smoothing", self))
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
    def takes_class_options(self) -> bool:
        """Whether class weights and label smoothing apply: a per-token loss averaged over tokens
        (token level, ``values="drop"``, a divergence that is not a log-mean-exp)."""
        return self.level == "token" and self.values == "drop" and self.divergence.aggregate == "mean"

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

    def units(self, norms: Norms) -> torch.Tensor:
        """The count a mean (and the log-mean-exp's ``log n``) divides by: supervised tokens at token
        level, rows with one at sequence level."""
        return norms.tokens if self.level == "token" else norms.rows

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        """This chunk's ``linear`` terms and (KL, squared Hellinger) its log-sum-exp ``lme``."""
        rw = self._reward(rows)
        u, w = rw.u, rw.weight
        div, red = self.divergence, self.reduction
        zero = u.new_zeros(())
        linear, lme = zero, None
        if rows.weight is not None:  # the cross-entropy options (token level, averaged divergences)
            per = _class_options(torch.where(w, -div.objective(u), zero), rows, self.label_smoothing)
            linear = per.sum() * _token_scale(norms, red, u.dtype)
        elif div.aggregate == "mean":
            linear = _mean_or_sum(torch.where(w, -div.objective(u), zero).sum(), self.units(norms), red)
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
            eps = self.label_smoothing
            if rows.weight is not None:  # the cross-entropy options: (1 - eps) c[y_t] per token, over sum c[y_t]
                d = torch.where(w, -div.dphi(u), zero) * rows.weight.to(u.dtype) * _token_scale(norms, red, u.dtype)
                d = (1.0 - eps) * d
            elif div.aggregate == "mean":
                d = torch.where(w, -div.dphi(u), zero) * _scale(self.units(norms), red, u.dtype)
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
            mean_logit = None
            if rows.mean_logit is not None and eps:  # eps U_t = eps ((C/V) lse_t - mean_logit_t), scaled
                s = eps * _token_scale(norms, red, u.dtype)
                k = k + s * rows.class_mean.to(u.dtype)
                mean_logit = torch.where(m2, -s, zero)
            return Coefficients(torch.where(m2, g, zero), torch.where(m2, k, zero), ref_tok, ref_seq, mean_logit)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        if terms.lme is None:
            return terms.linear
        return _finish_lme(terms.linear, terms.lme, self.units(norms), self.reduction)

    def per_element(self, rows: Rows) -> torch.Tensor:
        """``reduction="none"``: ``-phi(u)`` (``psi - offset`` for log-mean-exp divergences) per
        token / row, 0 where nothing is supervised; with the cross-entropy options ``(1 - eps)
        c[y_t] (that) + eps U_t`` (class docstring)."""
        u, w, _ = self.rewards(rows)
        div = self.divergence
        zero = u.new_zeros(())
        if div.aggregate == "mean":
            return _class_options(torch.where(w, -div.objective(u), zero), rows, self.label_smoothing)
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
# Preference losses on sequence log-probs: DPO family (with CPO, ORPO) and KTO
# ---------------------------------------------------------------------------------------------

def _sequence_logps(rows: Rows, length_normalize: bool) -> torch.Tensor:
    """``[r]`` summed (or, with ``length_normalize``, mean) log-probs of each row."""
    s = torch.where(rows.mask, rows.logp, rows.logp.new_zeros(())).sum(dim=1)
    return s / rows.mask.sum(dim=1).clamp(min=1) if length_normalize else s


def _spread(ds: torch.Tensor, rows: Rows, length_normalize: bool) -> torch.Tensor:
    """``d loss / dlogp`` per token of ``d loss / ds_row`` ``[r]`` (divided by the row's token count
    when length-normalised), 0 where unsupervised."""
    per_tok = ds / rows.mask.sum(dim=1).clamp(min=1).to(ds.dtype) if length_normalize else ds
    return torch.where(rows.mask, per_tok[:, None].to(rows.logp.dtype), rows.logp.new_zeros(()))


def _nll_sum(rows: Rows, chosen: torch.Tensor) -> torch.Tensor:
    """``-sum logp`` over the supervised tokens of the rows ``chosen`` (bool ``[r]``)."""
    return -torch.where(rows.mask & chosen[:, None], rows.logp, rows.logp.new_zeros(())).sum()


def _positive(count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A count to divide by, in ``dtype``: 1 where it is 0 (its sum is 0 then)."""
    count = count.to(dtype)
    return torch.where(count > 0, count, torch.ones_like(count))


def _chosen_tokens(nll_tokens: Optional[float], mask2: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The NLL term's count: ``nll_tokens`` when given, else the supervised tokens of the rows ``chosen``."""
    if nll_tokens is not None:
        return torch.tensor(float(nll_tokens), dtype=torch.float64, device=mask2.device)
    return (mask2 & chosen[:, None]).sum()


def _check_nll_tokens(nll_tokens) -> None:
    if nll_tokens is not None and not (checks.is_real(nll_tokens) and math.isfinite(nll_tokens) and nll_tokens > 0):
        raise ValueError(f"nll_tokens must be None or a finite number > 0, got {nll_tokens!r}")


def _components(loss_type: Union[str, Tuple[str, ...]], loss_weights: Tuple[float, ...]) -> Tuple[Tuple[str, float], ...]:
    """``((loss_type, weight), ...)`` of a preference spec's validated ``loss_type`` (a name or names)."""
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    return tuple(zip(names, loss_weights))


@dataclass(frozen=True)
class DPOSpec:
    """A DPO-family loss on ``2B`` rows (``0..B-1`` chosen, ``B..2B-1`` rejected), mean over pairs;
    the one home of the DPO options (validated here; :mod:`fdiv_kernels.formulas.preference`).

    ``loss_type``: a name of :data:`fdiv_kernels.DPO_LOSS_TYPES`, or several (TRL's
    ``loss_type=[...]``), summed with ``loss_weights`` (TRL's; None: 1.0 each); ``"sft"`` is the
    mean NLL of the chosen answers' tokens (TRL's ``sft``, formerly ``rpo_alpha``; Liger's
    ``compute_nll_loss=True, alpha=w`` is ``loss_type=(..., "sft"), loss_weights=(..., w)``).
    ``beta`` (> 0); ``label_smoothing`` in [0, 0.5) (read by the loss types that use it; exo_pair
    needs it > 0); ``gamma``: SimPO's target margin (TRL's ``simpo_gamma``); ``divergence``: the
    f-DPO score, a registry name or entry that supports ``"dpo"`` (``kl`` is standard DPO; the
    ``scored`` loss types only); ``alpha``: its coefficient for ``divergence="alpha"``;
    ``length_normalize``: mean instead of summed sequence log-probs (``None``: the loss types'
    default, True for ipo, simpo, sigmoid_norm and orpo as TRL does; types with different defaults
    combine only with an explicit value); ``discopop_tau``: DiscoPOP's temperature (TRL's name);
    ``reference_free``: log-ratios without a reference (Liger's ``use_ref_model=False``, TRL's
    ``CPOTrainer``: :func:`cpo_spec`); ``nll_tokens``: the count the ``sft`` term divides by
    (None: this call's chosen tokens; give the global batch's to make micro-batches add up, see
    docs/math.md). The reference is per row (``Rows.ref_seq``, same layout and normalisation).
    """

    loss_type: Union[str, Tuple[str, ...]] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    divergence: Union[str, Divergence] = "kl"
    alpha: float = 1.0
    length_normalize: Optional[bool] = None
    loss_weights: Optional[Tuple[float, ...]] = None
    discopop_tau: float = 0.05
    reference_free: bool = False
    nll_tokens: Optional[float] = None

    def __post_init__(self):
        names, weights = checks.check_loss_types(self.loss_type, self.loss_weights, tuple(DPO_LOSS_TYPES))
        entry = get_divergence(self.divergence, "dpo")
        unscored = [t for t in names if not DPO_LOSS_TYPES[t].scored]
        if entry.name != "kl" and unscored:
            scored = ", ".join(t.name for t in DPO_LOSS_TYPES.values() if t.scored)
            raise ValueError(f"divergence={entry.name!r} replaces the log-ratios by f-DPO scores: it applies to loss "
                             f"types {scored}, not {', '.join(unscored)}")
        checks.check_beta(self.beta)
        if not (checks.is_real(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in names and not self.label_smoothing > 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (its epsilon; the EXO paper and TRL "
                             "recommend 1e-3)")
        checks.check_finite_number("gamma", self.gamma)
        checks.check_finite_number("alpha", self.alpha)
        if entry.name == "alpha" and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 for divergence='alpha', got {self.alpha}")
        if not (checks.is_real(self.discopop_tau) and math.isfinite(self.discopop_tau) and self.discopop_tau > 0):
            raise ValueError(f"discopop_tau must be a finite number > 0, got {self.discopop_tau!r}")
        _check_nll_tokens(self.nll_tokens)
        length_normalize = self.length_normalize
        if length_normalize is None:
            defaults = {t: DPO_LOSS_TYPES[t].length_normalized for t in names if DPO_LOSS_TYPES[t].form != "nll"}
            if len(set(defaults.values())) > 1:
                mean = sorted(t for t, v in defaults.items() if v)
                raise ValueError(f"loss types {mean} take length-averaged log-probs and {sorted(set(defaults) - set(mean))} "
                                 f"summed ones: pass length_normalize=True or False (one normalisation for all)")
            length_normalize = any(defaults.values())
        for name, value in (("loss_type", names[0] if len(names) == 1 else names), ("loss_weights", weights),
                            ("divergence", entry), ("beta", float(self.beta)),
                            ("label_smoothing", float(self.label_smoothing)), ("gamma", float(self.gamma)),
                            ("alpha", float(self.alpha)), ("length_normalize", bool(length_normalize)),
                            ("discopop_tau", float(self.discopop_tau)), ("reference_free", bool(self.reference_free)),
                            ("nll_tokens", None if self.nll_tokens is None else float(self.nll_tokens))):
            object.__setattr__(self, name, value)

    reduction = "mean"
    references = ("row",)  # sequence log-probs in the spec's normalisation
    token_local = False
    uses_lme = False
    single_pass = True

    @property
    def components(self) -> Tuple[Tuple[str, float], ...]:
        """``((loss_type, weight), ...)``: what the formulas sum."""
        return _components(self.loss_type, self.loss_weights)

    @property
    def score(self) -> PreferenceScore:
        """The f-DPO score of :attr:`divergence` (what the formulas read)."""
        return self.divergence.preference

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and any(DPO_LOSS_TYPES[t].needs_reference for t, _ in self.components)

    @property
    def batch_coupled(self) -> bool:
        """A loss type sorts the batch (aot): every row in one chunk, chosen rows then rejected ones."""
        return any(DPO_LOSS_TYPES[t].form == "sorted" for t, _ in self.components)

    def row_groups(self, num_rows: int) -> torch.Tensor:
        """Pair ``i`` is rows ``i`` and ``i + B``: they share a chunk (all rows one chunk when the
        loss couples the batch)."""
        if num_rows % 2:
            raise ValueError(f"a DPO batch has 2B rows (chosen then rejected), got {num_rows}")
        if self.batch_coupled:
            return torch.zeros(num_rows, dtype=torch.long)
        return torch.arange(num_rows) % (num_rows // 2)

    def _chosen(self, num_rows: int, device) -> torch.Tensor:
        """Bool ``[r]``: the chosen rows among rows in the spec's order."""
        idx = torch.arange(num_rows, device=device)
        return idx < num_rows // 2 if self.batch_coupled else idx % 2 == 0

    def normalizers(self, mask2: torch.Tensor) -> Norms:
        b = mask2.shape[0] // 2
        chosen = None
        if nll_weight(self):
            chosen = _chosen_tokens(self.nll_tokens, mask2, torch.arange(mask2.shape[0], device=mask2.device) < b)
        return Norms(mask2.sum(), mask2.any(dim=1).sum(), b, chosen)

    def sequence_logps(self, rows: Rows) -> torch.Tensor:
        """``[r]`` summed (or, with ``length_normalize``, mean) log-probs of each row."""
        return _sequence_logps(rows, self.length_normalize)

    def _split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected halves of ``[r]`` values in the spec's row order."""
        v = x.view(2, -1) if self.batch_coupled else x.view(-1, 2).t()
        return v[0], v[1]

    def _join(self, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_split`."""
        return torch.cat([c, r]) if self.batch_coupled else torch.stack([c, r], dim=1).reshape(-1)

    def _pairs(self, rows: Rows):
        """``(pc, pr, rc, rr)`` of rows in the spec's order (``(chosen_0, rejected_0, chosen_1, ...)``,
        or all chosen then all rejected when the loss couples the batch); no reference when the
        loss reads none."""
        pc, pr = self._split(self.sequence_logps(rows))
        if rows.ref_seq is None or not self.needs_reference:
            return pc, pr, None, None
        rc, rr = self._split(rows.ref_seq)
        return pc, pr, rc, rr

    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([r] beta * (s - ref), rows with a token, value_s0)``: the rows' implicit rewards
        (``beta * s`` without a reference)."""
        s = self.sequence_logps(rows)
        if rows.ref_seq is not None and self.needs_reference:
            s = s - rows.ref_seq
        return self.beta * s, rows.mask.any(dim=1), value_s0(rows)

    def nll_mean(self, rows: Rows) -> Optional[torch.Tensor]:
        """The sft term's mean NLL over a whole batch in the spec's order (None without the term)."""
        if not nll_weight(self):
            return None
        chosen = self._chosen(rows.mask.shape[0], rows.mask.device)
        count = _chosen_tokens(self.nll_tokens, rows.mask, chosen)
        return _nll_sum(rows, chosen) / _positive(count, rows.logp.dtype)

    def pair_losses(self, rows: Rows) -> torch.Tensor:
        """``[pairs]`` losses of a whole batch in the spec's row order (the sorted types per rank;
        the sft term's share, its batch mean NLL times its weight, in every pair)."""
        return pair_losses(*self._pairs(rows), self, nll=self.nll_mean(rows))

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        pc, pr, rc, rr = self._pairs(rows)
        linear = pair_losses(pc, pr, rc, rr, self, nll=pc.new_zeros(())).sum() / max(1, norms.pairs)
        w = nll_weight(self)
        if w:
            chosen = self._chosen(rows.mask.shape[0], rows.mask.device)
            linear = linear + w * _nll_sum(rows, chosen) / _positive(norms.chosen_tokens, rows.logp.dtype)
        return Terms(linear)

    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients:
        """``g = d loss / d s_row`` spread over the row's supervised tokens (divided by their count
        when length-normalised), plus ``-w / N_chosen`` per chosen token of the sft term; the
        per-row reference gets its own derivative (``-d loss / d s_row`` but for the sorted types)."""
        with torch.no_grad():
            pc, pr, rc, rr = self._pairs(rows)
            d_c, d_r, d_rc, d_rr = pair_loss_grads(pc, pr, rc, rr, self)
            scale = 1.0 / max(1, norms.pairs)
            g = _spread(self._join(d_c, d_r) * scale, rows, self.length_normalize)
            w = nll_weight(self)
            if w:
                chosen = self._chosen(rows.mask.shape[0], rows.mask.device)
                per = -w / _positive(norms.chosen_tokens, g.dtype)
                g = g + torch.where(rows.mask & chosen[:, None], per, g.new_zeros(()))
            ref_seq = None if d_rc is None else self._join(d_rc, d_rr) * scale
            ref_tok = None if rows.ref_tok.dim() == 0 else torch.zeros_like(g)
            return Coefficients(g, torch.zeros_like(g), ref_tok, ref_seq)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        return terms.linear

    def per_element(self, rows: Rows) -> torch.Tensor:
        return self.pair_losses(rows)

    def explain(self, rows: Rows) -> Optional[str]:
        with torch.no_grad():
            pc, pr, rc, rr = self._pairs(rows)
            losses = self.pair_losses(rows)
        return explain_pair(pc, pr, rc, rr, losses, self,
                            names=("policy chosen", "policy rejected", "ref_logp (chosen)", "ref_logp (rejected)"))


#: TRL ``CPOConfig.loss_type`` values (``alphapo`` is TRL's shorthand for simpo with ``cpo_alpha=0``)
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_spec(loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
             simpo_gamma: float = 0.5, alpha: float = 0.0) -> DPOSpec:
    """The :class:`DPOSpec` of TRL's ``CPOTrainer`` (``CPOConfig``'s names): ``loss_type`` one of
    :data:`CPO_LOSS_TYPES` without a reference, plus ``cpo_alpha`` times the chosen answers' NLL
    (the ``sft`` term; Liger's CPO/SimPO ``alpha``, on by default as there); ``simpo_gamma``:
    simpo's margin; ``alpha``: AlphaPO's reward ``(1 - p^-alpha) / alpha`` (the f-DPO ``alpha``
    score with coefficient ``1 - alpha``; 0: log-probs)."""
    checks.check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    checks.check_finite_number("cpo_alpha", cpo_alpha)
    checks.check_finite_number("alpha", alpha)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    names, weights = ((loss_type, "sft"), (1.0, float(cpo_alpha))) if cpo_alpha else ((loss_type,), (1.0,))
    return DPOSpec(loss_type=names, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
                   gamma=simpo_gamma if loss_type == "simpo" else 0.0, divergence="alpha" if alpha else "kl",
                   alpha=1.0 - alpha if alpha else 1.0, reference_free=True)


def orpo_spec(beta: float = 0.1, compute_nll_loss: bool = True) -> DPOSpec:
    """The :class:`DPOSpec` of ORPO (TRL's ``ORPOTrainer``, Liger's ``LigerFusedLinearORPOLoss``):
    the odds-ratio term ``-beta logsigmoid(log odds_c - log odds_r)`` on length-averaged log-probs,
    no reference, plus the chosen answers' NLL (``compute_nll_loss``, on as in both peers)."""
    return DPOSpec(loss_type=("orpo", "sft") if compute_nll_loss else "orpo", beta=beta)


@dataclass(frozen=True)
class KTOSpec:
    """KTO (TRL's ``KTOTrainer``, Liger's ``LigerFusedLinearKTOLoss``) on ``B`` unpaired rows,
    row ``i`` desirable when ``desirable[i]`` (TRL's ``label``); mean over the rows.

    ``loss_type``: ``"kto"`` or ``"apo_zero_unpaired"`` (:data:`KTO_LOSS_TYPES`), optionally with
    ``"sft"`` (the NLL of the desirable rows' tokens, over ``nll_tokens`` or this call's count),
    weighted by ``loss_weights``; ``beta`` (> 0); ``desirable_weight``, ``undesirable_weight``
    (TRL's names, >= 0); ``length_normalize``: mean instead of summed log-probs (Liger's
    ``average_log_prob``; TRL sums). The per-row reference ``Rows.ref_seq`` (optional: Liger's
    ``use_ref_model=False``) already holds kto's detached KL estimate ``z`` added to it (the
    module and :func:`fdiv_kernels.kto_loss` add it): ``u = beta (s - (ref + z))``.
    """

    loss_type: Union[str, Tuple[str, ...]] = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_weights: Optional[Tuple[float, ...]] = None
    length_normalize: bool = False
    nll_tokens: Optional[float] = None
    desirable: Tuple[bool, ...] = ()

    def __post_init__(self):
        names, weights = checks.check_loss_types(self.loss_type, self.loss_weights, KTO_LOSS_TYPES)
        if sum(t != "sft" for t in names) > 1:
            raise ValueError(f"KTO takes one of kto, apo_zero_unpaired (plus sft), got {list(names)}")
        checks.check_beta(self.beta)
        checks.check_finite_number("desirable_weight", self.desirable_weight, minimum=0.0)
        checks.check_finite_number("undesirable_weight", self.undesirable_weight, minimum=0.0)
        _check_nll_tokens(self.nll_tokens)
        if not isinstance(self.desirable, (tuple, list)) or not all(isinstance(d, bool) for d in self.desirable):
            raise TypeError(f"desirable must be a tuple of bools (one per row), got {self.desirable!r}")
        for name, value in (("loss_type", names[0] if len(names) == 1 else names), ("loss_weights", weights),
                            ("beta", float(self.beta)), ("desirable_weight", float(self.desirable_weight)),
                            ("undesirable_weight", float(self.undesirable_weight)),
                            ("length_normalize", bool(self.length_normalize)),
                            ("nll_tokens", None if self.nll_tokens is None else float(self.nll_tokens)),
                            ("desirable", tuple(self.desirable))):
            object.__setattr__(self, name, value)

    reduction = "mean"
    references = ("row",)
    token_local = False
    uses_lme = False
    single_pass = True
    needs_reference = False  # optional (Liger's use_ref_model=False: log-probs as the log-ratios)

    @property
    def divergence(self) -> Divergence:
        """The implicit reward's divergence (reported in the output): KL, ``beta log(pi / pi_ref)``."""
        return get_divergence("kl")

    @property
    def components(self) -> Tuple[Tuple[str, float], ...]:
        """``((loss_type, weight), ...)``: what the formulas sum."""
        return _components(self.loss_type, self.loss_weights)

    @property
    def uses_kl(self) -> bool:
        """Whether the batch KL estimate enters (``kto``; not ``apo_zero_unpaired``)."""
        return any(t == "kto" for t, _ in self.components)

    def row_groups(self, num_rows: int) -> None:
        """Rows are independent (the KL estimate is given); checks one flag per row."""
        if len(self.desirable) != num_rows:
            raise ValueError(f"KTOSpec.desirable must hold one flag per row ({num_rows}), got {len(self.desirable)}")
        return None

    def _desirable(self, rows: Rows) -> torch.Tensor:
        r = rows.mask.shape[0]
        return torch.tensor(self.desirable[rows.start:rows.start + r], dtype=torch.bool, device=rows.mask.device)

    def normalizers(self, mask2: torch.Tensor) -> Norms:
        chosen = None
        if nll_weight(self):
            flags = torch.tensor(self.desirable, dtype=torch.bool, device=mask2.device)
            chosen = _chosen_tokens(self.nll_tokens, mask2, flags)
        return Norms(mask2.sum(), mask2.any(dim=1).sum(), mask2.shape[0], chosen)

    def sequence_logps(self, rows: Rows) -> torch.Tensor:
        return _sequence_logps(rows, self.length_normalize)

    def _logratio(self, rows: Rows) -> torch.Tensor:
        s = self.sequence_logps(rows)
        return s if rows.ref_seq is None else s - rows.ref_seq

    def rewards(self, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([r] beta * (s - ref - z), rows with a token, value_s0)``."""
        return self.beta * self._logratio(rows), rows.mask.any(dim=1), value_s0(rows)

    def per_element(self, rows: Rows) -> torch.Tensor:
        """``[r]`` losses of a whole batch (the sft term's share, its mean NLL times its weight, in every row)."""
        d = self._desirable(rows)
        out = kto_losses(self._logratio(rows), d, self)
        w = nll_weight(self)
        if w:
            out = out + w * _nll_sum(rows, d) / _positive(_chosen_tokens(self.nll_tokens, rows.mask, d), rows.logp.dtype)
        return out

    def terms(self, rows: Rows, norms: Norms) -> Terms:
        d = self._desirable(rows)
        linear = kto_losses(self._logratio(rows), d, self).sum() / max(1, norms.pairs)
        w = nll_weight(self)
        if w:
            linear = linear + w * _nll_sum(rows, d) / _positive(norms.chosen_tokens, rows.logp.dtype)
        return Terms(linear)

    def coefficients(self, rows: Rows, norms: Norms) -> Coefficients:
        """``g = d loss / d s_row`` spread over the row's tokens, plus ``-w / N`` per desirable token
        of the sft term; the reference gets ``-d loss / d s_row``."""
        with torch.no_grad():
            d = self._desirable(rows)
            ds = kto_loss_grads(self._logratio(rows), d, self) / max(1, norms.pairs)
            g = _spread(ds, rows, self.length_normalize)
            w = nll_weight(self)
            if w:
                per = -w / _positive(norms.chosen_tokens, g.dtype)
                g = g + torch.where(rows.mask & d[:, None], per, g.new_zeros(()))
            ref_seq = None if rows.ref_seq is None else -ds
            ref_tok = None if rows.ref_tok.dim() == 0 else torch.zeros_like(g)
            return Coefficients(g, torch.zeros_like(g), ref_tok, ref_seq)

    def finish(self, terms: Terms, norms: Norms) -> torch.Tensor:
        return terms.linear

    def explain(self, rows: Rows) -> Optional[str]:
        with torch.no_grad():
            per = self.per_element(rows)
            bad = ~torch.isfinite(per)
            if not bool(bad.any()):
                return None
            i = int(bad.nonzero()[0])
            s = float(self.sequence_logps(rows)[i])
            ref = None if rows.ref_seq is None else float(rows.ref_seq[i])
        return (f"row {i}: the KTO loss is {float(per[i])} (policy log-prob {s:g}, reference + KL {ref}): "
                f"a NaN input or an overflowing beta")


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

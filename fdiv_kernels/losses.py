"""``fdiv_kernels.loss``: f-divergence SFT objectives on top of the fused primitive.

Conventions (derivations in ``docs/math.md``):

* Rows are the leading dims of ``labels`` except the last; a 1-D ``labels`` is one row.
* ``logratio[t] = logp[t] - ref_logp[t]`` on supervised tokens (``ref_logp = 0`` when absent).
* Values come from the log-sum-exp of the logits: ``V(s_t) = lse[t]`` at the position that
  predicts token ``t``. ``s0`` is a row's first supervised position, ``s_T`` its last one.
* Implicit reward ``u``:
    - ``level="token"``: ``u[t] = beta * logratio[t] + dV[t]``, ``dV[t] = V(s_t) - V(s_next(t))``
      (``s_next`` = the row's next supervised position; 0 for the last one), so that the
      per-token rewards of a row sum to the sequence-level reward;
    - ``level="sequence"``: ``u = beta * sum_t logratio[t] + V(s0) - V(s_T)`` (``sum`` becomes a
      mean with ``length_normalize=True``).
* ``values`` fixes the gauge of V (the free direction of Theorem 2): ``"drop"`` (default) sets
  dV = 0; ``"detach"`` uses dV without gradient; ``"free"`` uses dV with gradient and adds the
  ``+V(s0)`` term of the paper's objective, which has a free direction: pair it with
  ``z_loss > 0``.
* Loss: ``-phi(u)`` reduced by mean/sum over supervised tokens (token level) or over rows with
  at least one supervised token (sequence level), or the ``logmeanexp`` form for KL/squared
  Hellinger; plus ``z_loss * mean(lse**2)`` over supervised tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from . import _checks
from .divergences import Divergence
from .ops import token_stats, token_stats_from_logits
from .ops.fused import evaluate
from .primal import PrimalLoss
from .specs import LEVELS, REDUCTIONS, VALUE_MODES, FDivSpec, HeadSpec, LossSpec, PrimalSpec, Rows

FORMS = ("variational", "primal")

__all__ = ["FORMS", "LEVELS", "REDUCTIONS", "VALUE_MODES", "LossOutput", "SequenceLogp", "loss", "loss_from_spec",
           "make_spec", "primal_loss", "sequence_logp", "shift_for_causal_lm"]


@dataclass
class LossOutput:
    """What :func:`loss` returns.

    Attributes:
        loss: the scalar loss (a tensor of per-token / per-row losses for ``reduction="none"``).
        logp, lse: per-token ``[..., T]`` log-prob of the label and log-sum-exp (0 at ignored positions).
        reward: implicit reward ``u``: ``[..., T]`` at token level, ``[...]`` at sequence level.
        value_s0: ``[...]`` lse at each row's first supervised position (0 for all-ignored rows).
        mask: ``[..., T]`` bool, supervised positions.
        num_tokens: number of supervised tokens (a 0-dim tensor).
        divergence: the registry entry used (a :class:`PrimalLoss` for :func:`primal_loss`).
        entropy: ``[..., T]`` per-token entropy of the policy when ``return_entropy=True``.

    ``logp``, ``lse``, ``entropy``, ``reward`` and ``value_s0`` are differentiable: using them in
    another loss adds their gradients (computed by the backend's recompute kernels).
    """

    loss: torch.Tensor
    logp: torch.Tensor
    lse: torch.Tensor
    reward: torch.Tensor
    value_s0: torch.Tensor
    mask: torch.Tensor
    num_tokens: torch.Tensor
    divergence: Divergence | PrimalLoss
    entropy: Optional[torch.Tensor] = None


class SequenceLogp(NamedTuple):
    """Per-row sums and means of the label log-probs (what DPO-family losses consume)."""

    sum: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor


def _stats(hidden, weight, labels, logits, bias, ignore_index, backend, softcap, temperature, return_entropy=False):
    _check_inputs(hidden, weight, labels, logits, bias, softcap, temperature)
    if logits is not None:
        return token_stats_from_logits(logits, labels, ignore_index=ignore_index, return_entropy=return_entropy)
    return token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                       temperature=temperature, return_entropy=return_entropy, backend=backend)


def _check_inputs(hidden, weight, labels, logits, bias, softcap, temperature) -> None:
    """Either ``logits`` or ``(hidden, weight)``, with labels; the head checks of :func:`token_stats`."""
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits= or (hidden, weight), not both")
        if labels is None:
            raise ValueError("labels are required")
        if softcap is not None or temperature != 1.0 or bias is not None:
            raise ValueError("softcap, temperature and bias apply to (hidden, weight) only; apply them to the logits yourself")
        return
    if hidden is None or weight is None or labels is None:
        raise ValueError("loss() needs (hidden, weight, labels) or (logits=..., labels=...)")


def shift_for_causal_lm(x: torch.Tensor, labels: torch.Tensor,
                        ref_logp: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Hugging Face causal-LM shift: ``x[..., :-1, :]`` predicts ``labels[..., 1:]``.

    ``x`` is ``[..., T, D]`` (hidden states or logits), ``labels`` ``[..., T]``; a per-token
    ``ref_logp [..., T]`` (aligned with the unshifted labels) is shifted like the labels; one of
    shape ``[..., T-1]`` (already shifted, e.g. ``LossOutput.logp`` of a reference computed with
    ``shift=True``) and a per-row ``ref_logp`` are returned unchanged.
    """
    if labels.dim() < 1 or labels.shape[-1] < 1:
        raise ValueError(f"the causal-LM shift needs labels with a sequence dimension, got shape {tuple(labels.shape)}")
    if tuple(x.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"labels must have shape {tuple(x.shape[:-1])} (the leading dims of the input), "
                         f"got {tuple(labels.shape)}")
    if ref_logp is not None and tuple(ref_logp.shape) == tuple(labels.shape):
        ref_logp = ref_logp[..., 1:]
    return x[..., :-1, :], labels[..., 1:], ref_logp


def _shifted(hidden, logits, labels, ref_logp):
    """:func:`shift_for_causal_lm` applied to whichever of ``hidden``/``logits`` is given."""
    if labels is None or (hidden if logits is None else logits) is None:
        return hidden, logits, labels, ref_logp  # the input checks name what is missing
    if logits is not None:
        logits, labels, ref_logp = shift_for_causal_lm(logits, labels, ref_logp)
    else:
        hidden, labels, ref_logp = shift_for_causal_lm(hidden, labels, ref_logp)
    return hidden, logits, labels, ref_logp


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, T]`` view of ``t [..., T]`` (a 1-D ``t`` is one row; ``T`` may be 0)."""
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def make_spec(*, divergence="sft", beta=1.0, level="token", reduction="mean", length_normalize=False,
              values="drop", z_loss=0.0, form="variational", alpha=1.5, ref_logp_given=False) -> LossSpec:
    """The validated spec of :func:`loss`'s options (one place for every caller)."""
    _checks.check_choice("form", form, FORMS)
    if form == "primal":
        _checks.check_choice("level", level, LEVELS)
        _checks.check_choice("values", values, VALUE_MODES)
        _checks.check_beta(beta)
        if level != "token" or ref_logp_given or values != "drop" or beta != 1.0:
            raise ValueError("form='primal' is a per-token loss of log p_y alone: use level='token', no ref_logp, "
                             "values='drop', beta=1")
        return PrimalSpec(divergence, alpha=alpha, z_loss=z_loss, reduction=reduction)
    return FDivSpec(divergence, beta=beta, level=level, values=values, z_loss=z_loss,
                    length_normalize=length_normalize, reduction=reduction)


def loss(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
         labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
         divergence: str = "sft", ref_logp: Optional[torch.Tensor] = None, beta: float = 1.0,
         level: str = "token", ignore_index: int = -100, reduction: str = "mean",
         backend: str = "auto", bias: Optional[torch.Tensor] = None, length_normalize: bool = False,
         values: str = "drop", z_loss: float = 0.0, softcap: Optional[float] = None,
         temperature: float = 1.0, return_entropy: bool = False, shift: bool = False,
         form: Optional[str] = None, alpha: Optional[float] = None) -> LossOutput:
    """f-divergence SFT loss, fused with the LM head (or from ``logits=``).

    Args:
        hidden: ``[..., T, H]`` hidden states before the LM head; with ``weight [V, H]``.
        labels: ``[..., T]`` target ids, ``ignore_index`` where unsupervised: already shifted
            (``labels[t]`` is predicted from ``hidden[t]``), or unshifted with ``shift=True``.
        logits: ``[..., T, V]`` instead of ``hidden``/``weight``.
        divergence: a name in :data:`fdiv_kernels.DIVERGENCES` (``"sft"`` = ``"tv"`` = NLL): the
            registry entries with a variational objective.
        ref_logp: reference model log-probs, ``[..., T]`` per token, or ``[...]`` per row at
            sequence level. ``None`` means ``pi_ref = 1`` (no anchor).
        beta: the KL-anchor weight in ``u = beta * log(pi / pi_ref) + ...``.
        level: ``"token"`` or ``"sequence"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        length_normalize: sequence level only: use the mean log-ratio of a row instead of the sum.
        values: ``"drop"``, ``"detach"`` or ``"free"``: how V = lse enters the reward.
        z_loss: weight of ``mean(lse**2)`` over supervised tokens (fixes the gauge of V).
        bias, softcap, temperature, backend, ignore_index: passed to :func:`fdiv_kernels.token_stats`.
        return_entropy: also compute the per-token entropy (``out.entropy``), in the same pass.
        shift: the Hugging Face causal-LM shift inside (:func:`shift_for_causal_lm`): ``labels =
            input_ids [..., T]`` as they are, ``labels[..., 1:]`` predicted from
            ``hidden[..., :-1, :]`` (``logits[..., :-1, :]``); a per-token ``ref_logp [..., T]`` is
            shifted the same way (``[..., T-1]`` and per-row ones pass unchanged). The outputs
            then have ``T - 1`` positions.
        form, alpha: deprecated (``DeprecationWarning``): ``form="primal"`` is
            :func:`primal_loss`, whose ``alpha`` this was.

    Returns:
        :class:`LossOutput`. With ``divergence="sft"``, ``beta=1`` and no reference, ``loss`` equals
        ``F.cross_entropy(logits, labels, ignore_index=ignore_index)``.

    When gradients are needed, the loss and its gradients come from one pass over the logits
    (3 GEMMs, :mod:`fdiv_kernels.ops.fused`); under ``torch.no_grad`` only the logits GEMM runs.
    """
    if form is not None or alpha is not None:
        spec = _deprecated_form_spec(form, alpha, divergence=divergence, beta=beta, level=level, reduction=reduction,
                                     length_normalize=length_normalize, values=values, z_loss=z_loss,
                                     ref_logp_given=ref_logp is not None)
    else:
        spec = FDivSpec(divergence, beta=beta, level=level, values=values, z_loss=z_loss,
                        length_normalize=length_normalize, reduction=reduction)
    if shift:
        hidden, logits, labels, ref_logp = _shifted(hidden, logits, labels, ref_logp)
    return loss_from_spec(spec, hidden, weight, labels, logits=logits, ref_logp=ref_logp, bias=bias,
                          head=HeadSpec(softcap, temperature, backend), ignore_index=ignore_index,
                          return_entropy=return_entropy)


def _deprecated_form_spec(form, alpha, *, stacklevel: int = 3, **options) -> LossSpec:
    """The spec of ``fk.loss(form=..., alpha=...)``, with its ``DeprecationWarning`` (attributed to
    the frame ``stacklevel`` up: the user's call)."""
    if form == "primal":
        hint = f"use fk.primal_loss(divergence={options['divergence']!r}, alpha=...)"
    else:
        hint = "fk.loss is the variational form; drop form= and alpha= (alpha applies to fk.primal_loss only)"
    warnings.warn(f"fk.loss(form=..., alpha=...) is deprecated: {hint}", DeprecationWarning, stacklevel=stacklevel)
    return make_spec(form="variational" if form is None else form, alpha=1.5 if alpha is None else alpha, **options)


def primal_loss(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                divergence: str = "kl", alpha: float = 1.5, ignore_index: int = -100, reduction: str = "mean",
                z_loss: float = 0.0, backend: str = "auto", bias: Optional[torch.Tensor] = None,
                softcap: Optional[float] = None, temperature: float = 1.0, return_entropy: bool = False,
                shift: bool = False) -> LossOutput:
    """Primal per-token f-divergence loss ``D_f(onehot(y) || p)`` (:mod:`fdiv_kernels.primal`),
    fused with the LM head (or from ``logits=``); a function of ``log p_y`` alone, no reference.

    Args:
        divergence: a registry name with a primal form (``kl`` = NLL, ``tv``, ``pearson``,
            ``squared_hellinger``, ``js``, ``alpha``; :func:`fdiv_kernels.divergence_names` with
            ``"primal"``). ``reverse_kl`` and ``neyman`` have ``f(0) = inf``: no primal form.
        alpha: the coefficient ``a`` of ``divergence="alpha"`` (Amari; > 0).
        reduction: ``"mean"`` (over supervised tokens), ``"sum"`` or ``"none"``.
        z_loss: weight of ``mean(lse**2)`` over supervised tokens.
        hidden, weight, labels, logits, bias, softcap, temperature, backend, ignore_index,
        return_entropy, shift: as in :func:`loss`.

    Returns:
        :class:`LossOutput` (``reward`` holds ``logp``; ``divergence`` the :class:`PrimalLoss`).
        ``divergence="kl"`` equals ``F.cross_entropy``.
    """
    spec = PrimalSpec(divergence, alpha=alpha, z_loss=z_loss, reduction=reduction)
    if shift:
        hidden, logits, labels, _ = _shifted(hidden, logits, labels, None)
    return loss_from_spec(spec, hidden, weight, labels, logits=logits, bias=bias,
                          head=HeadSpec(softcap, temperature, backend), ignore_index=ignore_index,
                          return_entropy=return_entropy)


def loss_from_spec(spec: LossSpec, hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                   ref_logp: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   head: HeadSpec = HeadSpec(), ignore_index: int = -100,
                   return_entropy: bool = False) -> LossOutput:
    """:func:`loss` for an already built spec (:class:`~fdiv_kernels.specs.FDivSpec` or
    :class:`~fdiv_kernels.specs.PrimalSpec`); what ``fk.nn``, the integrations and the trainer call."""
    _check_inputs(hidden, weight, labels, logits, bias, head.softcap, head.temperature)
    _checks.check_rows(labels)
    if logits is None:
        _checks.check_head(hidden, weight, labels, bias, ignore_index, head.softcap, head.temperature)
    mask = labels != ignore_index
    m2 = _rows(mask)
    cdt = torch.float64 if (logits if logits is not None else hidden).dtype == torch.float64 else torch.float32
    ref_tok, ref_seq = _reference(ref_logp, labels, getattr(spec, "level", "token"), m2, cdt)
    ev = evaluate(spec, hidden=hidden, weight=weight, labels=labels, logits=logits, bias=bias, ref_tok=ref_tok,
                  ref_seq=ref_seq, head=head, ignore_index=ignore_index, return_entropy=return_entropy)
    logp, lse = ev.stats.logp, ev.stats.lse
    rows = Rows(_rows(logp), _rows(lse), m2, ref_tok, ref_seq)
    u, _, v_s0 = spec.rewards(rows)
    row_shape = labels.shape[:-1] if labels.dim() > 1 else ()
    token_level = u.shape == m2.shape
    reward = u.reshape(labels.shape) if token_level else u.reshape(row_shape)
    out_loss = ev.loss
    if spec.reduction == "none":
        out_loss = out_loss.reshape(labels.shape) if out_loss.shape == m2.shape else out_loss.reshape(row_shape)
    return LossOutput(loss=out_loss, logp=logp, lse=lse, reward=reward, value_s0=v_s0.reshape(row_shape), mask=mask,
                      num_tokens=mask.sum(), divergence=spec.divergence, entropy=ev.stats.entropy)


def _reference(ref_logp, labels, level, m2, dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token reference log-probs ``[R, T]`` (masked; a 0-d zero when absent) and/or per-row ``[R]``."""
    zero = torch.zeros((), dtype=dtype, device=labels.device)
    if ref_logp is None:
        return zero, None
    _checks.check_floating("ref_logp", ref_logp)
    _checks.check_same_device(ref_logp=ref_logp, labels=labels)
    if tuple(ref_logp.shape) == tuple(labels.shape):
        return torch.where(m2, _rows(ref_logp).to(dtype), zero), None
    row_shape = tuple(labels.shape[:-1]) if labels.dim() > 1 else ()
    if level == "sequence" and tuple(ref_logp.shape) == row_shape:
        return zero, ref_logp.reshape(-1).to(dtype)
    expect = f"{tuple(labels.shape)}" + (f" or per-row {row_shape}" if level == "sequence" else "")
    raise ValueError(f"ref_logp must have shape {expect}, got {tuple(ref_logp.shape)}")


def sequence_logp(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                  softcap: Optional[float] = None, temperature: float = 1.0,
                  backend: str = "auto") -> SequenceLogp:
    """Per-row sum and mean of ``log pi(y_t | s_t)`` over supervised tokens, from the fused primitive.

    ``labels [..., T]`` -> ``sum``, ``mean`` (float32) and ``count`` (int64), each ``[...]``.
    All-ignored rows give sum = mean = 0. Log space only: no sequence probability is formed.
    """
    if labels is not None:
        _checks.check_rows(labels)
    stats = _stats(hidden, weight, labels, logits, bias, ignore_index, backend, softcap, temperature)
    mask = labels != ignore_index
    count = mask.sum(dim=-1)
    s = stats.logp.sum(dim=-1)
    return SequenceLogp(s, s / count.clamp(min=1).to(s.dtype), count)

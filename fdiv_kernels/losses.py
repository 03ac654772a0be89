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
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import _checks
from .divergences import Divergence, get_divergence
from .ops import token_stats, token_stats_from_logits
from .primal import PrimalLoss, get_primal

LEVELS = ("token", "sequence")
REDUCTIONS = ("mean", "sum", "none")
VALUE_MODES = ("drop", "detach", "free")
FORMS = ("variational", "primal")


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
        divergence: the registry entry used (a :class:`PrimalLoss` for ``form="primal"``).
        entropy: ``[..., T]`` per-token entropy of the policy when ``return_entropy=True``.
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
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits= or (hidden, weight), not both")
        if labels is None:
            raise ValueError("labels are required")
        if softcap is not None or temperature != 1.0 or bias is not None:
            raise ValueError("softcap, temperature and bias apply to (hidden, weight) only; apply them to the logits yourself")
        return token_stats_from_logits(logits, labels, ignore_index=ignore_index, return_entropy=return_entropy)
    if hidden is None or weight is None or labels is None:
        raise ValueError("loss() needs (hidden, weight, labels) or (logits=..., labels=...)")
    return token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                       temperature=temperature, return_entropy=return_entropy, backend=backend)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def _first_last_next(mask2: torch.Tensor):
    """Indices of each row's first and last supervised position and, per position, the next one."""
    b, t = mask2.shape
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


def loss(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
         labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
         divergence: str = "sft", ref_logp: Optional[torch.Tensor] = None, beta: float = 1.0,
         level: str = "token", ignore_index: int = -100, reduction: str = "mean",
         backend: str = "auto", bias: Optional[torch.Tensor] = None, length_normalize: bool = False,
         values: str = "drop", z_loss: float = 0.0, softcap: Optional[float] = None,
         temperature: float = 1.0, form: str = "variational", alpha: float = 1.5,
         return_entropy: bool = False) -> LossOutput:
    """f-divergence SFT loss, fused with the LM head (or from ``logits=``).

    Args:
        hidden: ``[..., T, H]`` hidden states before the LM head; with ``weight [V, H]``.
        labels: ``[..., T]`` target ids (already shifted: ``labels[t]`` is predicted from
            ``hidden[t]``), ``ignore_index`` where unsupervised.
        logits: ``[..., T, V]`` instead of ``hidden``/``weight``.
        divergence: a name in :data:`fdiv_kernels.DIVERGENCES` (``"sft"`` = ``"tv"`` = NLL).
        ref_logp: reference model log-probs, ``[..., T]`` per token, or ``[...]`` per row at
            sequence level. ``None`` means ``pi_ref = 1`` (no anchor).
        beta: the KL-anchor weight in ``u = beta * log(pi / pi_ref) + ...``.
        level: ``"token"`` or ``"sequence"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        length_normalize: sequence level only: use the mean log-ratio of a row instead of the sum.
        values: ``"drop"``, ``"detach"`` or ``"free"``: how V = lse enters the reward.
        z_loss: weight of ``mean(lse**2)`` over supervised tokens (fixes the gauge of V).
        bias, softcap, temperature, backend, ignore_index: passed to :func:`fdiv_kernels.token_stats`.
        form: ``"variational"`` (the paper's objective, default) or ``"primal"``: the per-token
            ``D_f(onehot(y) || p)`` of :mod:`fdiv_kernels.primal` (token level, no reference).
        alpha: the coefficient of ``divergence="alpha"`` (primal form only).
        return_entropy: also compute the per-token entropy (``out.entropy``), in the same pass.

    Returns:
        :class:`LossOutput`. With ``divergence="sft"``, ``beta=1`` and no reference, ``loss`` equals
        ``F.cross_entropy(logits, labels, ignore_index=ignore_index)``.
    """
    _checks.check_choice("form", form, FORMS)
    div = get_primal(divergence) if form == "primal" else get_divergence(divergence)
    _checks.check_choice("level", level, LEVELS)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    _checks.check_choice("values", values, VALUE_MODES)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if reduction == "none" and (values == "free" or z_loss > 0):
        raise ValueError("values='free' and z_loss add batch-level terms; use reduction='mean' or 'sum' with them")
    if length_normalize and level != "sequence":
        raise ValueError("length_normalize=True applies to level='sequence' only")
    if form == "primal":
        if level != "token" or ref_logp is not None or values != "drop" or beta != 1.0:
            raise ValueError("form='primal' is a per-token loss of log p_y alone: use level='token', no ref_logp, "
                             "values='drop', beta=1")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")

    stats = _stats(hidden, weight, labels, logits, bias, ignore_index, backend, softcap, temperature, return_entropy)
    logp, lse = stats.logp, stats.lse
    mask = labels != ignore_index
    m2, logp2, lse2 = _rows(mask), _rows(logp), _rows(lse)
    zero = logp2.new_zeros(())
    row_shape = labels.shape[:-1] if labels.dim() > 1 else ()

    if form == "primal":
        per = torch.where(m2, div(logp2, alpha), zero)
        total = per.sum()
        out_loss = per if reduction == "none" else (total if reduction == "sum" else total / m2.sum().clamp(min=1))
        if z_loss > 0:
            out_loss = out_loss + z_loss * _reduce_plain(torch.where(m2, lse2 * lse2, zero), m2, reduction)
        first = _first_last_next(m2)[0]
        v0 = torch.where(m2.any(dim=1), lse2.gather(1, first[:, None]).squeeze(1), zero)
        return LossOutput(loss=out_loss.reshape(labels.shape) if reduction == "none" else out_loss, logp=logp,
                          lse=lse, reward=logp, value_s0=v0.reshape(row_shape), mask=mask, num_tokens=mask.sum(),
                          divergence=div, entropy=stats.entropy)

    ref_tok, ref_seq = _reference(ref_logp, labels, level, logp2, m2)
    logratio = torch.where(m2, logp2 - ref_tok, zero)
    first, last, nxt = _first_last_next(m2)
    row_valid = m2.any(dim=1)
    v_s0 = torch.where(row_valid, lse2.gather(1, first[:, None]).squeeze(1), zero)

    vmode_lse = lse2 if values == "free" else lse2.detach()
    if level == "token":
        dv = torch.where(m2, vmode_lse - vmode_lse.gather(1, nxt), zero)
        u = beta * logratio + (dv if values != "drop" else 0.0)
        u = torch.where(m2, u, zero)
        weight_mask = m2
    else:
        count = m2.sum(dim=1)
        s = logratio.sum(dim=1)
        if length_normalize:
            s = s / count.clamp(min=1)
        if ref_seq is not None:
            s = s - ref_seq
        u = beta * s
        if values != "drop":
            dv = vmode_lse.gather(1, first[:, None]).squeeze(1) - vmode_lse.gather(1, last[:, None]).squeeze(1)
            u = u + dv
        u = torch.where(row_valid, u, zero)
        weight_mask = row_valid

    out_loss = _reduce(div, u, weight_mask, reduction)
    if values == "free":  # the paper's -V(s0) term of J, with gradient
        out_loss = out_loss + _reduce_plain(v_s0, row_valid, reduction)
    if z_loss > 0:
        out_loss = out_loss + z_loss * _reduce_plain(torch.where(m2, lse2 * lse2, zero), m2, reduction)

    reward = u.reshape(labels.shape) if level == "token" else u.reshape(row_shape)
    return LossOutput(
        loss=out_loss if reduction != "none" else out_loss.reshape(reward.shape),
        logp=logp, lse=lse, reward=reward, value_s0=v_s0.reshape(row_shape), mask=mask,
        num_tokens=mask.sum(), divergence=div, entropy=stats.entropy,
    )


def _reference(ref_logp, labels, level, logp2, m2):
    """Per-token reference log-probs ``[R, T]`` (masked) and/or per-row ones ``[R]``."""
    zero = logp2.new_zeros(())
    if ref_logp is None:
        return zero, None
    _checks.check_floating("ref_logp", ref_logp)
    _checks.check_same_device(ref_logp=ref_logp, labels=labels)
    if tuple(ref_logp.shape) == tuple(labels.shape):
        return torch.where(m2, _rows(ref_logp).to(logp2.dtype), zero), None
    row_shape = tuple(labels.shape[:-1]) if labels.dim() > 1 else ()
    if level == "sequence" and tuple(ref_logp.shape) == row_shape:
        return zero, ref_logp.reshape(-1).to(logp2.dtype)
    expect = f"{tuple(labels.shape)}" + (f" or per-row {row_shape}" if level == "sequence" else "")
    raise ValueError(f"ref_logp must have shape {expect}, got {tuple(ref_logp.shape)}")


def _reduce(div: Divergence, u: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``-phi(u)`` over the positions where ``w`` is True (see module docstring)."""
    zero = u.new_zeros(())
    n = w.sum()
    if div.aggregate == "mean":
        per = torch.where(w, -div.objective(u), zero)
        if reduction == "none":
            return per
        total = per.sum()
        return total if reduction == "sum" else total / n.clamp(min=1)
    log_psi = div.neg_log_psi(u)
    if reduction == "none":
        return torch.where(w, torch.exp(log_psi) - div.psi_offset, zero)
    masked = torch.where(w, log_psi, torch.full_like(log_psi, -torch.inf))
    if not bool(w.any()):
        return (u * 0).sum()  # no supervised position: 0 with a zero gradient, never -inf/NaN
    lse = torch.logsumexp(masked.reshape(-1), dim=0)
    return lse if reduction == "sum" else lse - torch.log(n.to(u.dtype))


def _reduce_plain(x: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    total = torch.where(w, x, x.new_zeros(())).sum()
    return total if reduction == "sum" else total / w.sum().clamp(min=1)


def sequence_logp(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                  softcap: Optional[float] = None, temperature: float = 1.0,
                  backend: str = "auto") -> SequenceLogp:
    """Per-row sum and mean of ``log pi(y_t | s_t)`` over supervised tokens, from the fused primitive.

    ``labels [..., T]`` -> ``sum``, ``mean`` (float32) and ``count`` (int64), each ``[...]``.
    All-ignored rows give sum = mean = 0. Log space only: no sequence probability is formed.
    """
    stats = _stats(hidden, weight, labels, logits, bias, ignore_index, backend, softcap, temperature)
    mask = labels != ignore_index
    count = mask.sum(dim=-1)
    s = stats.logp.sum(dim=-1)
    return SequenceLogp(s, s / count.clamp(min=1).to(s.dtype), count)

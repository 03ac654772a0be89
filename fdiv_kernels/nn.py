"""``torch.nn`` modules: drop-in replacements for a trainer's loss.

* :class:`FDivLoss`: from logits, like ``nn.CrossEntropyLoss`` (``loss_fn(logits, labels)``).
* :class:`FusedLinearFDivLoss`: from hidden states and the LM head, never building the
  ``[N, V]`` logits (``loss_fn(hidden, lm_head.weight, labels)`` or ``loss_fn(hidden, lm_head, labels)``).
* :class:`FusedLinearDPOLoss`: DPO-family loss from concatenated chosen/rejected hidden states.

Every option is keyword-only and mirrors :func:`fdiv_kernels.loss` / :func:`fdiv_kernels.dpo_loss`;
the modules hold no parameters and no state. ``shift_labels=True`` applies the Hugging Face
convention inside the module: ``labels[..., 1:]`` are predicted from ``hidden[..., :-1, :]``
(``logits[..., :-1, :]``), so unshifted ``labels = input_ids`` (with ``-100`` where unsupervised)
can be passed as they are.

With ``divergence="sft"``, ``beta=1`` and no reference, :class:`FDivLoss` and
:class:`FusedLinearFDivLoss` equal ``F.cross_entropy(logits, labels, ignore_index=-100)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn as _tnn

from . import _checks
from .divergences import get_divergence
from .dpo import DPOOutput, dpo_loss
from .losses import FORMS, LEVELS, REDUCTIONS, VALUE_MODES, LossOutput, loss, sequence_logp
from .ops.fused import evaluate
from .specs import DPOSpec, HeadSpec, Rows
from .primal import get_primal

__all__ = ["FDivLoss", "FusedLinearFDivLoss", "FusedLinearDPOLoss", "shift_for_causal_lm"]

HeadLike = Union[torch.Tensor, _tnn.Module]


def shift_for_causal_lm(x: torch.Tensor, labels: torch.Tensor,
                        ref_logp: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Hugging Face causal-LM shift: ``x[..., :-1, :]`` predicts ``labels[..., 1:]``.

    ``x`` is ``[..., T, D]`` (hidden states or logits), ``labels`` ``[..., T]``; a per-token
    ``ref_logp [..., T]`` (aligned with the unshifted labels) is shifted like the labels; one of
    shape ``[..., T-1]`` (already shifted, e.g. ``LossOutput.logp`` of a reference computed with
    ``shift_labels=True``) and a per-row ``ref_logp`` are returned unchanged.
    """
    if labels.dim() < 1 or labels.shape[-1] < 1:
        raise ValueError(f"shift_labels=True needs labels with a sequence dimension, got shape {tuple(labels.shape)}")
    if tuple(x.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"labels must have shape {tuple(x.shape[:-1])} (the leading dims of the input), "
                         f"got {tuple(labels.shape)}")
    if ref_logp is not None and tuple(ref_logp.shape) == tuple(labels.shape):
        ref_logp = ref_logp[..., 1:]
    return x[..., :-1, :], labels[..., 1:], ref_logp


def _split_head(weight: HeadLike, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Accept ``lm_head.weight`` (+ ``bias=``) or the ``nn.Linear`` head itself."""
    if isinstance(weight, _tnn.Module):
        w, b = getattr(weight, "weight", None), getattr(weight, "bias", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{type(weight).__name__} has no tensor .weight; pass the [V, H] weight tensor instead")
        if bias is not None and b is not None:
            raise ValueError("bias= given together with a head module that has its own bias")
        return w, (bias if bias is not None else b)
    return weight, bias


class _FDivOptions(_tnn.Module):
    """Shared options of the f-divergence modules (see :func:`fdiv_kernels.loss`)."""

    def __init__(self, *, divergence: str, beta: float, level: str, ignore_index: int, reduction: str,
                 values: str, z_loss: float, length_normalize: bool, shift_labels: bool, form: str,
                 alpha: float) -> None:
        super().__init__()
        _checks.check_choice("form", form, FORMS)
        (get_primal if form == "primal" else get_divergence)(divergence)  # fail now, not at the first batch
        _checks.check_choice("level", level, LEVELS)
        _checks.check_choice("reduction", reduction, REDUCTIONS)
        _checks.check_choice("values", values, VALUE_MODES)
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta}")
        self.divergence, self.beta, self.level = divergence, float(beta), level
        self.ignore_index, self.reduction, self.values = int(ignore_index), reduction, values
        self.z_loss, self.length_normalize, self.shift_labels = float(z_loss), bool(length_normalize), bool(shift_labels)
        self.form, self.alpha = form, float(alpha)

    def _loss_kwargs(self) -> dict:
        return dict(divergence=self.divergence, beta=self.beta, level=self.level, ignore_index=self.ignore_index,
                    reduction=self.reduction, values=self.values, z_loss=self.z_loss,
                    length_normalize=self.length_normalize, form=self.form, alpha=self.alpha)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, form={self.form!r}, beta={self.beta}, level={self.level!r}, "
                f"reduction={self.reduction!r}, values={self.values!r}, z_loss={self.z_loss}, shift_labels={self.shift_labels}")


class FDivLoss(_FDivOptions):
    """f-divergence SFT loss from logits: ``loss_fn(logits [..., T, V], labels [..., T]) -> loss``.

    Options (keyword-only) are those of :func:`fdiv_kernels.loss`: ``divergence`` ("sft", "kl",
    "reverse_kl", "pearson", "neyman", "squared_hellinger", "js" or an alias), ``beta``,
    ``level`` ("token"/"sequence"), ``ignore_index``, ``reduction`` ("mean"/"sum"/"none"),
    ``values`` ("drop"/"detach"/"free"), ``z_loss``, ``length_normalize``, ``form``
    ("variational", the paper's objective, or "primal": per-token ``D_f(onehot(y) || p)``, see
    :mod:`fdiv_kernels.primal`) and ``alpha`` (primal ``divergence="alpha"``); plus
    ``shift_labels`` (HF causal-LM shift, see the module docstring).

    ``forward(logits, labels, *, ref_logp=None, return_output=False)``: ``ref_logp`` is the
    reference model's per-token log-probs (``[..., T]``, aligned with ``labels``) or per-row
    ones at sequence level. Returns the loss (float32; float64 for float64 logits), or the full
    :class:`fdiv_kernels.LossOutput` with ``return_output=True``. bf16/fp16 logits are upcast.
    """

    def __init__(self, *, divergence: str = "sft", beta: float = 1.0, level: str = "token",
                 ignore_index: int = -100, reduction: str = "mean", values: str = "drop", z_loss: float = 0.0,
                 length_normalize: bool = False, shift_labels: bool = False, form: str = "variational",
                 alpha: float = 1.5) -> None:
        super().__init__(divergence=divergence, beta=beta, level=level, ignore_index=ignore_index,
                         reduction=reduction, values=values, z_loss=z_loss, length_normalize=length_normalize,
                         shift_labels=shift_labels, form=form, alpha=alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *, ref_logp: Optional[torch.Tensor] = None,
                return_output: bool = False) -> Union[torch.Tensor, LossOutput]:
        if self.shift_labels:
            logits, labels, ref_logp = shift_for_causal_lm(logits, labels, ref_logp)
        out = loss(logits=logits, labels=labels, ref_logp=ref_logp, **self._loss_kwargs())
        return out if return_output else out.loss


class FusedLinearFDivLoss(_FDivOptions):
    """f-divergence SFT loss fused with the LM head; the ``[N, V]`` logits are never stored.

    ``loss_fn(hidden [..., T, H], weight, labels [..., T], *, bias=None, ref_logp=None,
    return_output=False)`` where ``weight`` is the ``[V, H]`` head weight (``lm_head.weight``,
    same dtype as ``hidden``) or the head module itself (its ``.bias`` is then used). Gradients
    reach ``hidden``, ``weight`` and ``bias``.

    Options: those of :class:`FDivLoss`, plus ``softcap`` (Gemma-2 final-logit soft-cap),
    ``temperature`` (logits divided by it) and ``backend`` ("auto", "torch", ...; see
    :func:`fdiv_kernels.available_backends`).
    """

    def __init__(self, *, divergence: str = "sft", beta: float = 1.0, level: str = "token",
                 ignore_index: int = -100, reduction: str = "mean", values: str = "drop", z_loss: float = 0.0,
                 length_normalize: bool = False, shift_labels: bool = False, form: str = "variational",
                 alpha: float = 1.5, softcap: Optional[float] = None, temperature: float = 1.0,
                 backend: str = "auto") -> None:
        super().__init__(divergence=divergence, beta=beta, level=level, ignore_index=ignore_index,
                         reduction=reduction, values=values, z_loss=z_loss, length_normalize=length_normalize,
                         shift_labels=shift_labels, form=form, alpha=alpha)
        _checks.check_scalars(softcap, temperature)
        self.softcap, self.temperature, self.backend = softcap, float(temperature), backend

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                return_output: bool = False) -> Union[torch.Tensor, LossOutput]:
        w, b = _split_head(weight, bias)
        if self.shift_labels:
            hidden, labels, ref_logp = shift_for_causal_lm(hidden, labels, ref_logp)
        out = loss(hidden, w, labels, bias=b, ref_logp=ref_logp, softcap=self.softcap,
                   temperature=self.temperature, backend=self.backend, **self._loss_kwargs())
        return out if return_output else out.loss

    def extra_repr(self) -> str:
        return super().extra_repr() + f", softcap={self.softcap}, temperature={self.temperature}, backend={self.backend!r}"


class FusedLinearDPOLoss(_tnn.Module):
    """DPO-family loss from concatenated chosen/rejected hidden states, fused with the LM head.

    ``loss_fn(hidden [2B, T, H], weight, labels [2B, T], *, bias=None, ref_logp=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, return_output=False)``:

    * rows ``0..B-1`` are the chosen responses, rows ``B..2B-1`` the rejected ones (TRL's layout);
      ``labels`` is ``ignore_index`` on prompt and padding tokens;
    * policy sequence log-probs come from :func:`fdiv_kernels.sequence_logp` (sum over supervised
      tokens, or the mean when ``length_normalize``), then :func:`fdiv_kernels.dpo_loss`;
    * the reference is either ``ref_logp`` (``[2B]`` sequence log-probs in the same layout and the
      same normalisation, or a ``(ref_chosen [B], ref_rejected [B])`` pair), or the reference
      model's ``ref_hidden [2B, T, H]`` with ``ref_weight`` (defaults to ``weight``), evaluated
      under ``torch.no_grad()``. ``kind="simpo"`` needs no reference.

    Options (keyword-only): ``beta``, ``kind`` (sigmoid, robust, hinge, ipo, simpo),
    ``label_smoothing``, ``gamma`` (SimPO margin), ``ignore_index``, ``length_normalize``
    (default: True for ipo and simpo, as TRL does, False otherwise), ``shift_labels``,
    ``f_divergence``/``f_alpha`` (f-DPO scores: reverse_kl, forward_kl, js, alpha; see
    :mod:`fdiv_kernels.dpo`), ``softcap``, ``temperature``, ``backend``.

    Returns the mean loss over pairs (float32), or the :class:`fdiv_kernels.DPOOutput` with
    ``return_output=True``.
    """

    def __init__(self, *, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                 gamma: float = 0.0, ignore_index: int = -100, length_normalize: Optional[bool] = None,
                 shift_labels: bool = False, f_divergence: str = "reverse_kl", f_alpha: float = 1.0,
                 softcap: Optional[float] = None, temperature: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.spec = DPOSpec(kind=kind, beta=float(beta), label_smoothing=float(label_smoothing), gamma=float(gamma),
                            f_divergence=f_divergence, f_alpha=float(f_alpha), length_normalize=length_normalize)
        self.head = HeadSpec(softcap, temperature, backend)
        self.beta, self.kind, self.label_smoothing, self.gamma = float(beta), kind, float(label_smoothing), float(gamma)
        self.ignore_index, self.shift_labels = int(ignore_index), bool(shift_labels)
        self.length_normalize = self.spec.length_normalize
        self.softcap, self.temperature, self.backend = softcap, float(temperature), backend
        self.f_divergence, self.f_alpha = f_divergence, float(f_alpha)

    def sequence_logps(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[2B]`` sequence log-probs (sum, or mean when ``length_normalize``) of ``hidden [2B, T, H]``."""
        w, b = _split_head(weight, bias)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [2B, T, H], got {tuple(hidden.shape)}")
        if hidden.shape[0] % 2 != 0:
            raise ValueError(f"hidden's first dim must be 2B (chosen rows then rejected rows), got {hidden.shape[0]}")
        if self.shift_labels:
            hidden, labels, _ = shift_for_causal_lm(hidden, labels)
        s = sequence_logp(hidden, w, labels, bias=b, ignore_index=self.ignore_index, softcap=self.softcap,
                          temperature=self.temperature, backend=self.backend)
        return s.mean if self.length_normalize else s.sum

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None,
                ref_logp: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[HeadLike] = None,
                ref_bias: Optional[torch.Tensor] = None, return_output: bool = False) -> Union[torch.Tensor, DPOOutput]:
        w, b = _split_head(weight, bias)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [2B, T, H], got {tuple(hidden.shape)}")
        if hidden.shape[0] % 2 != 0:
            raise ValueError(f"hidden's first dim must be 2B (chosen rows then rejected rows), got {hidden.shape[0]}")
        ref = self._reference(hidden, weight, labels, bias, ref_logp, ref_hidden, ref_weight, ref_bias)
        if self.shift_labels:
            hidden, labels, _ = shift_for_causal_lm(hidden, labels)
        _checks.check_head(hidden, w, labels, b, self.ignore_index, self.softcap, self.temperature)
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        ref_seq = None if ref is None else ref.to(cdt)
        zero = torch.zeros((), dtype=cdt, device=labels.device)
        ev = evaluate(self.spec, hidden=hidden, weight=w, labels=labels, bias=b, ref_tok=zero, ref_seq=ref_seq,
                      head=self.head, ignore_index=self.ignore_index, return_entropy=False)
        rows = Rows(ev.stats.logp, ev.stats.lse, labels != self.ignore_index, zero, ref_seq)
        pc, pr = self.spec.sequence_logps(rows).chunk(2, dim=0)
        rc, rr = (None, None) if ref_seq is None else ref_seq.chunk(2, dim=0)
        out = dpo_loss(pc, pr, rc, rr, beta=self.beta, kind=self.kind, label_smoothing=self.label_smoothing,
                       gamma=self.gamma, f_divergence=self.f_divergence, f_alpha=self.f_alpha)
        out.loss = ev.loss  # the same number, with the single-pass gradients
        return out if return_output else out.loss

    def _reference(self, hidden, weight, labels, bias, ref_logp, ref_hidden, ref_weight, ref_bias):
        """``[2B]`` reference sequence log-probs (chosen then rejected), or None for simpo."""
        if ref_logp is not None and ref_hidden is not None:
            raise ValueError("pass either ref_logp or ref_hidden, not both")
        if ref_hidden is not None:
            if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
                raise ValueError(f"ref_hidden must have hidden's shape [2B, T, *] = {tuple(hidden.shape[:-1])}, "
                                 f"got {tuple(ref_hidden.shape)}")
            with torch.no_grad():
                return self.sequence_logps(ref_hidden, weight if ref_weight is None else ref_weight, labels,
                                           bias=ref_bias if ref_weight is not None else bias)
        if isinstance(ref_logp, (tuple, list)):
            if len(ref_logp) != 2:
                raise ValueError("ref_logp as a sequence must be (ref_chosen, ref_rejected)")
            return torch.cat([ref_logp[0].reshape(-1), ref_logp[1].reshape(-1)])
        if ref_logp is not None:
            if tuple(ref_logp.shape) != (hidden.shape[0],):
                raise ValueError(f"ref_logp must have shape [2B] = ({hidden.shape[0]},) (chosen then rejected), "
                                 f"got {tuple(ref_logp.shape)}")
            return ref_logp
        if self.spec.needs_reference:
            raise ValueError(f"kind={self.kind!r} needs a reference: pass ref_logp=... or ref_hidden=...")
        return None

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, kind={self.kind!r}, label_smoothing={self.label_smoothing}, gamma={self.gamma}, "
                f"length_normalize={self.length_normalize}, shift_labels={self.shift_labels}, "
                f"f_divergence={self.f_divergence!r}, f_alpha={self.f_alpha}")

"""The loss of a spec by the cheapest exact path, and the primitives each path is built from.

Two paths for ``(hidden, weight)`` inputs (:func:`evaluate`):

* **fused** (:mod:`.fused`): when gradients are needed, the spec has a one-pass form
  (:attr:`LossSpec.single_pass`) and the knob ``single_pass`` is on (default): loss, statistics
  and gradients in one pass over the logits, three GEMMs;
* **two-pass**: the token statistics (:mod:`.token_stats`, one logits GEMM, or none for
  ``logits=``), then the spec's :meth:`~fdiv_kernels.specs.LossSpec.terms` on the whole batch with
  torch autograd; the backward recomputes the logits (three more GEMMs). Every loss a spec does not
  make single-pass (``reduction="none"``, a log-mean-exp mixed with linear terms), every call
  without gradients (only the logits GEMM runs) and :func:`evaluate_logits`.

Both are put together from :class:`Primitives`: the fused loss, the token statistics and the
data checks. :data:`EAGER` holds the eager ones; :mod:`fdiv_kernels.compiled` holds the same as
``torch.library`` custom ops, and the API layer (:mod:`fdiv_kernels.api`) chooses between them:
the paths themselves are written once, here.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .. import checks, knobs
from ..formulas.preference import explain_pair
from ..specs import HeadSpec, LossSpec, Norms, Rows
from .class_options import mean_direction, mean_logits_from_logits, with_class_options
from .distill import eager_distill_loss
from ..kernels.backends import resolve_backend
from .fused import FusedLossFunction, flat_rows, prepare, row_order
from .predicted import from_logits, predicted_tokens
from .token_stats import TokenStatsParams, head_logits, token_stats, token_stats_from_logits

__all__ = ["EAGER", "Evaluated", "Primitives", "evaluate", "evaluate_logits", "explain_loss", "fused_applies",
           "whole_batch"]


class Evaluated(NamedTuple):
    """What :func:`evaluate` returns: the loss, the per-token statistics (shape of ``labels``;
    ``entropy`` None unless asked for) and, for a log-mean-exp loss (``spec.uses_lme``), its
    log-sum-exp part ``log sum psi`` (0-d, ``-inf`` when nothing is supervised; None otherwise);
    ``predicted``: the predicted tokens when asked for (:mod:`.predicted`; shape of ``labels``)."""

    loss: torch.Tensor
    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    log_sum_psi: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None


class Primitives(NamedTuple):
    """The steps the paths are built from (eager: :data:`EAGER`; ops: ``fdiv_kernels.compiled.OPS``).

    * ``fused_loss(spec, hidden, weight, bias, labels, ref_tok, ref_seq, head, ignore_index,
      return_entropy, class_weight, return_predicted) -> (loss, logp, lse, entropy | None,
      predicted | None)``, its data check included (``class_weight``: the cross-entropy options'
      ``c [V]`` or None; ``return_predicted``: the predicted tokens, eager only);
    * ``token_stats(hidden, weight, bias, labels, params) -> (logp, lse, entropy | None)``;
    * ``check_labels(labels, vocab_size, ignore_index) -> labels``;
    * ``check_token_stats(logp, lse, entropy, labels, head) -> (logp, lse, entropy)``;
    * ``check_loss(spec, loss, logp, lse, entropy, labels, ref_tok, ref_seq, head, ignore_index) -> loss``;
    * ``check_pairs(spec, losses, pc, pr, rc, rr) -> losses``;
    * ``check_class_data(c, bias, smoothing) -> c``: the cross-entropy options' class weights
      (:func:`fdiv_kernels.checks.check_class_data`);
    * ``distill_loss(spec, head, hidden, weight, bias, labels, teacher_hidden, teacher_weight,
      teacher_bias, teacher_logits, ignore_index) -> (loss, div, nll)``, its data check included
      (:mod:`.distill`).

    Each check returns what it checked, so a traced graph keeps it before its use.
    """

    fused_loss: Callable
    token_stats: Callable
    check_labels: Callable
    check_token_stats: Callable
    check_loss: Callable
    check_pairs: Callable
    distill_loss: Optional[Callable] = None
    check_class_data: Optional[Callable] = None


# ---------------------------------------------------------------------------------------------
# The two-pass loss and the explanation of a failed data check
# ---------------------------------------------------------------------------------------------

def whole_batch(spec: LossSpec, rows: Rows, norms: Norms) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(loss, log sum psi | None)`` of a whole batch from its per-token statistics (the two-pass
    and logits paths): the spec's :meth:`terms` on all rows (in the spec's row order),
    differentiable by autograd."""
    order = row_order(spec, rows.mask.shape[0], rows.mask.device)
    if order is not None:
        rows = rows.select(order)
    if spec.reduction == "none":
        return spec.per_element(rows), None
    terms = spec.terms(rows, norms)
    return spec.finish(terms, norms), terms.lme


def explain_loss(spec: LossSpec, logp: torch.Tensor, lse: torch.Tensor, mask2: torch.Tensor, ref_tok: torch.Tensor,
                 ref_seq: Optional[torch.Tensor]) -> Callable[[], Optional[str]]:
    """The spec's explanation of a non-finite loss, as the data check's callable."""

    def explain() -> Optional[str]:
        shape = mask2.shape
        rows = Rows(logp.detach().reshape(shape), lse.detach().reshape(shape), mask2, ref_tok.detach(),
                    None if ref_seq is None else ref_seq.detach())
        order = row_order(spec, shape[0], mask2.device)
        return spec.explain(rows if order is None else rows.select(order))

    return explain


def _mask2(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).reshape(flat_rows(labels))


# ---------------------------------------------------------------------------------------------
# The eager primitives
# ---------------------------------------------------------------------------------------------

def eager_fused_loss(spec: LossSpec, hidden, weight, bias, labels, ref_tok, ref_seq, head: HeadSpec,
                     ignore_index: int, return_entropy: bool, class_weight: Optional[torch.Tensor] = None,
                     return_predicted: bool = False):
    """The fused path (:class:`~.fused.FusedLossFunction`) and its data check."""
    params = prepare(spec, head, hidden, weight, labels, ignore_index, return_entropy, return_predicted)
    loss, logp, lse, ent, finite, pred = FusedLossFunction.apply(hidden, weight, bias, labels, ref_tok, ref_seq,
                                                                 params, class_weight)
    ent = ent if return_entropy else None
    mask2 = _mask2(labels, ignore_index)
    checks.check_loss_data(loss, logp, lse, ent, labels, mask2, ref_tok, ref_seq, head,
                           explain_loss(spec, logp, lse, mask2, ref_tok, ref_seq), finite)
    return loss, logp, lse, ent, (pred if return_predicted else None)


def _check_labels(labels, vocab_size, ignore_index):
    checks.check_label_values(labels, vocab_size, ignore_index)
    return labels


def _check_token_stats(logp, lse, entropy, labels, head: HeadSpec):
    checks.check_token_stats(logp, lse, entropy, labels, head)
    return logp, lse, entropy


def _check_loss(spec, loss, logp, lse, entropy, labels, ref_tok, ref_seq, head: HeadSpec, ignore_index):
    mask2 = _mask2(labels, ignore_index)
    checks.check_loss_data(loss, logp, lse, entropy, labels, mask2, ref_tok, ref_seq, head,
                           explain_loss(spec, logp, lse, mask2, ref_tok, ref_seq))
    return loss


def _check_pairs(spec, losses, pc, pr, rc, rr):
    refs = (("ref_chosen", rc), ("ref_rejected", rr)) if spec.needs_reference else ()
    checks.check_pairs(losses, refs, lambda: explain_pair(pc, pr, rc, rr, losses, spec))
    return losses


def _check_class_data(c, bias, smoothing):
    checks.check_class_data(c, bias, smoothing)
    return c


EAGER = Primitives(fused_loss=eager_fused_loss, token_stats=token_stats, check_labels=_check_labels,
                   check_token_stats=_check_token_stats, check_loss=_check_loss, check_pairs=_check_pairs,
                   distill_loss=eager_distill_loss, check_class_data=_check_class_data)


# ---------------------------------------------------------------------------------------------
# The paths
# ---------------------------------------------------------------------------------------------

def fused_applies(spec: LossSpec, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`evaluate` takes the fused path (module docstring)."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    return wants_grad and spec.single_pass and bool(knobs.get("single_pass"))


def evaluate(spec: LossSpec, prims: Primitives, *, hidden: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor], labels: torch.Tensor, ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor],
             head: HeadSpec, ignore_index: int, return_entropy: bool,
             class_weight: Optional[torch.Tensor] = None, return_predicted: bool = False) -> Evaluated:
    """The loss of ``spec`` and the token statistics from the LM head (module docstring).

    Inputs are validated by the caller (``ref_tok`` ``[R, T]`` masked or a 0-d zero, ``ref_seq``
    ``[R]`` or ``None``, both in the compute dtype; ``class_weight``: the cross-entropy options'
    ``c [V]`` in the compute dtype, :func:`.class_options.class_vector`, or None); the data check
    runs once, at the end. ``return_predicted``: also the predicted tokens (:mod:`.predicted`: from
    the fused pass's kept logits, else one more logits pass).
    """
    if fused_applies(spec, hidden, weight, bias):
        loss, logp, lse, ent, pred = prims.fused_loss(spec, hidden, weight, bias, labels, ref_tok, ref_seq, head,
                                                      ignore_index, return_entropy, class_weight, return_predicted)
        return Evaluated(loss, logp, lse, ent, _fused_log_sum_psi(spec, loss, labels, ignore_index), pred)
    params = TokenStatsParams(head, ignore_index, bool(return_entropy))
    logp, lse, ent = prims.token_stats(hidden, weight, bias, labels, params)
    mean_logit = None
    if class_weight is not None and checks.class_smoothing(spec):  # differentiable by autograd (one GEMV)
        u, s = mean_direction(class_weight, weight, bias, head)
        mean_logit = hidden.to(u.dtype) @ u + s
    ev = _two_pass(spec, prims, logp, lse, ent, labels, ref_tok, ref_seq, head, ignore_index, class_weight,
                   mean_logit)
    if not return_predicted:
        return ev
    pred = predicted_tokens(resolve_backend(head.backend, hidden), hidden, weight, bias, labels, head, ignore_index)
    return ev._replace(predicted=pred)


def _fused_log_sum_psi(spec: LossSpec, loss: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int) -> Optional[torch.Tensor]:
    """``log sum psi`` of a fused log-mean-exp loss: the fused path takes one only without linear
    terms, so it is the loss itself (a sum) or the loss plus ``log n`` (a mean); -inf for ``n = 0``."""
    if not spec.uses_lme:
        return None
    count = spec.units(spec.normalizers((labels != ignore_index).reshape(flat_rows(labels)))).to(loss.dtype)
    lme = loss if spec.reduction == "sum" else loss + torch.log(count.clamp(min=1))
    return torch.where(count > 0, lme, torch.full_like(lme, -math.inf))


def evaluate_logits(spec: LossSpec, prims: Primitives, *, logits: torch.Tensor, labels: torch.Tensor,
                    ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], ignore_index: int,
                    return_entropy: bool, class_weight: Optional[torch.Tensor] = None,
                    return_predicted: bool = False, head: HeadSpec = HeadSpec()) -> Evaluated:
    """:func:`evaluate` for ``logits [..., V]`` (plain torch autograd on the upcast logits, after the
    ``head``'s soft-cap and temperature: :func:`~.token_stats.head_logits`)."""
    logits = head_logits(logits, head)
    logp, lse, ent = token_stats_from_logits(logits, labels, ignore_index, return_entropy)
    mean_logit = None
    if class_weight is not None and checks.class_smoothing(spec):
        mean_logit = mean_logits_from_logits(logits, class_weight)
    ev = _two_pass(spec, prims, logp, lse, ent, labels, ref_tok, ref_seq, HeadSpec(), ignore_index, class_weight,
                   mean_logit)
    return ev._replace(predicted=from_logits(logits, labels, ignore_index)) if return_predicted else ev


def _two_pass(spec, prims, logp, lse, ent, labels, ref_tok, ref_seq, head, ignore_index, class_weight=None,
              mean_logit=None) -> Evaluated:
    shape = flat_rows(labels)
    mask2 = (labels != ignore_index).reshape(shape)
    rows = Rows(logp.reshape(shape), lse.reshape(shape), mask2, ref_tok, ref_seq)
    rows, norms = with_class_options(rows, spec.normalizers(mask2), spec, class_weight, labels.reshape(shape),
                                     None if mean_logit is None else mean_logit.reshape(shape))
    loss, log_sum_psi = whole_batch(spec, rows, norms)
    loss = prims.check_loss(spec, loss, logp, lse, ent, labels, ref_tok, ref_seq, head, ignore_index)
    return Evaluated(loss, logp, lse, ent, log_sum_psi)

"""The distillation loss: teacher and student LM heads, one epilogue, the student's gradients, in chunks.

:func:`distill_forward` is a plain function (no autograd, no checks: plain tensors in and out, so
that the ``torch.compile`` op of :mod:`fdiv_kernels.compiled` runs it unchanged). Over the
supervised tokens (``labels != ignore_index``), in chunks of the backend's
``DistillKernels.chunk_tokens`` rows (:mod:`fdiv_kernels.kernels.distill_chunks`), it computes
each token's divergence and hard-label NLL and, when gradients are wanted, the student's
``grad_hidden``, ``grad_weight`` and ``grad_bias`` in the same pass: the loss is token-local and its
mean divides by the count read off the labels first, so every token's weight in the loss (``wt``) is
known before the first GEMM. The teacher gets no gradient.

:class:`DistillFunction` wraps it: for ``reduction`` ``"mean"``/``"sum"`` the gradients come from
the forward and the backward scales them by ``grad_output`` (one pass, four GEMMs per chunk); for
``"none"`` the forward computes values only and the backward runs the pass again with each
token's ``grad_output`` as its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .. import checks
from ..kernels.backends import Backend, resolve_distill_backend
from ..specs import DistillSpec, HeadSpec
from .token_stats import scatter_tokens, supervised_index

__all__ = ["DistillFunction", "DistillParams", "DistillResult", "distill_forward", "eager_distill_loss",
           "explain_distill", "prepare_distill"]


@dataclass(frozen=True)
class DistillParams:
    """Everything :func:`distill_forward` needs besides tensors (saved on ``ctx``): the spec, the
    head (its backend name), the resolved backend and ``ignore_index``."""

    spec: DistillSpec
    head: HeadSpec
    backend: Backend
    ignore_index: int


class DistillNeeds(NamedTuple):
    """Which of the student's gradients are wanted: ``hidden``, ``weight``, ``bias``."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class DistillResult(NamedTuple):
    """``loss`` (0-d, or per token for ``reduction="none"``), per-token ``div`` (``kappa D``) and
    ``nll`` (shape of ``labels``, 0 where ignored), ``finite`` (0-d bool: values and gradients
    finite) and the gradients ``grad_hidden``, ``grad_weight``, ``grad_bias`` at ``grad_output = 1``
    (or the given per-token weights), in the compute dtype (None where not computed)."""

    loss: torch.Tensor
    div: torch.Tensor
    nll: torch.Tensor
    finite: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


def prepare_distill(spec: DistillSpec, head: HeadSpec, hidden: torch.Tensor, ignore_index: int) -> DistillParams:
    """The backend of a call: ``head.backend`` if it has distillation kernels (``"auto"``: the first
    available one that does), the torch reference for a dtype it does not compute."""
    return DistillParams(spec, head, resolve_distill_backend(head.backend, hidden), ignore_index)


def distill_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                    teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                    teacher_bias: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                    params: DistillParams, needs: DistillNeeds,
                    grad_tokens: Optional[torch.Tensor] = None) -> DistillResult:
    """The loss and (``needs``) the student's gradients (module docstring). ``grad_tokens``
    (shape of ``labels``): the per-token weights of ``reduction="none"``'s backward."""
    spec = params.spec
    with torch.no_grad():
        idx = supervised_index(labels, params.ignore_index)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        hv, yv = (h2, y) if idx is None else (h2.index_select(0, idx), y.index_select(0, idx))
        yv = yv.long()
        n = hv.shape[0]
        th2 = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        tz2 = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1])
        if spec.reduction == "none":
            wt = None if grad_tokens is None else _pick(grad_tokens.reshape(-1), idx)
        else:
            wt = torch.full((n,), 1.0 if spec.reduction == "sum" else 1.0 / max(n, 1), dtype=torch.float64,
                            device=hidden.device)
        with_grads = needs.any and wt is not None
        kern = params.backend.distill(weight, bias, teacher_weight, teacher_bias, spec,
                                      need_h=with_grads and needs.hidden, need_w=with_grads and needs.weight,
                                      need_b=with_grads and needs.bias and bias is not None)
        cdt = kern.dtype
        div_v = torch.empty(n, dtype=cdt, device=hidden.device)
        nll_v = torch.empty_like(div_v)
        gh_v = torch.empty((n, hv.shape[1]), dtype=cdt, device=hidden.device) if with_grads and needs.hidden else None
        step = max(1, kern.chunk_tokens)
        for s in range(0, n, step):
            e = min(n, s + step)
            rows = slice(s, e)
            sel = slice(s, e) if idx is None else idx[s:e]
            d, nl, g = kern.chunk(hv[rows], yv[rows], None if wt is None or not with_grads else wt[rows],
                                 teacher_h=None if th2 is None else th2[sel],
                                 teacher_z=None if tz2 is None else tz2[sel])
            div_v[rows], nll_v[rows] = d, nl
            if gh_v is not None:
                gh_v[rows] = g
        div_v.mul_(spec.kappa)
        per_tok = div_v + spec.hard_label_weight * nll_v if spec.hard_label_weight > 0 else div_v
        if spec.reduction == "none":
            loss = scatter_tokens(per_tok, idx, labels.shape)
        else:
            loss = per_tok.sum() / (1 if spec.reduction == "sum" else max(n, 1))
        gw, gb = kern.results() if with_grads else (None, None)
        gh = None if gh_v is None else scatter_tokens(gh_v, idx, hidden.shape[:-1])
        finite = checks.all_finite((div_v, nll_v, gh_v, gw, gb)).to(hidden.device) if checks.data_checks_enabled() \
            else torch.ones((), dtype=torch.bool, device=hidden.device)
        return DistillResult(loss, scatter_tokens(div_v, idx, labels.shape), scatter_tokens(nll_v, idx, labels.shape),
                             finite, gh, gw if needs.weight else None,
                             gb if needs.bias and bias is not None else None)


def _pick(v: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    return v if idx is None else v.index_select(0, idx)


def explain_distill(spec: DistillSpec, hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                    teacher_logits, div: torch.Tensor, nll: torch.Tensor,
                    ignore_index: int) -> Callable[[], Optional[str]]:
    """The data check's explanation: the first counted token whose loss is not finite, its two
    ``[V]`` logit rows recomputed in float64 and read by :meth:`DistillSpec.explain`; else the
    gradients (or the sum) overflow."""

    def explain() -> Optional[str]:
        mask = labels != ignore_index
        bad = mask & ~(torch.isfinite(div) & torch.isfinite(nll))
        if not bool(bad.any()):
            return (f"the distillation loss (reduction={spec.reduction!r}) or its gradient overflows float32 although "
                    f"every token's divergence is finite; use reduction='mean', a bounded divergence or a higher "
                    f"temperature")
        pos = checks.first_position(bad)
        flat = _flat_index(pos, labels.shape)
        h = hidden.reshape(-1, hidden.shape[-1])[flat].double()
        zs = weight.double() @ h + (0 if bias is None else bias.double())
        if teacher_logits is not None:
            zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[flat].double()
        else:
            th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[flat].double()
            zt = teacher_weight.double() @ th + (0 if teacher_bias is None else teacher_bias.double())
        return spec.explain(zt, zs, int(labels.reshape(-1)[flat]), pos)

    return explain


def _flat_index(pos, shape) -> int:
    flat = 0
    for p, s in zip(pos, shape):
        flat = flat * s + p
    return flat


class DistillFunction(torch.autograd.Function):
    """``DistillFunction.apply(hidden, weight, bias, labels, teacher_hidden, teacher_weight,
    teacher_bias, teacher_logits, params) -> (loss, div, nll, finite)`` (module docstring). Only
    ``hidden``, ``weight`` and ``bias`` get gradients; ``div``, ``nll`` and ``finite`` are not
    differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                params: DistillParams):
        ctx.set_materialize_grads(False)
        needs = DistillNeeds(*ctx.needs_input_grad[:3])
        res = distill_forward(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                              teacher_logits, params, needs)
        ctx.mark_non_differentiable(res.div, res.nll, res.finite)
        ctx.params, ctx.needs = params, needs
        ctx.grads = None if params.spec.reduction == "none" else (res.grad_hidden, res.grad_weight, res.grad_bias)
        ctx.save_for_backward(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                              teacher_logits)
        return res.loss, res.div, res.nll, res.finite

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 9
        params, needs = ctx.params, ctx.needs
        saved = ctx.saved_tensors
        hidden, weight, bias = saved[:3]
        if params.spec.reduction == "none":  # the pass again, each token weighted by its grad_output
            res = distill_forward(*saved, params, needs, grad_tokens=grad_loss)
            gh, gw, gb = res.grad_hidden, res.grad_weight, res.grad_bias
            s = 1.0
        else:
            grads = ctx.grads
            if grads is None:  # a second backward (retain_graph=True): the first one handed them out
                res = distill_forward(*saved, params, needs)
                grads = (res.grad_hidden, res.grad_weight, res.grad_bias)
            ctx.grads = None
            gh, gw, gb = grads
            s = float(grad_loss)
        return (_out(gh, s, hidden.dtype, needs.hidden), _out(gw, s, weight.dtype, needs.weight),
                _out(gb, s, None if bias is None else bias.dtype, needs.bias and bias is not None)) + (None,) * 6


def _out(g: Optional[torch.Tensor], s: float, dtype, need: bool) -> Optional[torch.Tensor]:
    if not need or g is None:
        return None
    if s == 1.0 and g.dtype == dtype:
        return g
    return torch.mul(g, s, out=torch.empty(g.shape, dtype=dtype, device=g.device))


def eager_distill_loss(spec: DistillSpec, head: HeadSpec, hidden, weight, bias, labels, teacher_hidden,
                       teacher_weight, teacher_bias, teacher_logits, ignore_index: int):
    """The :class:`~fdiv_kernels.autograd.evaluate.Primitives` ``distill_loss``:
    :class:`DistillFunction` and its data check; returns ``(loss, div, nll)``."""
    params = prepare_distill(spec, head, hidden, ignore_index)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        loss, div, nll, finite = DistillFunction.apply(hidden, weight, bias, labels, teacher_hidden, teacher_weight,
                                                       teacher_bias, teacher_logits, params)
    else:  # no gradient wanted: the values alone (two GEMMs and the epilogue per chunk)
        res = distill_forward(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias,
                              teacher_logits, params, DistillNeeds(False, False, False))
        loss, div, nll, finite = res.loss, res.div, res.nll, res.finite
    checks.check_distill_data(loss, finite, explain_distill(spec, hidden.detach(), weight.detach(),
                                                            None if bias is None else bias.detach(), labels,
                                                            teacher_hidden, teacher_weight, teacher_bias,
                                                            teacher_logits, div, nll, ignore_index))
    return loss, div, nll


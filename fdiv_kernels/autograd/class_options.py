"""The cross-entropy options' per-token inputs: class weights and label smoothing's mean logit.

With class weights ``c [V]`` (``fk.loss(class_weight=)``; ``F.cross_entropy(weight=)``) and label
smoothing ``eps`` (``FDivSpec.label_smoothing``), a token's loss reads two more per-token numbers
(:class:`fdiv_kernels.specs.Rows`): its class weight ``c[y_t]`` (a gather, no gradient) and its
class-weighted mean logit ``m_t = (1/V) sum_v c_v z_v``. Without a soft-cap the logits are linear
in the hidden state, so

    m_t = h_t . u + s,    u = W^T c / (V T),    s = c . b / (V T)

is one GEMV per call (``V x H``) and one per chunk (``n x H``), in plain torch above the kernels:
the kernels are unchanged. On the two-pass paths it is differentiable by autograd; the fused pass
(:mod:`.fused`) forms its gradients in closed form from the spec's coefficient ``a_t = dL/dm_t``
(:class:`MeanLogitGrads`): ``grad_h_t += a_t u``, ``grad_W += (c / (V T)) (sum_t a_t h_t)^T``,
``grad_b += (c / (V T)) sum_t a_t`` (a rank-one update). ``docs/math.md`` section 3.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..specs import HeadSpec, Norms, Rows

__all__ = ["MeanLogitGrads", "class_vector", "mean_direction", "mean_logits_from_logits", "token_weights",
           "with_class_options"]


def class_vector(spec, class_weight: Optional[torch.Tensor], vocab_size: int, like: torch.Tensor,
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The class weights ``c [V]`` of a call in ``dtype`` (detached; ones for label smoothing
    without class weights), or None when both options are off."""
    if class_weight is None and not checks.class_smoothing(spec):
        return None
    if class_weight is None:
        return torch.ones(vocab_size, dtype=dtype, device=like.device)
    return class_weight.detach().to(dtype)


def mean_direction(c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   head: HeadSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(u [H], s 0-d)`` with ``m_t = h_t . u + s`` (module docstring), in ``c``'s dtype;
    differentiable in ``weight`` and ``bias`` when autograd records. A class of weight 0 adds
    nothing, even where its bias is ``-inf`` (a masked column)."""
    f = 1.0 / (weight.shape[0] * head.temperature)
    u = (c @ weight.to(c.dtype)) * f
    s = c.new_zeros(()) if bias is None else torch.where(c != 0, c * bias.to(c.dtype), c.new_zeros(())).sum() * f
    return u, s


def mean_logits_from_logits(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``m = (1/V) sum_v c_v z_v`` of ``logits [..., V]`` (shape ``[...]``, ``c``'s dtype; classes of
    weight 0 add nothing, ``-inf`` logits included)."""
    z = logits.to(c.dtype)
    return torch.where(c != 0, z * c, z.new_zeros(())).sum(-1) / logits.shape[-1]


def token_weights(c: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token's class weight ``c[y]`` (0 where ``mask`` is False), in ``labels``' shape."""
    return torch.where(mask, c[torch.where(mask, labels, 0)], c.new_zeros(()))


def with_class_options(rows: Rows, norms: Norms, spec, c: Optional[torch.Tensor], labels2: torch.Tensor,
                       mean_logit: Optional[torch.Tensor]) -> Tuple[Rows, Norms]:
    """``rows`` and ``norms`` with the options' fields (:class:`~fdiv_kernels.specs.Rows`): the
    tokens' class weights ``c[y]`` (0 where unsupervised) from ``labels2`` (the labels in ``rows``'
    shape), their sum and, with label smoothing, ``mean_logit`` (``rows``' shape) and ``C / V``.
    Unchanged when the options are off (``c`` None)."""
    if c is None:
        return rows, norms
    w = token_weights(c, rows.mask, labels2)
    smoothing = bool(checks.class_smoothing(spec))
    rows = rows._replace(weight=w, mean_logit=mean_logit if smoothing else None,
                         class_mean=c.mean() if smoothing else None)
    return rows, norms._replace(weight=w.sum())


class MeanLogitGrads:
    """The fused pass's mean logits and their gradients (module docstring): ``values(h)`` per chunk,
    ``add(a, h, grad_h)`` with the chunk's coefficients ``a [n]`` (adds ``a u`` to ``grad_h [n, H]``
    in place), and ``apply(grad_W, grad_b)`` once after the last chunk (in place)."""

    def __init__(self, c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], head: HeadSpec,
                 dtype: torch.dtype):
        self.c = c.to(dtype)
        self.f = 1.0 / (weight.shape[0] * head.temperature)
        self.u, self.s = mean_direction(self.c, weight, bias, head)
        self.sum_h = torch.zeros_like(self.u)
        self.sum_a = self.u.new_zeros(())

    def values(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.u.dtype) @ self.u + self.s

    def add(self, a: torch.Tensor, h: torch.Tensor, grad_h: Optional[torch.Tensor]) -> None:
        a = a.to(self.u.dtype)
        if grad_h is not None:
            grad_h.add_(a[:, None] * self.u.to(grad_h.dtype))
        self.sum_h += a @ h.to(self.u.dtype)
        self.sum_a += a.sum()

    def apply(self, grad_w: Optional[torch.Tensor], grad_b: Optional[torch.Tensor]) -> None:
        cf = self.c * self.f
        if grad_w is not None:
            grad_w.addr_(cf.to(grad_w.dtype), self.sum_h.to(grad_w.dtype))
        if grad_b is not None:
            grad_b.add_((cf * self.sum_a).to(grad_b.dtype))

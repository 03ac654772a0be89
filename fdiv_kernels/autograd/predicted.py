"""Each supervised token's predicted token (the argmax of its logits) and the token accuracy.

``fk.loss(..., return_token_accuracy=True)`` (Liger's ``return_token_accuracy`` /
``return_predicted_tokens``, TRL's ``mean_token_accuracy``). On the one-pass fused path of a
backend whose chunk kernels read the prediction off each chunk's kept logits (``argmax()``, an
optional part of the contract, :mod:`fdiv_kernels.kernels.backends`: every backend here) it
costs no GEMM. Every other case with ``(hidden, weight)`` (no gradients, the two-pass specs, a
row longer than the backend's chunk, a registered backend without ``argmax()``) runs
:func:`argmax_rows`: chunk kernels' ``stats`` over the supervised tokens without gradient
buffers (the backend's, or the ``torch`` backend's), one more logits GEMM.
With ``logits=`` it is their ``argmax``.

Also the target logit ``z_y`` (``fk.loss(..., return_target_logit=True)``; cut-cross-entropy's
indexed dot): :func:`target_logits` forms it exactly from ``h_t . W[y_t] + b[y_t]`` (one
``n x H`` row-wise dot, the head's transform, differentiable by autograd), not as ``logp + lse``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import chunk_sizes, torch_chunked
from ..kernels.backends import Backend
from ..specs import HeadSpec
from .token_stats import supervised_index, valid_rows

__all__ = ["argmax_rows", "from_logits", "has_argmax", "predicted_tokens", "scatter_predictions", "target_logits",
           "token_accuracy"]


def has_argmax(kern) -> bool:
    """Whether chunk kernels read the predicted tokens off their kept logits (``argmax()``)."""
    return hasattr(kern, "argmax")


def scatter_predictions(pred_v: torch.Tensor, idx: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per-supervised-token predictions ``pred_v [n]`` back to ``labels``' shape, ``-1`` at ignored
    positions (Liger's convention)."""
    if idx is None:
        return pred_v.reshape(labels.shape)
    out = torch.full((labels.numel(),), -1, dtype=torch.long, device=labels.device)
    return out.index_copy_(0, idx, pred_v).reshape(labels.shape)


def argmax_rows(backend: Backend, hv: torch.Tensor, yv: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], head: HeadSpec) -> torch.Tensor:
    """``[n]`` int64: the argmax of the logits of the rows ``hv [n, H]`` (labels ``yv``), by chunk
    kernels' ``stats`` and ``argmax()``: ``backend``'s, or the ``torch`` backend's where they have none
    (module docstring)."""
    with torch.no_grad():
        w, b = weight.detach().contiguous(), None if bias is None else bias.detach().contiguous()
        opts = dict(return_entropy=False, need_h=False, need_w=False, need_b=False)
        kern = None if backend.single_pass is None else backend.single_pass(w, b, head, **opts)
        budget = None if kern is None else backend.chunk_tokens(w.shape[0], w.shape[1], hv.dtype)
        if kern is None or not has_argmax(kern):
            kern = torch_chunked.ChunkKernels(w, b, head, **opts)
            budget = chunk_sizes.torch_chunk_tokens(w.shape[0], w.shape[1], hv.dtype)
        n = hv.shape[0]
        budget = max(1, budget)
        pred = torch.empty(n, dtype=torch.long, device=hv.device)
        for t0 in range(0, n, budget):
            sl = slice(t0, min(n, t0 + budget))
            kern.stats(hv[sl], yv[sl])
            pred[sl] = kern.argmax()
        return pred


def predicted_tokens(backend: Backend, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     labels: torch.Tensor, head: HeadSpec, ignore_index: int) -> torch.Tensor:
    """``[*labels.shape]`` int64: the argmax of each supervised token's logits (``-1`` where
    ignored), by :func:`argmax_rows`."""
    idx = supervised_index(labels, ignore_index)
    hv, yv = valid_rows(hidden.detach(), labels, idx)
    return scatter_predictions(argmax_rows(backend, hv, yv, weight, bias, head), idx, labels)


def from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The predictions of ``logits [..., V]`` (``-1`` where ignored)."""
    with torch.no_grad():
        return torch.where(labels != ignore_index, logits.argmax(-1), -1)


def token_accuracy(pred: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-d float32: the fraction of supervised tokens whose prediction is the label (0 when none)."""
    mask = labels != ignore_index
    hits = ((pred == labels) & mask).sum()
    return hits.to(torch.float32) / mask.sum().clamp(min=1).to(torch.float32)


def target_logits(hidden: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  labels: torch.Tensor, head: HeadSpec, ignore_index: int,
                  logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[*labels.shape]``: each supervised token's logit of its label, ``z_y = cap(h . W[y] + b[y]) / T``
    (0 where ignored), in the compute dtype (float32; float64 for float64 inputs), differentiable by
    autograd in ``hidden``, ``weight``, ``bias`` (or ``logits``, whose entry it gathers)."""
    mask = labels != ignore_index
    y = torch.where(mask, labels, 0).long()
    if logits is not None:
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.gather(-1, y[..., None]).squeeze(-1).to(cdt)
        return torch.where(mask, z, z.new_zeros(()))
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w_y = weight.index_select(0, y.reshape(-1)).reshape(*y.shape, weight.shape[1])
    z = (hidden.to(cdt) * w_y.to(cdt)).sum(-1)
    if bias is not None:
        z = z + bias.to(cdt).index_select(0, y.reshape(-1)).reshape(y.shape)
    z = torch_chunked.transform(z, head)[0]
    return torch.where(mask, z, z.new_zeros(()))

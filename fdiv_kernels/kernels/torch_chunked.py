"""The ``"torch"`` backend: the reference implementation of ``token_stats``, chunked over tokens.

Chunk rule (:mod:`.chunk_sizes`): rows are processed ``torch_rows(V) = max(1, 2**22 // V)`` at a
time (16 MiB of fp32 logits). Forward holds one chunk of logits; backward holds one chunk of
logits and one of the gradient coefficient. Peak extra memory is therefore O(2**22 + V*H) (the fp32
grad_weight accumulator and, for bf16/fp16 inputs, an fp32 copy of the weight), never O(N*V).

Math (per row n, with z = cap(h W^T + b) / T, cap(x) = c*tanh(x/c) when a soft-cap c is set):

    lse[n]  = logsumexp_v z[n, v]
    logp[n] = z[n, y[n]] - lse[n]
    ent[n]  = lse[n] - sum_v p[n, v] z[n, v],  p = softmax(z)
    dL/dz   = g * onehot(y) + (k - g) * p - e * p * (z - (lse - ent))

with g = dL/dlogp, k = dL/dlse, e = dL/dent; a logit of -inf (masked token) has p = 0 and adds
exact zeros (``p * z`` and ``p * (z - mean)`` are taken as 0 there, not ``0 * -inf``). The
temperature is applied as a multiplication by ``1 / T`` (rounded), as in the native backends. Computation is in float32 (float64 for float64
inputs); low-precision inputs are upcast chunk by chunk.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import chunk_sizes
from .backends import Backend, ChunkGradBuffers, register_backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], head) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits of one chunk and, with a soft-cap, tanh(raw / cap) (needed by the backward)."""
    z = h @ w.T
    if b is not None:
        z = z + b
    return transform(z, head)


def transform(z: torch.Tensor, head) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(cap(raw) / T, tanh(raw / cap) or None)`` of raw logits (with the bias added), for the
    ``head``'s soft-cap and temperature."""
    t = None
    if head.softcap is not None:
        t = torch.tanh(z / head.softcap)
        z = t * head.softcap
    if head.temperature != 1.0:
        z = z * (1.0 / head.temperature)  # times the rounded 1/T, as every native backend: the same z bits
    return z, t


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            head, return_entropy: bool = False):
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    logp = torch.empty(n, dtype=cdt, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if return_entropy else None
    step = chunk_sizes.torch_rows(weight.shape[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        z, _ = _logits(hidden[s:e].to(cdt), w, b, head)
        logp[s:e], lse[s:e], ent_c = _stats(z, labels[s:e], return_entropy)
        if ent is not None:
            ent[s:e] = ent_c
    return logp, lse, ent


def _coef(z: torch.Tensor, t: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
          entropy: Optional[torch.Tensor], g: torch.Tensor, k: torch.Tensor, e: Optional[torch.Tensor],
          temperature: float) -> torch.Tensor:
    """``dL/draw [n, V]`` of one chunk from its logits ``z`` (and ``t = tanh(raw / cap)``)."""
    cdt = z.dtype
    lse_c = lse[:, None].to(cdt)
    p = torch.exp(z - lse_c)
    g = g[:, None].to(cdt)
    coef = (k[:, None].to(cdt) - g) * p
    if e is not None:
        mean_z = lse_c - entropy[:, None].to(cdt)
        # a masked logit (z = -inf, p = 0) adds 0, not 0 * -inf
        coef = coef - e[:, None].to(cdt) * p * torch.where(p > 0, z - mean_z, torch.zeros((), dtype=cdt, device=z.device))
    coef.scatter_add_(1, labels[:, None], g)
    if temperature != 1.0:
        coef = coef * (1.0 / temperature)
    if t is not None:
        coef = coef * (1 - t * t)
    return coef


def _stats(z: torch.Tensor, labels: torch.Tensor, return_entropy: bool):
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, labels[:, None]).squeeze(1) - lse
    return logp, lse, (entropy(z) if return_entropy else None)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(z)`` over the last dim as the native backends compute it:
    ``log S - A / S`` with ``S = sum e^d``, ``A = sum e^d d``, ``d = z - max z`` (exact shifts), not
    ``lse - sum p z``, whose two terms of size ``|z|`` cancel to an absolute error of ``eps |z|``.
    A masked logit (``z = -inf``) adds exact zeros; differentiable (the shift is a constant)."""
    m = z.detach().amax(dim=-1, keepdim=True)
    d = z - torch.where(torch.isfinite(m), m, torch.zeros((), dtype=z.dtype, device=z.device))
    e = torch.exp(d)
    big_s = e.sum(-1)
    big_a = (e * torch.where(e > 0, d, torch.zeros((), dtype=z.dtype, device=z.device))).sum(-1)
    return torch.log(big_s) - big_a / big_s


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, head):
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    grad_h = torch.empty(hidden.shape, dtype=cdt, device=hidden.device)
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    grad_b = None if bias is None else torch.zeros(bias.shape, dtype=cdt, device=bias.device)
    step = chunk_sizes.torch_rows(weight.shape[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cdt)
        z, t = _logits(h, w, b, head)
        coef = _coef(z, t, labels[s:e], lse[s:e], None if entropy is None else entropy[s:e], grad_logp[s:e],
                     grad_lse[s:e], None if grad_entropy is None else grad_entropy[s:e], head.temperature)
        grad_h[s:e] = coef @ w
        grad_w.addmm_(coef.T, h)
        if grad_b is not None:
            grad_b += coef.sum(0)
    return grad_h, grad_w, grad_b


class ChunkKernels(ChunkGradBuffers):
    """One-pass chunk kernels of the torch backend (the reference twin of the native ones; see
    :mod:`fdiv_kernels.kernels.backends`): the chunk's fp32 logits are kept between ``stats`` and
    ``grads``."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool) -> None:
        self.dtype = compute_dtype(weight.dtype)
        self.w = weight.to(self.dtype)
        self.b = None if bias is None else bias.to(self.dtype)
        self.head, self.return_entropy = head, return_entropy
        self.need_h = need_h
        self.grad_w = torch.empty(weight.shape, dtype=self.dtype, device=weight.device) if need_w else None
        self.grad_b = torch.empty(bias.shape, dtype=self.dtype, device=bias.device) if need_b else None
        self._kept = None

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        z, t = _logits(h.to(self.dtype), self.w, self.b, self.head)
        self._kept = (z, t)
        return _stats(z, y, self.return_entropy)

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        z, t = self._kept
        self._kept = None
        coef = _coef(z, t, y, lse, ent, g, k, e, self.head.temperature)
        beta = self._accumulate_beta(beta)
        if self.grad_w is not None:
            self.grad_w.addmm_(coef.T, h.to(self.dtype), beta=beta, alpha=alpha)
        if self.grad_b is not None:
            if beta:
                self.grad_b.mul_(beta).add_(coef.sum(0), alpha=alpha)
            else:
                torch.mul(coef.sum(0), alpha, out=self.grad_b)
        return coef @ self.w if self.need_h else None



register_backend(Backend(
    name="torch",
    forward=forward,
    backward=backward,
    device_types=("cpu", "cuda"),
    is_available=lambda: (True, ""),
    priority=0,
    single_pass=ChunkKernels,
    chunk_tokens=chunk_sizes.torch_chunk_tokens,
))

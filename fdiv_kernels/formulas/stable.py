"""Stable elementwise building blocks and their derivatives (every function here is finite for
every finite input, and so is its derivative).

:func:`apply_elementwise` evaluates ``fn(u)`` with the hand-written derivative ``dfn`` in the
backward, so that no ``inf * 0`` can appear in a backward pass; the same ``dfn`` gives the
closed-form coefficients of the fused kernels (:mod:`fdiv_kernels.specs`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

#: below this, ``log(softplus(u)) = u - exp(u)/2`` to within float64 precision of the terms kept
SOFTPLUS_SMALL = -15.0


def log_softplus(u: torch.Tensor) -> torch.Tensor:
    """``log(softplus(u)) = log(log1p(exp(u)))``, finite for every finite ``u``."""
    small = u < SOFTPLUS_SMALL
    safe = torch.where(small, torch.zeros_like(u), u)
    return torch.where(small, u - 0.5 * torch.exp(torch.clamp(u, max=SOFTPLUS_SMALL)),
                       torch.log(F.softplus(safe)))


def dlog_softplus(u: torch.Tensor) -> torch.Tensor:
    """``d/du log(softplus(u)) = sigmoid(u) / softplus(u)``, in (0, 1]."""
    small = u < SOFTPLUS_SMALL
    safe = torch.where(small, torch.zeros_like(u), u)
    return torch.where(small, 1.0 - 0.5 * torch.exp(torch.clamp(u, max=SOFTPLUS_SMALL)),
                       torch.sigmoid(safe) / F.softplus(safe))


def exp_linear_tail(x: torch.Tensor, knee: float) -> torch.Tensor:
    """``exp(x)`` for ``x <= knee``, continued linearly above (value and slope matched, C1):
    ``exp(knee) (1 + x - knee)``. Finite for every finite ``x``; ``-inf`` gives 0 with a zero
    gradient (no branch of the ``where`` sees an ``inf * 0``)."""
    k = torch.full_like(x, knee)
    return torch.where(x <= knee, torch.exp(torch.minimum(x, k)), math.exp(knee) * (1 + (torch.maximum(x, k) - knee)))


def dexp_linear_tail(x: torch.Tensor, knee: float) -> torch.Tensor:
    """Derivative of :func:`exp_linear_tail`: ``exp(min(x, knee))``."""
    return torch.exp(torch.minimum(x, torch.full_like(x, knee)))


def exp_log_tail(x: torch.Tensor, knee: float) -> torch.Tensor:
    """``exp(x)`` for ``x <= knee``, continued logarithmically above (C1):
    ``exp(knee) (1 + log1p(x - knee))``, at most ``exp(knee) * 90`` for any float32 ``x``."""
    k = torch.full_like(x, knee)
    return torch.where(x <= knee, torch.exp(torch.minimum(x, k)),
                       math.exp(knee) * (1 + torch.log1p(torch.maximum(x, k) - knee)))


def dexp_log_tail(x: torch.Tensor, knee: float) -> torch.Tensor:
    """Derivative of :func:`exp_log_tail`: ``exp(x)`` up to the knee, ``exp(knee) / (1 + x - knee)`` above."""
    k = torch.full_like(x, knee)
    return torch.where(x <= knee, torch.exp(torch.minimum(x, k)), math.exp(knee) / (1 + (torch.maximum(x, k) - knee)))


class _Elementwise(torch.autograd.Function):
    """``y = fn(u)`` with the derivative ``dfn`` supplied by hand (finite wherever ``fn`` is)."""

    @staticmethod
    def forward(ctx, u, fn, dfn):
        ctx.save_for_backward(u)
        ctx.dfn = dfn
        return fn(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * ctx.dfn(u), None, None


def apply_elementwise(fn: Callable[[torch.Tensor], torch.Tensor], dfn: Callable[[torch.Tensor], torch.Tensor],
                      u: torch.Tensor) -> torch.Tensor:
    """``fn(u)`` elementwise, differentiated by ``dfn`` (never by autograd through ``fn``)."""
    return _Elementwise.apply(u, fn, dfn)

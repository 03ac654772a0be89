"""Primal per-token f-divergence losses: ``D_f(onehot(y) || p)`` as a function of ``l = log p_y``.

For a one-hot target and model distribution ``p``,

    D_f(onehot(y) || p) = sum_x p_x f(1[x=y] / p_x) = p_y f(1/p_y) + (1 - p_y) f(0),

a function of ``p_y`` alone (``f(0)`` must be finite; Neyman and reverse KL have ``f(0) = inf``
and no primal form). Closed forms, with ``p = p_y = exp(l)``:

| name | f(x) | D_f(onehot(y) \\|\\| p) | as p -> 0 |
|---|---|---|---|
| kl | x log x | -l (the NLL) | unbounded, linear in l |
| tv | abs(x-1)/2 | 1 - p = -expm1(l) | bounded |
| pearson | (x-1)^2 | 1/p - 1 = expm1(-l) | unbounded, exp(-l) |
| squared_hellinger | (sqrt(x)-1)^2 | 2 (1 - sqrt p) = -2 expm1(l/2) | bounded |
| js | x log x - (1+x) log((1+x)/2) | p l - (1+p) log1p(p) + 2 log 2 | bounded |
| alpha | (x^a - 1 - a(x-1)) / (a(a-1)) | expm1((1-a) l) / (a(a-1)) | unbounded for a > 1 |

(``alpha`` is Amari's alpha family: a -> 1 gives KL, a = 2 half Pearson, a = 1/2 twice squared
Hellinger. Roulet et al., arXiv 2501.18537, report a = 1.5 best for SFT.)

Forms that grow like ``exp(c * (-l))`` (Pearson, alpha > 1) overflow fp32 once ``-l`` passes
``88/c``. They are evaluated exactly for ``l >= L0 = log(1e-8)`` (``p_y >= 1e-8``) and continued
linearly in ``l`` below (value and slope matched at ``L0``): finite values, gradients bounded by
the slope at ``L0``. Above ``L0`` they equal the float64 formula.

Each :class:`PrimalLoss` carries its closed-form derivative ``dD/dl`` (:attr:`PrimalLoss.grad`),
which the fused kernels use as the per-token coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch

from .stable import apply_elementwise

__all__ = ["L0", "PRIMAL_LOSSES", "PrimalLoss"]

LOG2 = math.log(2.0)
L0 = math.log(1e-8)


@dataclass(frozen=True)
class PrimalLoss:
    """A primal per-token loss ``D(l, alpha)`` of ``l = log p_y`` and its derivative ``dD/dl``."""

    name: str
    formula: str
    bounded: bool
    value: Callable[[torch.Tensor, float], torch.Tensor]
    grad: Callable[[torch.Tensor, float], torch.Tensor]

    def __reduce__(self):
        """A built-in entry pickles by name (its functions are lambdas)."""
        return (_builtin, (self.name,)) if PRIMAL_LOSSES.get(self.name) is self else super().__reduce__()

    def __call__(self, logp: torch.Tensor, alpha: float = 1.5) -> torch.Tensor:
        return apply_elementwise(lambda lp: self.value(lp, alpha), lambda lp: self.grad(lp, alpha), logp)


def _builtin(name: str) -> PrimalLoss:
    return PRIMAL_LOSSES[name]


def _exp_tail(c: float):
    """``(expm1(-c lp), d/dlp)`` of ``lp = log p_y``: exact for lp >= L0 and linear in lp below it."""

    def value(lp):
        lc = torch.clamp(lp, min=L0)
        exact = torch.expm1(-c * lc)
        slope = -c * math.exp(-c * L0)
        return torch.where(lp >= L0, exact, exact + slope * (lp - L0))

    def grad(lp):
        lc = torch.clamp(lp, min=L0)
        return -c * torch.exp(-c * lc)

    return value, grad


_pearson_v, _pearson_g = _exp_tail(1.0)


def _alpha_value(lp, a):
    if abs(a - 1.0) < 1e-6:
        return -lp
    if a > 1:
        v, _ = _exp_tail(a - 1.0)
        return v(lp) / (a * (a - 1))
    return torch.expm1((1 - a) * lp) / (a * (a - 1))


def _alpha_grad(lp, a):
    if abs(a - 1.0) < 1e-6:
        return -torch.ones_like(lp)
    if a > 1:
        _, g = _exp_tail(a - 1.0)
        return g(lp) / (a * (a - 1))
    return (1 - a) * torch.exp((1 - a) * lp) / (a * (a - 1))


def _js_value(lp, a):
    p = torch.exp(lp)
    return p * lp - (1 + p) * torch.log1p(p) + 2 * LOG2


def _js_grad(lp, a):
    p = torch.exp(lp)
    return p * (lp - torch.log1p(p))


_ENTRIES = [
    PrimalLoss("kl", "-log p_y", False, lambda lp, a: -lp, lambda lp, a: -torch.ones_like(lp)),
    PrimalLoss("tv", "1 - p_y", True, lambda lp, a: -torch.expm1(lp), lambda lp, a: -torch.exp(lp)),
    PrimalLoss("pearson", "1/p_y - 1", False, lambda lp, a: _pearson_v(lp), lambda lp, a: _pearson_g(lp)),
    PrimalLoss("squared_hellinger", "2 (1 - sqrt(p_y))", True, lambda lp, a: -2 * torch.expm1(0.5 * lp),
               lambda lp, a: -torch.exp(0.5 * lp)),
    PrimalLoss("js", "p log p - (1+p) log(1+p) + 2 log 2", True, _js_value, _js_grad),
    PrimalLoss("alpha", "(p_y^(1-a) - 1) / (a (a-1))", False, _alpha_value, _alpha_grad),
]

#: the closed forms, by the registry name of their divergence (:mod:`.divergences` attaches them)
PRIMAL_LOSSES: Dict[str, PrimalLoss] = {p.name: p for p in _ENTRIES}

"""Kendall's tau-b and rank agreement between models' value estimates (paper Sec. 4.4)."""

from __future__ import annotations

import itertools
from typing import Dict, Mapping, Sequence


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (ties handled; O(n^2), n is small here).

    ``tau_b = (C - D) / sqrt((C + D + Tx) (C + D + Ty))`` with C/D the concordant/discordant pairs
    and Tx/Ty the pairs tied only in x/only in y. Returns 0.0 when either sequence is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs sequences of equal length, got {len(x)} and {len(y)}")
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif (dx > 0) == (dy > 0):
            c += 1
        else:
            d += 1
    denom = ((c + d + tx) * (c + d + ty)) ** 0.5
    return (c - d) / denom if denom else 0.0


def rank_agreement(values: Mapping[str, Sequence[float]]) -> Dict[str, Dict[str, float]]:
    """Pairwise Kendall tau between named value (or outcome) sequences over the same states.

    ``values``: ``{"model_a": [v(s_1), ...], "model_b": [...], "outcome": [...]}`` ->
    ``{"model_a": {"model_b": tau, ...}, ...}`` (symmetric, 1.0 on the diagonal).
    """
    names = list(values)
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise ValueError(f"every sequence must cover the same states; lengths {sorted(lengths)}")
    return {a: {b: (1.0 if a == b else kendall_tau(values[a], values[b])) for b in names} for a in names}

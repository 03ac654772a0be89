"""Small statistics for the mini-lab's verdicts: seed spreads, standard errors, rank correlations.

Every verdict compares an estimate with its sampling error: a difference of seed means with the
Welch standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)``, a regression slope with its OLS standard error,
a rank correlation with its large-sample standard error. "Reproduced" means the effect has the
paper's sign and exceeds ``Z`` standard errors; "not reproduced" means the opposite sign beyond
``Z`` standard errors; anything in between is "inconclusive".
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Sequence, Tuple

Z = 2.0  # about a 95% two-sided interval


def mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` over seeds (``-`` when empty)."""
    m, s = mean_sd(xs)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def diff(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """``(mean(a) - mean(b), Welch standard error)``."""
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    return ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def verdict(effect: float, se: float, *, expected_sign: int = 1, floor: float = 0.0) -> str:
    """reproduced / not reproduced / inconclusive for an effect the paper predicts has sign
    ``expected_sign``. ``floor``: a minimum standard error (e.g. the binomial error of a fixed
    evaluation set), so that seeds that happen to agree do not make a tiny difference decisive."""
    se = max(se, floor)
    z = effect * expected_sign / se if se > 0 else math.copysign(math.inf, effect * expected_sign or 1)
    if z > Z:
        return "reproduced"
    if z < -Z:
        return "not reproduced"
    return "inconclusive"


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` prompts."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def slope(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """OLS slope of ``ys`` on ``xs`` and its standard error."""
    n = len(xs)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / max(n - 2, 1) / sxx)
    return b, se


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Kendall's tau-b of two equally long sequences and its standard error under independence,
    ``sqrt(2(2n+5) / (9n(n-1)))``. O(n^2) with torch (n up to a few thousand)."""
    import torch

    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    n = len(a)
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    iu = torch.triu_indices(n, n, 1)
    sa, sb = da[iu[0], iu[1]], db[iu[0], iu[1]]
    s = float((sa * sb).sum())
    ta, tb = float((sa != 0).sum()), float((sb != 0).sum())
    tau = s / math.sqrt(ta * tb) if ta and tb else float("nan")
    return tau, math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def spearman(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Spearman's rho and its standard error ``1 / sqrt(n - 3)`` on the Fisher-z scale (returned
    as the width of rho's interval near rho: ``(1 - rho^2) / sqrt(n - 3)``)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    rho = num / den if den else float("nan")
    n = len(rx)
    return rho, (1 - rho ** 2) / math.sqrt(max(n - 3, 1))


def first_settled(steps: Sequence[int], values: Sequence[float], *, band: float = 0.1, window: int = 5) -> Dict:
    """When a noisy curve settles: ``settled_step``, the first step after which its moving average
    (``window`` points) stays within ``band`` x (total change) of the final level (mean of the last
    10%); ``reached_step``, the first step where the moving average has covered ``1 - band`` of the
    change from the start (mean of the first ``window`` points)."""
    n = len(values)
    if n < 2 * window:
        return {"settled_step": None, "rise": float("nan")}
    smooth = [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(n)]
    tail = max(window, n // 10)
    final = statistics.mean(values[-tail:])
    start = statistics.mean(values[:window])
    tol = band * abs(final - start)
    settled = next((steps[i] for i in range(n) if all(abs(v - final) <= tol for v in smooth[i:])), None)
    target = start + (1 - band) * (final - start)
    reached = next((steps[i] for i in range(n) if (smooth[i] - target) * (final - start) >= 0), None)
    return {"settled_step": settled, "reached_step": reached, "rise": final - start, "start": start, "final": final}


__all__ = ["Z", "binomial_se", "diff", "first_settled", "fmt", "kendall_tau", "mean_sd", "slope", "spearman",
           "verdict"]


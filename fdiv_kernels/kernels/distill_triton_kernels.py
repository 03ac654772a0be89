"""The Triton distillation epilogue (launch wrapper: :mod:`.distill_triton`; imported on first use).

One program per row of a chunk's float32 logits (``zt``, ``zs`` ``[n, V]``, bias added), three
passes over the row in blocks of ``BLOCK`` columns (the math: :func:`fdiv_kernels.formulas.distill.chunk_epilogue`):

1. online log-sum-exps per lane of ``zt / T``, ``zs / T`` (and ``zs`` for the hard label at
   ``T != 1``), merged at the end;
2. per entry ``lt``, ``ls``, the form's ``term = p_s f(r)`` and ``pa = p_s a(r)`` (``FORM``, the
   numbers of :data:`fdiv_kernels.formulas.distill.FORM_IDS`), the row sums ``div`` and ``A``;
   ``pa`` is stored over ``zt`` (spent);
3. (``WITH_COEF``) ``coef = s_d (pa - p_s A) + s_h (softmax(zs) - onehot(y))`` over ``zs``, with
   ``s_d = wt kappa / T``, ``s_h = wt hard_weight``; at the student's argmax ``pa_m S' - p_m A'``
   (:func:`fdiv_kernels.formulas.distill.dominant_safe`).

A ``-inf`` entry takes the form's limits (``f(0)``, ``lim f(r)/r``, ``a(0)``; infinite ones as the
``*_INF`` flags), no branch sees an ``inf - inf``; a row whose vocabulary is masked in either model
gives NaN (the data check explains it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import INTERPRET

DISTILL_BLOCK = 32 if INTERPRET else 1024
"""Columns per step of the epilogue's row loops."""

NEG_INF = float("-inf")


@triton.jit
def _expm1(x):
    """``e^x - 1``: Taylor to x^9 for ``|x| < 1/2``, ``e^x - 1`` above."""
    s = x * (1.0 + x * (0.5 + x * (1.6666667e-1 + x * (4.1666668e-2 + x * (8.3333338e-3 + x * (1.3888889e-3 + x * (
        1.9841270e-4 + x * (2.4801588e-5 + x * 2.7557319e-6))))))))
    xs = tl.where(tl.abs(x) < 0.5, 0.0, x)
    return tl.where(tl.abs(x) < 0.5, s, tl.exp(xs) - 1.0)


@triton.jit
def _log1p_unit(e):
    """``log(1 + e)`` for ``e`` in ``[0, 1]``, the rounding of ``1 + e`` corrected."""
    u = 1.0 + e
    return tl.log(u) - ((u - 1.0) - e) / u


@triton.jit
def _core(lt, ls, pt, ps, c, log_c, log_1mc, ac, swap, FORM: tl.constexpr):
    """``(p_s f(r), p_s a(r))`` at finite ``lt``, ``ls`` (``pt = e^lt``, ``ps = e^ls``)."""
    lr = lt - ls
    if FORM == 0:  # kl
        term = pt * lr
        pa = -pt
    elif FORM == 1:  # reverse_kl
        term = -ps * lr
        pa = term
    elif FORM == 2:  # js
        u = lt + log_c
        w = ls + log_1mc
        lm = tl.maximum(u, w) + _log1p_unit(tl.exp(-tl.abs(u - w)))
        term = c * pt * (lt - lm) + (1.0 - c) * ps * (ls - lm)
        pa = -(1.0 - c) * ps * (lm - ls)
    elif FORM == 3:  # tv
        term = 0.5 * tl.abs(pt - ps)
        pa = 0.5 * ps * tl.where(lr < 0.0, 1.0, tl.where(lr > 0.0, -1.0, 0.0))
    elif FORM == 4:  # squared_hellinger
        e = _expm1(-0.5 * tl.abs(lr))
        term = tl.where(lr > 0.0, pt, ps) * e * e
        pa = -tl.exp(0.5 * (lt + ls))
    elif FORM == 5:  # pearson
        e = _expm1(-tl.abs(lr))
        term = tl.exp(ls + 2.0 * tl.maximum(lr, 0.0)) * e * e
        pa = -tl.exp(2.0 * lt - ls)
    elif FORM == 6:  # neyman
        e = _expm1(-tl.abs(lr))
        term = tl.exp(lt + 2.0 * tl.maximum(-lr, 0.0)) * e * e
        pa = 2.0 * tl.exp(2.0 * ls - lt)
    else:  # alpha (the term in the dual variables when swapped: ac = 1 - a)
        wl = 1.0 - swap
        a1 = wl * lt + swap * ls
        p1 = wl * pt + swap * ps
        q1 = wl * ps + swap * pt
        l1 = (wl - swap) * lr
        d = ac - 1.0
        k = p1 * l1 - p1 + q1
        x = d * l1
        small = x <= 1.0
        xs = tl.where(small, x, 0.0)
        g = tl.where(small, p1 * (_expm1(xs) - xs), tl.exp(a1 + tl.where(small, 0.0, x)) - p1 * (1.0 + x))
        term = tl.where(d == 0.0, k, (g / tl.where(d == 0.0, 1.0, d) + k) / ac)
        y = c * lr
        ys = tl.where(y <= 1.0, y, 0.0)
        em = tl.where(y <= 1.0, ps * _expm1(ys), tl.exp(ls + tl.where(y <= 1.0, 0.0, y)) - ps)
        pa = tl.where(c == 0.0, -ps * lr, -em / tl.where(c == 0.0, 1.0, c))
    return term, pa


@triton.jit
def _limit(p, k, K_INF: tl.constexpr):
    """``p k`` with the limits' convention: ``inf`` when ``k`` is (``K_INF``)."""
    if K_INF:
        return p * 0.0 + float("inf")
    return p * k


@triton.jit
def _online(m, s, z):
    """One block of an online log-sum-exp per lane (``-inf`` columns add exact zeros)."""
    m_new = tl.maximum(m, z)
    safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    return m_new, tl.exp(m - safe) * s + tl.exp(z - safe)


@triton.jit
def _finish(m, s):
    big = tl.max(m, axis=0)
    safe = tl.where(big == NEG_INF, 0.0, big)
    return safe + tl.log(tl.sum(tl.exp(m - safe) * s, axis=0)), big


@triton.jit
def distill_epilogue_kernel(zt_ptr, zs_ptr, y_ptr, wt_ptr, div_ptr, nll_ptr, V, inv_t, div_scale, hard_weight,
                            c, log_c, log_1mc, ac, swap, f0, f_inf, a0,
                            FORM: tl.constexpr, F0_INF: tl.constexpr, FINF_INF: tl.constexpr, A0_INF: tl.constexpr,
                            HARD: tl.constexpr, RAW: tl.constexpr, WITH_COEF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    mt = tl.full((BLOCK,), NEG_INF, tl.float32)
    ms = tl.full((BLOCK,), NEG_INF, tl.float32)
    mr = tl.full((BLOCK,), NEG_INF, tl.float32)
    st = tl.zeros((BLOCK,), tl.float32)
    ss = tl.zeros((BLOCK,), tl.float32)
    sr = tl.zeros((BLOCK,), tl.float32)
    arg = tl.zeros((BLOCK,), tl.int64)  # per lane, the first column of its max of zs
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        cmask = cols < V
        zt = tl.load(zt_ptr + base + cols, mask=cmask, other=NEG_INF)
        zs = tl.load(zs_ptr + base + cols, mask=cmask, other=NEG_INF)
        arg = tl.where(zs * inv_t > ms, cols, arg)
        mt, st = _online(mt, st, zt * inv_t)
        ms, ss = _online(ms, ss, zs * inv_t)
        if RAW:
            mr, sr = _online(mr, sr, zs)
    lse_t, big_t = _finish(mt, st)
    lse_s, big_s = _finish(ms, ss)
    im = tl.min(tl.where(ms == big_s, arg, V), axis=0)  # the student's argmax (its first)
    lse_r = lse_s
    if RAW:
        lse_r, _ = _finish(mr, sr)
    bad = (big_t == NEG_INF) | (big_s == NEG_INF)  # a whole vocabulary masked: undefined
    y = tl.load(y_ptr + row)
    nll = 0.0
    if HARD:
        nll = lse_r - tl.load(zs_ptr + base + y)
    dsum = tl.zeros((BLOCK,), tl.float32)
    asum = tl.zeros((BLOCK,), tl.float32)
    rest_s = tl.zeros((BLOCK,), tl.float32)
    rest_a = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        cmask = cols < V
        lt = tl.load(zt_ptr + base + cols, mask=cmask, other=NEG_INF) * inv_t - lse_t
        ls = tl.load(zs_ptr + base + cols, mask=cmask, other=NEG_INF) * inv_t - lse_s
        t0 = lt == NEG_INF
        s0 = ls == NEG_INF
        ltf = tl.where(t0, 0.0, lt)
        lsf = tl.where(s0, 0.0, ls)
        pt = tl.where(t0, 0.0, tl.exp(ltf))
        ps = tl.where(s0, 0.0, tl.exp(lsf))
        term, pa = _core(ltf, lsf, pt, ps, c, log_c, log_1mc, ac, swap, FORM)
        term = tl.where(t0, tl.where(s0, 0.0, _limit(ps, f0, F0_INF)), tl.where(s0, _limit(pt, f_inf, FINF_INF), term))
        pa = tl.where(t0, tl.where(s0, 0.0, _limit(ps, a0, A0_INF)), tl.where(s0, 0.0, pa))
        term = tl.where(cmask, term, 0.0)
        pa = tl.where(cmask, pa, 0.0)
        dsum += term
        asum += pa
        rest = cols != im
        rest_s += tl.where(rest, ps, 0.0)
        rest_a += tl.where(rest, pa, 0.0)
        if WITH_COEF:
            tl.store(zt_ptr + base + cols, pa, mask=cmask)  # the teacher's logits are spent: keep pa
    div = tl.sum(dsum, axis=0)
    tl.store(div_ptr + row, tl.where(bad, float("nan"), div))
    tl.store(nll_ptr + row, tl.where(bad, float("nan"), nll))
    if WITH_COEF:
        big_a = tl.sum(asum, axis=0)
        w = tl.load(wt_ptr + row)
        sd = w * div_scale
        sh = w * hard_weight
        tl.debug_barrier()  # every store of pa before its loads below
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            cmask = cols < V
            zs = tl.load(zs_ptr + base + cols, mask=cmask, other=NEG_INF)
            pa = tl.load(zt_ptr + base + cols, mask=cmask, other=0.0)
            ls = zs * inv_t - lse_s
            ps = tl.where(ls == NEG_INF, 0.0, tl.exp(tl.where(ls == NEG_INF, 0.0, ls)))
            # at the argmax pa_m S' - p_m A' (the sums without it), not pa_m - p_m A: no cancellation
            # (formulas/distill.py, dominant_safe)
            coef = sd * tl.where(cols == im, pa * tl.sum(rest_s, axis=0) - ps * tl.sum(rest_a, axis=0),
                                 pa - ps * big_a)
            if HARD:
                zr = zs - lse_r
                pr = tl.where(zr == NEG_INF, 0.0, tl.exp(tl.where(zr == NEG_INF, 0.0, zr)))
                coef += sh * (pr - tl.where(cols == y, 1.0, 0.0))
            coef = tl.where(bad, 0.0, coef)
            tl.store(zs_ptr + base + cols, coef, mask=cmask)

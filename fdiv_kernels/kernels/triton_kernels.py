"""Triton kernels of the ``"triton"`` token_stats backend (launch wrappers: ``triton_backend.py``).

Notation (one token row n, vocabulary column v; see ``docs/triton.md``)::

    raw[n, v] = h[n, :] . W[v, :] (+ b[v])                  fp32 accumulation (tl.dot)
    z[n, v]   = cap(raw) / T,   cap(x) = c * tanh(x / c)     (identity without a soft-cap)
    lse[n]    = logsumexp_v z[n, v]
    logp[n]   = z[n, y[n]] - lse[n]
    ent[n]    = lse[n] - sum_v p[n, v] z[n, v],   p = exp(z - lse)
    dL/dz     = g * onehot(y) + (k - g) * p - e * p * (z - (lse - ent))
    dL/draw   = dL/dz / T * (1 - tanh(raw / c)^2)           (last factor only with a soft-cap)

Kernels (one job each, none materialises an ``[N, V]`` tensor):

* :func:`token_stats_fwd_kernel`: grid (token blocks, vocabulary splits); per split it keeps an
  online (max, sum, p*z-sum) over vocabulary tiles and the label logit, and writes 4 partial
  statistics per row. ``triton_backend.forward`` merges the splits in O(splits * N).
* :func:`token_stats_bwd_hidden_kernel`: grid over token blocks, loop over vocabulary tiles:
  ``grad_hidden[rows] += dL/draw[rows, tile] @ W[tile]``.
* :func:`token_stats_bwd_weight_kernel`: grid over vocabulary blocks, loop over token tiles:
  ``grad_weight[cols] += dL/draw[:, cols]^T @ h`` and ``grad_bias[cols] += sum_n dL/draw``.
* :func:`token_stats_bwd_fused_atomic_kernel` (opt-in, ``deterministic=False``): grid over
  (token, vocabulary) tiles, one logit recompute, all three gradients by fp32 atomic adds.

The two deterministic backward kernels write disjoint rows of their outputs and accumulate in a fixed order,
so the backward is deterministic without atomics. Their fp32 accumulators live in the output
buffers (each program owns its rows; a CTA barrier orders the read-modify-write between
vocabulary/token tiles), because an ``[BLOCK, H]`` register accumulator does not fit for large H.

Interpreter mode (``TRITON_INTERPRET=1``) is fixed when this module is imported: the autotune
lists shrink to one small config and ``DOT_FP32`` upcasts 16-bit dot operands to fp32 (the
interpreter's numpy ``tl.dot`` mishandles bfloat16). bf16 x bf16 products are exact in fp32,
so the upcast changes nothing but the summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton import knobs as _knobs  # triton >= 3.4 (the supported range starts at 3.6)

from .. import knobs as package_knobs

INTERPRET: bool = bool(_knobs.runtime.interpret)
"""Whether these kernels were built for the Triton interpreter (read once, at import)."""


def _interpreter_index_compat() -> bool:
    """Let the interpreter of triton < 3.9 take ``range()`` bounds that are runtime values.

    The interpreter turns a scalar into a one-element 1-D numpy array and converts it to a
    Python int for ``range()`` with ``int(array)``, which NumPy >= 2.4 rejects ("only
    0-dimensional arrays can be converted to Python scalars": every loop over H or a split
    fails). triton 3.9 converts with ``int(array.squeeze())``; this installs that conversion
    for older interpreters. Only under ``TRITON_INTERPRET=1``; compiled kernels are untouched.
    Returns whether the shim was installed.
    """
    if not INTERPRET or tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9):
        return False
    from triton.runtime import interpreter

    patch_lang = interpreter._patch_lang
    if getattr(patch_lang, "_fdiv_index_compat", False):
        return True

    def _patch_lang_with_index(fn):
        scope = patch_lang(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        return scope

    _patch_lang_with_index._fdiv_index_compat = True
    interpreter._patch_lang = _patch_lang_with_index
    return True


INTERPRETER_INDEX_COMPAT = _interpreter_index_compat()

# --------------------------------------------------------------------------------------------
# Autotune lists, (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages[, knob]) per input element
# size; the optional 6th entry is the kernel's KNOB (default 1): STAGE for the deterministic
# backward kernels (sub-tiles per read-modify-write of the output), GROUP_N for the atomics
# kernel (token blocks per group of the tile order). H100: 228 KiB shared memory, 132 SMs.
# Chosen from sm_90a compiles (registers/spills, see docs/triton.md): 16-bit inputs use
# wgmma-sized tiles; exact fp32 (FMA dots) needs smaller tiles to stay out of local memory (TF32
# dots, allow_tf32, use the same 4-byte list: not tuned yet). The first entry of each list is
# what FDIV_TRITON_AUTOTUNE=first uses (and what tests/test_triton.py compiles for sm_90a).
# --------------------------------------------------------------------------------------------

_FWD = {
    2: [(128, 128, 64, 8, 3), (64, 256, 64, 8, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)],
    4: [(32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (32, 128, 32, 4, 3)],
}
_BWD_H = {
    2: [(64, 128, 64, 8, 3, 2), (64, 64, 64, 8, 3, 4), (64, 128, 64, 8, 3, 1), (64, 128, 64, 4, 3, 1),
        (128, 128, 64, 8, 3, 1), (64, 64, 64, 4, 4, 1), (32, 128, 64, 4, 3, 1)],
    4: [(32, 64, 32, 4, 3, 1), (32, 128, 32, 4, 3, 1), (32, 64, 32, 4, 3, 2)],
}
_BWD_W = {
    2: [(64, 64, 64, 8, 3, 2), (64, 128, 64, 8, 3, 2), (64, 128, 64, 8, 3, 1), (64, 64, 64, 4, 4, 1),
        (128, 64, 64, 4, 3, 1)],
    4: [(32, 64, 32, 4, 3, 1), (64, 32, 32, 4, 3, 1), (32, 128, 32, 4, 3, 1)],
}
_BWD_FUSED = {
    2: [(64, 128, 64, 8, 3, 8), (64, 64, 64, 4, 3, 8), (128, 128, 64, 8, 3, 8), (128, 64, 64, 4, 3, 8),
        (64, 128, 64, 8, 3, 16)],
    4: [(32, 64, 32, 4, 3, 8), (32, 128, 32, 4, 3, 8)],
}
KNOBS = {"token_stats_fwd_kernel": None, "token_stats_bwd_hidden_kernel": "STAGE",
         "token_stats_bwd_weight_kernel": "STAGE", "token_stats_bwd_fused_atomic_kernel": "GROUP_N"}
"""The 6th entry of each kernel's tuples (None: the kernel has no knob)."""
# one small config per kernel: autotuning under the interpreter is too slow; STAGE 2 so that the
# interpreter tests run the staged path (tests/test_triton.py also runs STAGE 1 and 4)
_INTERPRETER = (16, 32, 16, 1, 1, 2)


def _config(bn: int, bv: int, bh: int, warps: int, stages: int, knob_value: int = 1,
            knob: str | None = None) -> triton.Config:
    meta = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}
    if knob:
        meta[knob] = knob_value
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _entry(t: tuple) -> tuple:
    """A list entry with its knob made explicit (6 values)."""
    return tuple(t) + (1,) * (6 - len(t))


AUTOTUNE = package_knobs.get("triton_autotune")
"""The knob ``triton_autotune`` (``FDIV_TRITON_AUTOTUNE``) when this module was executed: ``full``
(default): every config of the lists below is tried; ``first``: only the first config per element
size (every kernel, dtype and flag setting is still compiled, only the tile search is skipped;
``make gpu-check`` uses it to keep compile time in its budget). The backend re-executes this module
when the knob changes (:func:`fdiv_kernels.kernels.triton_backend.kernels_module`)."""


def _no_timing(kernel_call, quantiles):
    """``do_bench`` of the ``first`` mode: the pruned list holds one config, so there is nothing to
    compare; triton < 3.9 would still time it (a dozen runs of the kernel at the full shape)."""
    return [0.0 for _ in quantiles]


def _tuning(by_size, knob=None) -> dict:
    """``triton.autotune`` arguments besides the key: the union of the lists as configs, pruned
    at launch to the list of ``h_ptr``'s element size (and no timing in ``first`` mode)."""
    configs, prune = _configs(by_size, knob)
    return dict(configs=configs, prune_configs_by=prune, **({"do_bench": _no_timing} if AUTOTUNE == "first" else {}))


def _configs(by_size, knob=None):
    """``(configs, prune_configs_by)``: see :func:`_tuning`."""
    if INTERPRET:
        return [_config(*_INTERPRETER, knob=knob)], None
    if AUTOTUNE == "first":
        by_size = {size: lst[:1] for size, lst in by_size.items()}
    by_size = {size: [_entry(t) for t in lst] for size, lst in by_size.items()}
    tuples = list(dict.fromkeys(t for lst in by_size.values() for t in lst))

    def prune(configs, named_args, **kwargs):
        wanted = set(by_size.get(named_args["h_ptr"].element_size(), by_size[4]))
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps,
                                       c.num_stages, c.kwargs.get(knob, 1) if knob else 1) in wanted]
        return kept or configs

    return [_config(*t, knob=knob) for t in tuples], {"early_config_prune": prune}


FWD_TUNING = _tuning(_FWD)
BWD_H_TUNING = _tuning(_BWD_H, "STAGE")
BWD_W_TUNING = _tuning(_BWD_W, "STAGE")
BWD_FUSED_TUNING = _tuning(_BWD_FUSED, "GROUP_N")
# Autotune keys: the shape (N left out: it changes every step and training must not re-tune), the
# dot precision, and every flag that changes the code (bias, soft-cap, entropy, filter), so that a
# tile chosen with the flags off is never reused with them on (where it may spill). triton adds
# the argument dtypes.
FWD_KEY = ["H", "V", "INPUT_PRECISION", "HAS_BIAS", "HAS_SOFTCAP", "WITH_ENTROPY"]
BWD_KEY = FWD_KEY + ["FILTER"]
SPLIT_ALIGN = 32 if INTERPRET else 256
"""Vocabulary splits of the forward are multiples of this (every BLOCK_V divides it)."""


# --------------------------------------------------------------------------------------------
# Shared device functions.
# --------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    """tanh(x): Cephes' odd polynomial for |x| < 0.625 (relative error ~1e-7: the soft-cap
    multiplies tanh(raw / c) by c, so a large ratio c / raw needs relative, not absolute,
    accuracy), ``sign(x) (1 - e) / (1 + e)``, ``e = exp(-2|x|)``, above (no overflow for any x).
    The cpu backend's tanh_f is the same function."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -t, t)
    s = x * x
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
             - 3.33332819422e-1) * s * x + x
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, softcap, inv_temp,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Logit tile ``z[rows, cols] = cap(h[rows] @ W[cols]^T + b[cols]) / T`` in fp32.

    Out-of-range rows/columns give finite values the callers mask. The backward recovers
    ``tanh(raw / c) = z T / c`` from ``z`` (a second tile would cost registers). ``h`` is
    ``[N, H]`` and ``W`` ``[V, H]``, both row-major.
    """
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        ht = tl.load(h_ptr + rows64[:, None] * H + ks[None, :],
                     mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)
        wt = tl.load(w_ptr + cols64[:, None] * H + ks[None, :],
                     mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
        if DOT_FP32:
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(ht, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _tanh(acc / softcap) * softcap
    return acc * inv_temp


@triton.jit
def _grad_raw_tile(z, valid, is_label, lse, mean_z, g, k, e, softcap, inv_temp,
                   HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """``(dL/draw, p)`` for one tile; ``valid`` masks rows >= N and columns >= V to 0.

    dL/dz = g onehot(y) + (k - g) p - e p (z - mean_z), mean_z = lse - ent = E_p[z];
    dL/draw = dL/dz / T, times 1 - t^2 with a soft-cap, t = tanh(raw / c) = z T / c.
    """
    # p <= 1 even where a backward tile's logits round differently from the forward's (another
    # tile shape): the forward's lse bounds them only up to that rounding
    p = tl.where(valid, tl.exp(tl.minimum(z - lse[:, None], 0.0)), 0.0)
    dz = (k - g)[:, None] * p
    if WITH_ENTROPY:
        dz -= e[:, None] * p * tl.where(p > 0.0, z - mean_z[:, None], 0.0)  # a -inf logit adds 0, not 0 * -inf
    dz += tl.where(is_label, g[:, None], 0.0)
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        t = z / (softcap * inv_temp)
        dz = dz * (1.0 - t * t)
    return dz, p


@triton.jit
def _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, col_lo, y, lse, mean_z, g, k, e, N, V, H, softcap, inv_temp,
             filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
             FILTER: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``(dL/draw, keep)`` of the tile rows x ``[col_lo, col_lo + BLOCK_V)``: the logit tile
    recomputed, the fp32 gradient (0 outside [0, N) x [0, V)), and for the filter ``keep`` = 1
    unless max p < filter_eps and no row's label y lies in the tile (always 1 without FILTER).
    The label test is per row (a range test: reducing the 2-D label mask costs spills)."""
    cols = col_lo + tl.arange(0, BLOCK_V)
    cmask = cols < V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, softcap, inv_temp,
                    HAS_BIAS, HAS_SOFTCAP, DOT_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    valid = rmask[:, None] & cmask[None, :]
    is_label = (cols[None, :] == y[:, None]) & valid
    dz, p = _grad_raw_tile(z, valid, is_label, lse, mean_z, g, k, e, softcap, inv_temp, HAS_SOFTCAP, WITH_ENTROPY)
    if FILTER:
        mass = tl.max(tl.max(p, axis=1), axis=0)
        has_label = tl.max(((y >= col_lo) & (y < col_lo + BLOCK_V) & rmask).to(tl.int32), axis=0)
        keep = ((mass >= filter_eps) | (has_label > 0)).to(tl.int32)
    else:
        keep = 1
    return dz, keep


@triton.jit
def _cat_cols(a, b):
    """``[R, C]`` and ``[R, C]`` -> ``[R, 2C]``, a's columns first (join, then interleave back)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _extent(H, keep, FILTER: tl.constexpr):
    """Loop end over H for the gradient GEMM: H, or 0 for a filtered (skipped) span. (A zero-trip
    loop instead of a branch around it: the branch costs registers.)"""
    if FILTER:
        return tl.where(keep > 0, H, 0)
    else:
        return H


@triton.jit
def _load_row_grads(rows, rmask, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, WITH_ENTROPY: tl.constexpr):
    """Per-row backward inputs: labels, lse, E_p[z] = lse - ent, and g, k, e (0 outside [0, N))."""
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    k = tl.load(k_ptr + rows, mask=rmask, other=0.0)
    if WITH_ENTROPY:
        mean_z = lse - tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        e = tl.load(e_ptr + rows, mask=rmask, other=0.0)
    else:
        mean_z = lse
        e = g
    return y, lse, mean_z, g, k, e


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------

@triton.autotune(key=FWD_KEY, **FWD_TUNING)
@triton.jit
def token_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, a_ptr, zy_ptr,
    N, V, H, split_size, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partial log-sum-exp statistics of one token block over one vocabulary split.

    Program (i, s) covers rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` and columns
    ``[s*split_size, min(V, (s+1)*split_size))``, tile by tile, with the online update
    (m: running max, S = sum exp(z - m), A = sum exp(z - m) (z - m)):

        m' = max(m, max_tile z);  r = exp(m - m')
        S' = r S + sum_tile exp(z - m')
        A' = r (A + (m - m') S) + sum_tile exp(z - m') (z - m')

    and ``zy = z[n, y[n]]`` when the label falls in the split (0 otherwise). Writes
    ``m, S, A, zy`` to ``[splits, N]`` fp32 buffers at ``s * N + n`` (A only WITH_ENTROPY).
    Merged over splits: ``lse = m + log S`` and ``ent = log S - A / S`` (see triton_backend).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    v_lo = pid_s * split_size
    v_hi = tl.minimum(v_lo + split_size, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, softcap, inv_temp,
                        HAS_BIAS, HAS_SOFTCAP, DOT_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(cmask[None, :], z, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # -inf while every logit so far is -inf (a vocabulary masked through the bias can fill
        # a whole leading tile): shift by 0 then, so exp gives 0 instead of exp(-inf + inf) = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        first = m == float("-inf")
        r = tl.where(first, 0.0, tl.exp(m - m_safe))
        p = tl.exp(z - m_safe[:, None])  # 0 on masked columns and -inf logits
        if WITH_ENTROPY:
            dm = tl.where(first, 0.0, m - m_safe)
            pz = p * tl.where(p > 0.0, z - m_safe[:, None], 0.0)  # no 0 * -inf
            a = r * (a + dm * s) + tl.sum(pz, axis=1)
        s = r * s + tl.sum(p, axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zy_ptr + out, zy, mask=rmask)
    if WITH_ENTROPY:
        tl.store(a_ptr + out, a, mask=rmask)


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------

@triton.jit
def _staged_vocab_dz(h_ptr, w_ptr, b_ptr, rows, rmask, v0, y, lse, mean_z, g, k, e, N, V, H, softcap, inv_temp,
                     filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                     FILTER: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, STAGE: tl.constexpr):
    """dL/draw of rows x ``[v0, v0 + STAGE * BLOCK_V)`` in the weight's dtype (STAGE = 1, 2 or 4
    vocabulary tiles side by side, each recomputed on its own, so the fp32 logit accumulator stays
    one tile) and whether the span is kept by the filter."""
    dz, keep = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, v0, y, lse, mean_z, g, k, e, N, V, H, softcap,
                        inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                        INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    dzc = dz.to(w_ptr.dtype.element_ty)
    if STAGE >= 2:
        dz1, keep1 = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, v0 + BLOCK_V, y, lse, mean_z, g, k, e, N, V, H,
                              softcap, inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                              INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dzc = _cat_cols(dzc, dz1.to(w_ptr.dtype.element_ty))
        keep = keep | keep1
    if STAGE >= 4:
        dz2, keep2 = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, v0 + 2 * BLOCK_V, y, lse, mean_z, g, k, e, N, V, H,
                              softcap, inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                              INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz3, keep3 = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, v0 + 3 * BLOCK_V, y, lse, mean_z, g, k, e, N, V, H,
                              softcap, inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                              INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dzc = _cat_cols(dzc, _cat_cols(dz2.to(w_ptr.dtype.element_ty), dz3.to(w_ptr.dtype.element_ty)))
        keep = keep | keep2 | keep3
    return dzc, keep


@triton.autotune(key=BWD_KEY, **BWD_H_TUNING)
@triton.jit
def token_stats_bwd_hidden_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, gh_ptr,
    N, V, H, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, STAGE: tl.constexpr,
):
    """``grad_hidden[rows, :] = sum_v dL/draw[rows, v] W[v, :]`` for one token block.

    Loops over spans of ``STAGE`` vocabulary tiles: recomputes each tile's logits, forms dL/draw
    in registers (see :func:`_grad_raw_tile`), casts it to the input dtype (as the forward GEMM's
    operands), puts the span's tiles side by side (``[BLOCK_N, STAGE * BLOCK_V]``) and adds
    ``dL/draw_span @ W[span, h-chunk]`` into the fp32 output rows, which this program alone owns
    (zeroed first; a CTA barrier separates spans). The output is read and written once per span,
    not once per tile: STAGE times less of that traffic, at the cost of holding STAGE tiles of
    dL/draw (16-bit) at once. With ``FILTER``, a span where ``max p < filter_eps`` and no label
    falls skips the gradient GEMM.
    """
    tl.static_assert((STAGE == 1) | (STAGE == 2) | (STAGE == 4), "bwd_hidden: STAGE must be 1, 2 or 4")
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        tl.store(gh_ptr + rows64[:, None] * H + ks[None, :], tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32),
                 mask=rmask[:, None] & (ks[None, :] < H))
    tl.debug_barrier()
    y, lse, mean_z, g, k, e = _load_row_grads(rows, rmask, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr,
                                              WITH_ENTROPY)
    for v0 in range(0, V, STAGE * BLOCK_V):
        dzc, keep = _staged_vocab_dz(h_ptr, w_ptr, b_ptr, rows, rmask, v0, y, lse, mean_z, g, k, e, N, V, H,
                                     softcap, inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER,
                                     DOT_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, STAGE)
        if DOT_FP32:
            dzc = dzc.to(tl.float32)
        cols = v0 + tl.arange(0, STAGE * BLOCK_V)
        cmask = cols < V
        cols64 = cols.to(tl.int64)
        for h0 in range(0, _extent(H, keep, FILTER), BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            hk = ks[None, :] < H
            wt = tl.load(w_ptr + cols64[:, None] * H + ks[None, :], mask=cmask[:, None] & hk, other=0.0)
            if DOT_FP32:
                wt = wt.to(tl.float32)
            gp = gh_ptr + rows64[:, None] * H + ks[None, :]
            cur = tl.load(gp, mask=rmask[:, None] & hk, other=0.0)
            cur = tl.dot(dzc, wt, cur, input_precision=INPUT_PRECISION)
            tl.store(gp, cur, mask=rmask[:, None] & hk)
        tl.debug_barrier()


@triton.jit
def _token_tile_dz_t(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, n0, col_lo, N, V, H,
                     softcap, inv_temp, filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     WITH_ENTROPY: tl.constexpr, FILTER: tl.constexpr, DOT_FP32: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """For token rows ``[n0, n0 + BLOCK_N)`` and this program's columns: dL/draw transposed in the
    input dtype (``[BLOCK_V, BLOCK_N]``), its column sums in fp32 (for the bias) and the filter's keep."""
    rows = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y, lse, mean_z, g, k, e = _load_row_grads(rows, rmask, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr,
                                              WITH_ENTROPY)
    dz, keep = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, col_lo, y, lse, mean_z, g, k, e, N, V, H, softcap,
                        inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                        INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    return tl.trans(dz.to(h_ptr.dtype.element_ty)), tl.sum(dz, axis=0), keep


@triton.autotune(key=BWD_KEY, **BWD_W_TUNING)
@triton.jit
def token_stats_bwd_weight_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, gw_ptr, gb_ptr,
    N, V, H, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, STAGE: tl.constexpr,
):
    """``grad_weight[cols, :] = sum_n dL/draw[n, cols] h[n, :]`` (and ``grad_bias[cols]``).

    Grid over vocabulary blocks, loop over spans of ``STAGE`` (1 or 2) token tiles: recomputes each
    tile's logits, forms dL/draw, puts the span's transposed tiles side by side
    (``[BLOCK_V, STAGE * BLOCK_N]``) and adds ``dL/draw_span^T @ h[span, h-chunk]`` into the fp32
    output rows this program alone owns (one read-modify-write per span, not per tile), and sums
    ``dL/draw`` over tokens in registers for the bias (unfiltered: the bias gradient is exact
    even with ``FILTER``).
    """
    tl.static_assert((STAGE == 1) | (STAGE == 2), "bwd_weight: STAGE must be 1 or 2")
    pid = tl.program_id(0)
    col_lo = pid * BLOCK_V
    cols = col_lo + tl.arange(0, BLOCK_V)
    cmask = cols < V
    cols64 = cols.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        tl.store(gw_ptr + cols64[:, None] * H + ks[None, :], tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32),
                 mask=cmask[:, None] & (ks[None, :] < H))
    tl.debug_barrier()
    gb = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, STAGE * BLOCK_N):
        dzt, col_sum, keep = _token_tile_dz_t(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, n0,
                                              col_lo, N, V, H, softcap, inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP,
                                              WITH_ENTROPY, FILTER, DOT_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_V,
                                              BLOCK_H)
        gb += col_sum
        if STAGE >= 2:
            dzt1, col_sum1, keep1 = _token_tile_dz_t(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr,
                                                     n0 + BLOCK_N, col_lo, N, V, H, softcap, inv_temp, filter_eps,
                                                     HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                                                     INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            dzt = _cat_cols(dzt, dzt1)
            gb += col_sum1
            keep = keep | keep1
        if DOT_FP32:
            dzt = dzt.to(tl.float32)
        rows = n0 + tl.arange(0, STAGE * BLOCK_N)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        for h0 in range(0, _extent(H, keep, FILTER), BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            hk = ks[None, :] < H
            ht = tl.load(h_ptr + rows64[:, None] * H + ks[None, :], mask=rmask[:, None] & hk, other=0.0)
            if DOT_FP32:
                ht = ht.to(tl.float32)
            gp = gw_ptr + cols64[:, None] * H + ks[None, :]
            cur = tl.load(gp, mask=cmask[:, None] & hk, other=0.0)
            cur = tl.dot(dzt, ht, cur, input_precision=INPUT_PRECISION)
            tl.store(gp, cur, mask=cmask[:, None] & hk)
        tl.debug_barrier()
    if HAS_BIAS:
        tl.store(gb_ptr + cols, gb, mask=cmask)


# --------------------------------------------------------------------------------------------
# Backward, non-deterministic variant (triton_options(deterministic=False)).
# --------------------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """``(token block, vocabulary block)`` of program ``pid`` in grouped order: consecutive
    programs walk GROUP_N token blocks for one vocabulary block, then the next vocabulary block,
    so the programs running at once cover about GROUP_N token blocks x (programs / GROUP_N)
    vocabulary blocks: their h and W tiles are shared through L2, and no output row block is the
    target of every running program's atomics (in row-major order all of them add into the same
    few grad_weight rows at once)."""
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(blocks_n - first_n, GROUP_N)
    in_group = pid % per_group
    return first_n + in_group % group_n, in_group // group_n


@triton.autotune(key=BWD_KEY, reset_to_zero=["gh_ptr", "gw_ptr", "gb_ptr"], **BWD_FUSED_TUNING)
@triton.jit
def token_stats_bwd_fused_atomic_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, gh_ptr, gw_ptr, gb_ptr,
    N, V, H, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    """All three gradients from one recomputed logit tile, accumulated with fp32 atomics.

    1-D grid over all (token block, vocabulary block) tiles in grouped order
    (:func:`_grouped_tile`); a program forms dL/draw for its tile and adds ``dL/draw @ W[cols]``
    into ``grad_hidden[rows]``, ``dL/draw^T @ h[rows]`` into ``grad_weight[cols]`` and its
    column sums into ``grad_bias[cols]`` with relaxed ``tl.atomic_add`` (outputs zeroed
    beforehand; the adds need atomicity, not ordering, so ``sem="relaxed"`` instead of the default
    acq_rel). One logit recompute instead of two, but the summation order, and so the last bits
    of the result, depends on scheduling. Filtering as in the deterministic kernels (the bias
    gradient is never filtered).
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_lo = pid_v * BLOCK_V
    cols = col_lo + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y, lse, mean_z, g, k, e = _load_row_grads(rows, rmask, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr,
                                              WITH_ENTROPY)
    dz, keep = _dz_tile(h_ptr, w_ptr, b_ptr, rows, rmask, col_lo, y, lse, mean_z, g, k, e, N, V, H, softcap,
                        inv_temp, filter_eps, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, FILTER, DOT_FP32,
                        INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(dz, axis=0), mask=cmask, sem="relaxed")
    dzc = dz.to(w_ptr.dtype.element_ty)
    if DOT_FP32:
        dzc = dzc.to(tl.float32)
    dzt = tl.trans(dzc)
    for h0 in range(0, _extent(H, keep, FILTER), BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        hk = ks[None, :] < H
        wt = tl.load(w_ptr + cols64[:, None] * H + ks[None, :], mask=cmask[:, None] & hk, other=0.0)
        ht = tl.load(h_ptr + rows64[:, None] * H + ks[None, :], mask=rmask[:, None] & hk, other=0.0)
        if DOT_FP32:
            wt = wt.to(tl.float32)
            ht = ht.to(tl.float32)
        tl.atomic_add(gh_ptr + rows64[:, None] * H + ks[None, :],
                      tl.dot(dzc, wt, input_precision=INPUT_PRECISION), mask=rmask[:, None] & hk, sem="relaxed")
        tl.atomic_add(gw_ptr + cols64[:, None] * H + ks[None, :],
                      tl.dot(dzt, ht, input_precision=INPUT_PRECISION), mask=cmask[:, None] & hk, sem="relaxed")


# --------------------------------------------------------------------------------------------
# One-pass chunk epilogues (fdiv_kernels/autograd/fused.py): the GEMMs run in cuBLAS
# (fdiv_kernels/kernels/gemm_chunks.py); these read a chunk's float32 raw logits z [n, V] (row
# stride ld), one program per row walking it in BLOCK columns. Launched without FMA contraction
# (enable_fp_fusion=False), so both kernels compute bit-identical z from the same raw value and
# the forward's lse bounds p = exp(z - lse) <= 1 in the coefficient.
# --------------------------------------------------------------------------------------------

CHUNK_BLOCK = 32 if INTERPRET else 2048
"""Columns per step of the chunk epilogues' row loop."""


@triton.jit
def _chunk_z(z_ptr, b_ptr, row, cols, cmask, ld, softcap, inv_temp, HAS_BIAS: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr):
    """``z = cap(raw + b) / T`` for one row's columns (``-inf`` outside ``[0, V)``)."""
    raw = tl.load(z_ptr + row * ld + cols, mask=cmask, other=0.0)
    if HAS_BIAS:
        raw += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        raw = _tanh(raw / softcap) * softcap
    return tl.where(cmask, raw * inv_temp, -float("inf"))


@triton.jit
def chunk_fwd_epilogue_kernel(z_ptr, ld, b_ptr, y_ptr, lse_ptr, logp_ptr, ent_ptr, V, softcap, inv_temp,
                              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                              BLOCK: tl.constexpr):
    """Per row: ``lse``, ``logp = z[y] - lse`` and (``WITH_ENTROPY``) ``ent``; an online
    log-sum-exp per lane (m, S, A as in token_stats_fwd_kernel), lanes merged at the end. A
    masked (-inf) column adds exact zeros, whatever the running max."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row)
    m = tl.full((BLOCK,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    zy = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        cmask = cols < V
        z = _chunk_z(z_ptr, b_ptr, row, cols, cmask, ld, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
        m_new = tl.maximum(m, z)
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        r = tl.exp(m - safe)
        p = tl.exp(z - safe)
        if WITH_ENTROPY:
            shift = tl.where(m == -float("inf"), 0.0, m - safe)
            a = r * (a + shift * s) + p * tl.where(p > 0.0, z - safe, 0.0)  # no 0 * -inf, not even unselected
        s = r * s + p
        m = m_new
        zy += tl.where(cols == y, z, 0.0)
    big_m = tl.max(m, axis=0)
    safe_m = tl.where(big_m == -float("inf"), 0.0, big_m)
    rr = tl.exp(m - safe_m)
    big_s = tl.sum(rr * s, axis=0)
    log_s = tl.log(big_s)
    lse = safe_m + log_s
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.sum(zy, axis=0) - lse)
    if WITH_ENTROPY:
        shift_m = tl.where(m == -float("inf"), 0.0, m - safe_m)
        big_a = tl.sum(rr * (a + shift_m * s), axis=0)
        tl.store(ent_ptr + row, log_s - big_a / big_s)


@triton.jit
def chunk_coef_epilogue_kernel(z_ptr, ld, c_ptr, ld_c, b_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr, V,
                               softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                               WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: ``dL/draw`` (``_grad_raw_tile`` on a one-row tile) written in ``c_ptr``'s dtype,
    which may share ``z``'s storage row by row (a 16-bit coefficient over the first half of each
    float32 row, ``ld_c = 2 ld``): the program walks its row in order with a barrier between the
    loads and the stores of each block, and a store of block j only reaches float32 elements below
    ``v0 / 2 + BLOCK / 2``, loaded before that barrier (as csrc/cuda's coef_kernel)."""
    row = tl.program_id(0).to(tl.int64)
    rows = row + tl.arange(0, 1)
    rmask = rows >= 0
    y, lse, mean_z, g, k, e = _load_row_grads(rows, rmask, y_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr, e_ptr,
                                              WITH_ENTROPY)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        cmask = cols < V
        z = _chunk_z(z_ptr, b_ptr, row, cols, cmask, ld, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(cmask, z, 0.0)[None, :]  # columns past V: finite (masked on store)
        valid = cmask[None, :]
        dz, _ = _grad_raw_tile(z, valid, (cols[None, :] == y[:, None]) & valid, lse, mean_z, g, k, e, softcap,
                               inv_temp, HAS_SOFTCAP, WITH_ENTROPY)
        tl.debug_barrier()  # every load of this block before any store into its bytes (in place)
        tl.store(c_ptr + row * ld_c + cols[None, :], dz.to(c_ptr.dtype.element_ty), mask=valid)

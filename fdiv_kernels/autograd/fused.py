"""The single-pass fused loss: logits GEMM -> stats -> coefficients -> gradient GEMMs, all in forward.

For a loss spec (:mod:`fdiv_kernels.specs`), :class:`FusedLossFunction` processes the supervised
tokens in chunks of *complete rows* (any tokens for token-local specs; both rows of a DPO pair
together). Per chunk, with the backend's chunk kernels (:class:`ChunkKernels`):

1. ``stats``: ``z = h W^T`` (one GEMM), per-token ``logp``, ``lse`` (and entropy);
2. the spec's terms of the chunk and, by autograd on those O(rows) numbers, ``g = dL/dlogp`` and
   ``k = dL/dlse`` per token;
3. ``grads``: the coefficient ``dL/dz`` from the chunk's logits (kept from step 1, never
   recomputed), ``grad_h = coef W`` and ``grad_W = beta grad_W + alpha coef^T h`` (two GEMMs).

Three GEMMs in all; the backward only multiplies the stored gradients by ``grad_output``.
Batch-coupled aggregates stay exact in one pass: means divide by counts read off the labels
first, and the log-mean-exp of KL / squared Hellinger, ``L = logsumexp_c A_c - log n`` over the
chunks' local log-sum-exps ``A_c``, is accumulated by :class:`~fdiv_kernels.specs.LogSumExpAccumulator`:
chunk ``c``'s gradient is that of ``A_c``; ``grad_W`` is kept in the frame of the running total
``L_c`` (``alpha = exp(A_c - L_c)``, ``beta = exp(L_{c-1} - L_c)``), so it is exact after the last
chunk; each chunk's ``grad_h`` rows get ``exp(A_c - L)``. (This reads ``A_c`` on the host once
per chunk.) The data checks (:mod:`fdiv_kernels._checks`) fold the finiteness of every chunk's
statistics and coefficients into one flag, read once by :func:`evaluate`.

If the outputs ``logp``/``lse``/``entropy`` are used in another differentiable expression, their
gradients are added in the backward by the same chunk kernels, recomputing each chunk's logits
with the forward's GEMM shapes (so they have its bits and ``p <= 1`` with the stored ``lse``).
What is not a spec (a user's own function of :func:`fdiv_kernels.token_stats`), a log-mean-exp
loss mixed with linear terms, ``reduction="none"``, a row longer than the chunk budget, and
backends without chunk kernels (triton) use the two-pass path of :func:`whole_batch`. Without
any gradient needed (eval, ``torch.no_grad``) only the logits GEMM runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import _checks
from ..specs import HeadSpec, LogSumExpAccumulator, LossSpec, Norms, Rows, Terms
from . import compiled
from .backends import Backend, resolve_backend
from .token_stats import TokenStats, token_stats, token_stats_from_logits, valid_grads, valid_rows

logger = logging.getLogger("fdiv_kernels")
_announced: set = set()
_single_pass = [os.environ.get("FDIV_KERNELS_SINGLE_PASS", "1") != "0"]


def single_pass_enabled() -> bool:
    """Whether specs take the one-pass path (default; ``FDIV_KERNELS_SINGLE_PASS=0`` or
    :func:`two_pass` turn it off, for benchmarks and debugging)."""
    return _single_pass[0]


@contextlib.contextmanager
def two_pass():
    """Within this block every loss takes the two-pass path (``fk.token_stats`` + the spec on the
    whole batch: the backends' recompute kernels), e.g. to benchmark them."""
    old = _single_pass[0]
    _single_pass[0] = False
    try:
        yield
    finally:
        _single_pass[0] = old


# ---------------------------------------------------------------------------------------------
# Planning the chunks (before any GEMM)
# ---------------------------------------------------------------------------------------------

class Chunk(NamedTuple):
    """Rows ``[row0, row1)`` and supervised tokens ``[tok0, tok1)``, in processing order."""

    row0: int
    row1: int
    tok0: int
    tok1: int


@dataclass(frozen=True)
class Plan:
    """How one call is cut into chunks.

    ``order``: processing order of the rows (``None``: as given); ``tok_idx``: flat indices of the
    supervised tokens in processing order (``None``: every token, as given).
    """

    order: Optional[torch.Tensor]
    tok_idx: Optional[torch.Tensor]
    chunks: Tuple[Chunk, ...]
    num_tokens: int


def row_order(spec: LossSpec, num_rows: int, device) -> Optional[torch.Tensor]:
    groups = spec.row_groups(num_rows)
    return None if groups is None else torch.argsort(groups, stable=True).to(device)


def plan_chunks(spec: LossSpec, mask2: torch.Tensor, budget: int) -> Optional[Plan]:
    """Chunks of at most ``budget`` supervised tokens; ``None`` when a row (or DPO pair) alone
    exceeds it and the spec is not token-local (the caller then takes the two-pass path)."""
    r, t = mask2.shape
    order = row_order(spec, r, mask2.device)
    m_ord = mask2 if order is None else mask2.index_select(0, order)
    counts = m_ord.sum(dim=1).tolist()
    n = int(sum(counts))
    if order is None:
        tok_idx = None if n == r * t else mask2.reshape(-1).nonzero().squeeze(1)
    else:
        tok_idx = torch.arange(r * t, device=mask2.device).view(r, t).index_select(0, order)[m_ord]
    if spec.token_local:
        chunks = tuple(Chunk(0, r, t0, min(n, t0 + budget)) for t0 in range(0, n, budget))
        return Plan(order, tok_idx, chunks, n)
    groups = spec.row_groups(r)
    sizes = [1] * r if groups is None else torch.bincount(groups).tolist()
    chunks: List[Chunk] = []
    row0 = row = tok0 = tok = 0
    for size in sizes:
        g_tok = int(sum(counts[row:row + size]))
        if g_tok > budget:
            return None
        if tok - tok0 + g_tok > budget and row > row0:
            chunks.append(Chunk(row0, row, tok0, tok))
            row0, tok0 = row, tok
        row += size
        tok += g_tok
    if row > row0:
        chunks.append(Chunk(row0, row, tok0, tok))
    return Plan(order, tok_idx, tuple(chunks), n)


# ---------------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedParams:
    """Everything :class:`FusedLossFunction` needs besides tensors (saved on ``ctx``)."""

    spec: LossSpec
    head: HeadSpec
    backend: Backend
    plan: Plan
    shape: Tuple[int, int]          # (rows, T) of the labels
    ignore_index: int
    return_entropy: bool


def _flat_rows(labels: torch.Tensor) -> Tuple[int, int]:
    """``(rows, T)`` of ``labels [..., T]`` (a 1-D ``labels`` is one row; ``T`` may be 0)."""
    return (1, labels.shape[0]) if labels.dim() == 1 else (math.prod(labels.shape[:-1]), labels.shape[-1])


def _chunk_rows(spec, c: Chunk, logp, lse, m_ord, ref_tok_ord, ref_seq_ord, ref_flat) -> Rows:
    """The spec's view of one chunk: ``[rows, T]`` tensors, or one flat row for token-local specs."""
    if spec.token_local:
        mask = torch.ones((1, logp.shape[0]), dtype=torch.bool, device=logp.device)
        ref = ref_flat if ref_flat is None or ref_flat.dim() == 0 else ref_flat[c.tok0:c.tok1][None]
        return Rows(logp[None], lse[None], mask, logp.new_zeros(()) if ref is None else ref, None)
    mask = m_ord[c.row0:c.row1]
    zeros = logp.new_zeros(mask.shape)
    ref_tok = ref_tok_ord if ref_tok_ord.dim() == 0 else ref_tok_ord[c.row0:c.row1]
    ref_seq = None if ref_seq_ord is None else ref_seq_ord[c.row0:c.row1]
    return Rows(zeros.masked_scatter(mask, logp), zeros.masked_scatter(mask, lse), mask, ref_tok, ref_seq)


class FusedLossFunction(torch.autograd.Function):
    """``FusedLossFunction.apply(hidden, weight, bias, labels, ref_tok, ref_seq, params) ->
    (loss, logp, lse, entropy)``; see the module docstring. ``ref_tok`` is ``[R, T]`` (masked) or a
    0-d zero, ``ref_seq`` ``[R]`` or ``None``, both in the natural row order; ``entropy`` is an
    empty tensor unless ``params.return_entropy``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_tok, ref_seq, params: FusedParams):
        spec, plan, head = params.spec, params.plan, params.head
        ctx.set_materialize_grads(False)
        r, t = params.shape
        y = labels.reshape(-1)
        mask2 = (y != params.ignore_index).view(r, t)
        norms = spec.normalizers(mask2)
        order, idx = plan.order, plan.tok_idx
        m_ord = mask2 if order is None else mask2.index_select(0, order)
        hv, yv = valid_rows(hidden, labels, idx)
        ref_tok_ord = ref_tok if (ref_tok.dim() == 0 or order is None) else ref_tok.index_select(0, order)
        ref_seq_ord = ref_seq if (ref_seq is None or order is None) else ref_seq.index_select(0, order)
        ref_flat = None
        if spec.token_local:
            ref_flat = ref_tok if ref_tok.dim() == 0 else (ref_tok.reshape(-1) if idx is None
                                                            else ref_tok.reshape(-1).index_select(0, idx))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        kern = params.backend.single_pass(weight.contiguous(), None if bias is None else bias.contiguous(), head,
                                          return_entropy=params.return_entropy, need_h=need_h, need_w=need_w,
                                          need_b=need_b)
        n = plan.num_tokens
        cdt = kern.dtype
        dev = hidden.device
        logp_v = torch.empty(n, dtype=cdt, device=dev)
        lse_v = torch.empty_like(logp_v)
        ent_v = torch.empty_like(logp_v) if params.return_entropy else None
        gh_v = torch.empty((n, hv.shape[1]), dtype=cdt, device=dev) if need_h else None
        linear = logp_v.new_zeros(())
        lme_chunks: List[Tuple[Chunk, float]] = []
        acc = LogSumExpAccumulator()
        checks = _checks.finite_checks_enabled()
        finite = torch.ones((), dtype=torch.bool, device=dev)  # every statistic and coefficient (no sync)
        host_finite = True
        for c in plan.chunks:
            hc, yc = hv[c.tok0:c.tok1], yv[c.tok0:c.tok1]
            if c.tok1 > c.tok0:
                lp, ls, en = kern.stats(hc, yc)
                logp_v[c.tok0:c.tok1], lse_v[c.tok0:c.tok1] = lp, ls
                if ent_v is not None:
                    ent_v[c.tok0:c.tok1] = en
                if checks:
                    finite = finite & _checks.all_finite((lp, ls, en))
            else:
                lp = ls = logp_v[:0]
            with torch.enable_grad():
                lp_, ls_ = lp.detach().requires_grad_(), ls.detach().requires_grad_()
                rows = _chunk_rows(spec, c, lp_, ls_, m_ord, ref_tok_ord, ref_seq_ord, ref_flat)
                terms = spec.terms(rows, norms)
                target = terms.lme if spec.uses_lme else terms.linear
                linear = linear + terms.linear.detach()
                skip = c.tok1 == c.tok0 or not target.requires_grad
                if not skip and spec.uses_lme:
                    a = float(terms.lme.detach())
                    skip = not math.isfinite(a)  # -inf: nothing to add; NaN/+inf: non-finite stats, reported below
                    host_finite = host_finite and not (math.isnan(a) or a == math.inf)
                if skip:  # no gradient from these tokens
                    if gh_v is not None:
                        gh_v[c.tok0:c.tok1] = 0
                    continue
                g, k = torch.autograd.grad(target, (lp_, ls_), allow_unused=True)
            g = torch.zeros_like(lp) if g is None else g
            k = torch.zeros_like(lp) if k is None else k
            if checks:
                finite = finite & _checks.all_finite((g, k))
            alpha = beta = 1.0
            if spec.uses_lme:  # grad_W in the frame of the running total (exact after the last chunk)
                beta, alpha = acc.add(a)
                lme_chunks.append((c, a))
            ghc = kern.grads(hc, yc, ls, en if ent_v is not None else None, g, k, None, alpha=alpha, beta=beta)
            if gh_v is not None:
                gh_v[c.tok0:c.tok1] = ghc

        lme = None
        tok_scale = None
        if spec.uses_lme:
            if lme_chunks:  # each chunk's grad_h rows get their final weight exp(A_c - L)
                tok_scale = torch.zeros(n, dtype=cdt, device=dev)
                for c, a in lme_chunks:
                    tok_scale[c.tok0:c.tok1] = acc.weight(a)
            lme = logp_v.new_tensor(acc.total)
        loss = spec.finish(Terms(linear, lme), norms)
        grad_w, grad_b = kern.results()

        def scatter(v):
            if idx is None:
                return v.reshape(labels.shape)
            return torch.zeros(y.shape[0], dtype=v.dtype, device=v.device).index_copy_(0, idx, v).reshape(labels.shape)

        logp, lse = scatter(logp_v), scatter(lse_v)
        ent = scatter(ent_v) if ent_v is not None else lse.new_empty(0)
        if ent_v is None:
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, bias, labels, gh_v, grad_w, grad_b, tok_scale, lse_v, ent_v)
        ctx.params = params
        finite = finite & host_finite
        ctx.mark_non_differentiable(finite)
        return loss, logp, lse, ent, finite

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_lse, grad_ent, grad_finite):
        hidden, weight, bias, labels, gh_v, grad_w, grad_b, tok_scale, lse_v, ent_v = ctx.saved_tensors
        params = ctx.params
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        idx = params.plan.tok_idx
        gh = gw = gb = None
        if grad_loss is not None:
            # one host read of grad_output (the loss's backward runs first, so nothing waits): the
            # usual loss.backward() (grad_output = 1) returns the stored gradients without a pass
            s = float(grad_loss)
            if need_h:
                gh = gh_v if tok_scale is None else gh_v * tok_scale[:, None]
                gh = _scaled(gh, s, gh.dtype)
            if need_w:
                gw = _scaled(grad_w, s, weight.dtype)
            if need_b:
                gb = _scaled(grad_b, s, bias.dtype)
        if grad_logp is not None or grad_lse is not None or grad_ent is not None:
            eh, ew, eb = _recompute_grads(params, hidden, weight, bias, labels, lse_v, ent_v,
                                          grad_logp, grad_lse, grad_ent, need_h, need_w, need_b)
            gh = eh if gh is None else gh + eh
            gw = ew if gw is None else gw + ew
            gb = eb if gb is None else (gb + eb if eb is not None else gb)
        grad_hidden = grad_weight = grad_bias = None
        if need_h and gh is not None:
            h_shape = (labels.numel(), hidden.shape[-1])
            full = gh if idx is None else torch.zeros(h_shape, dtype=gh.dtype, device=gh.device).index_copy_(0, idx, gh)
            grad_hidden = full.reshape(hidden.shape).to(hidden.dtype)
        if need_w and gw is not None:
            grad_weight = gw.to(weight.dtype)
        if need_b and gb is not None:
            grad_bias = gb.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _scaled(t: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """``(t * s).to(dtype)`` in at most one pass, and none when ``s == 1`` and the dtype matches."""
    if s == 1.0:
        return t.to(dtype)
    return torch.mul(t, s, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def _recompute_grads(params: FusedParams, hidden, weight, bias, labels, lse_v, ent_v, grad_logp, grad_lse, grad_ent,
                     need_h: bool, need_w: bool, need_b: bool):
    """Gradients of the ``logp``/``lse``/``entropy`` outputs (used outside the loss), chunk by
    chunk with the forward's own chunk kernels: each chunk's logits are recomputed by the very
    GEMM shapes and transform of the forward, so they have its bits and ``p = exp(z - lse) <= 1``
    with the stored ``lse`` (a GEMM of another shape rounds differently, which at ``|z| ~ 1e4``
    moves ``p`` by 1e-3)."""
    idx = params.plan.tok_idx
    hv, yv = valid_rows(hidden, labels, idx)
    g, k, e = valid_grads(idx, lse_v, ent_v, grad_logp, grad_lse, grad_ent)
    _checks.check_coefficients("fk.loss backward (logp/lse/entropy outputs)", grad_logp=g, grad_lse=k, grad_entropy=e)
    kern = params.backend.single_pass(weight.contiguous(), None if bias is None else bias.contiguous(), params.head,
                                      return_entropy=False, need_h=need_h, need_w=need_w, need_b=need_b)
    gh = torch.zeros((hv.shape[0], hv.shape[1]), dtype=kern.dtype, device=hv.device) if need_h else None
    for c in params.plan.chunks:
        if c.tok1 == c.tok0:
            continue
        sl = slice(c.tok0, c.tok1)
        hc, yc = hv[sl], yv[sl]
        kern.stats(hc, yc)
        ghc = kern.grads(hc, yc, lse_v[sl], None if e is None else ent_v[sl], g[sl], k[sl],
                         None if e is None else e[sl])
        if gh is not None:
            gh[sl] = ghc
    gw, gb = kern.results()
    return gh, gw, gb


# ---------------------------------------------------------------------------------------------
# Entry point used by fk.loss and the modules
# ---------------------------------------------------------------------------------------------

def whole_batch(spec: LossSpec, rows: Rows, norms: Norms) -> torch.Tensor:
    """The loss of a whole batch from its per-token statistics (the two-pass and logits paths):
    the same :meth:`terms` on all rows (in the spec's row order)."""
    order = row_order(spec, rows.mask.shape[0], rows.mask.device)
    if order is not None:
        rows = rows.select(order)
    if getattr(spec, "reduction", "mean") == "none":  # a DPOSpec has no reduction (a mean over pairs)
        return spec.per_element(rows)
    return spec.finish(spec.terms(rows, norms), norms)


class Evaluated(NamedTuple):
    """What :func:`evaluate` returns: the loss and the per-token statistics (shape of ``labels``)."""

    loss: torch.Tensor
    stats: TokenStats
    single_pass: bool


def evaluate(spec: LossSpec, *, hidden=None, weight=None, labels, logits=None, bias=None,
             ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], head: HeadSpec, ignore_index: int,
             return_entropy: bool) -> Evaluated:
    """The loss of ``spec`` and the token statistics, by the cheapest exact path (module docstring).

    Inputs are validated by the caller (``ref_tok`` ``[R, T]`` masked or a 0-d zero, ``ref_seq``
    ``[R]`` or ``None``).
    """
    if logits is not None:
        stats = token_stats_from_logits(logits, labels, ignore_index=ignore_index, return_entropy=return_entropy)
    else:
        wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                                  (bias is not None and bias.requires_grad))
        if wants_grad and spec.single_pass and single_pass_enabled():
            if compiled.compiling():  # one custom op runs this whole branch eagerly (ops/compiled.py)
                loss, logp, lse, ent = compiled.evaluate_fused(spec, hidden=hidden, weight=weight, labels=labels,
                                                               bias=bias, ref_tok=ref_tok, ref_seq=ref_seq, head=head,
                                                               ignore_index=ignore_index, return_entropy=return_entropy)
                return Evaluated(loss, TokenStats(logp, lse, ent), True)
            backend = resolve_backend(head.backend, hidden)
            if backend.single_pass is not None:
                shape = _flat_rows(labels)
                mask2 = (labels != ignore_index).reshape(shape)
                budget = backend.chunk_tokens(weight.shape[0], weight.shape[1], hidden.dtype)
                plan = plan_chunks(spec, mask2, budget)
                if plan is not None:
                    params = FusedParams(spec, head, backend, plan, shape, ignore_index, return_entropy)
                    loss, logp, lse, ent, finite = FusedLossFunction.apply(hidden, weight, bias, labels, ref_tok,
                                                                           ref_seq, params)
                    stats = TokenStats(logp, lse, ent if return_entropy else None)
                    check_result(spec, loss, stats, labels, mask2, ref_tok, ref_seq, head, finite)
                    return Evaluated(loss, stats, True)
                _announce(f"a row of {int(mask2.sum(1).max())} supervised tokens exceeds the {backend.name} "
                          f"backend's chunk of {budget} tokens: two-pass path")
            else:
                _announce(f"backend {backend.name!r} has no single-pass kernels: two-pass path")
        stats = token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=head.softcap,
                            temperature=head.temperature, return_entropy=return_entropy, backend=head.backend)
    shape = _flat_rows(labels)
    mask2 = (labels != ignore_index).reshape(shape)
    rows = Rows(stats.logp.reshape(shape), stats.lse.reshape(shape), mask2, ref_tok, ref_seq)
    loss = whole_batch(spec, rows, spec.normalizers(mask2))
    if compiled.compiling():
        loss = compiled.checked_loss(spec, loss, stats, labels, ref_tok, ref_seq, head, ignore_index)
    else:
        check_result(spec, loss, stats, labels, mask2, ref_tok, ref_seq, head)
    return Evaluated(loss, stats, False)


def check_result(spec: LossSpec, loss: torch.Tensor, stats: TokenStats, labels: torch.Tensor, mask2: torch.Tensor,
                 ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], head: HeadSpec,
                 finite: Optional[torch.Tensor] = None) -> None:
    """The data check of a loss (one device sync; ``FDIV_CHECK_FINITE=0`` skips it): the loss, the
    token statistics, the single-pass coefficients (``finite``) and the supervised references are
    finite / not NaN, or a ``ValueError`` says which input is the cause."""
    if not _checks.finite_checks_enabled():
        return
    flag = _checks.all_finite((loss, stats.logp, stats.lse, stats.entropy)).to(loss.device)
    if finite is not None:
        flag = flag & finite
    if ref_tok.dim():
        flag = flag & ~_invalid_reference(ref_tok).any()
    if ref_seq is not None:
        flag = flag & ~(_invalid_reference(ref_seq) & mask2.any(dim=1)).any()
    if bool(flag):
        return
    raise ValueError(_explain(spec, loss, stats, labels, mask2, ref_tok, ref_seq, head))


def _invalid_reference(ref: torch.Tensor) -> torch.Tensor:
    """NaN or +inf: not a log-probability (-inf, pi_ref = 0, is one: the specs take its limit)."""
    return torch.isnan(ref) | (ref == math.inf)


def _explain(spec, loss, stats, labels, mask2, ref_tok, ref_seq, head) -> str:
    """The cause of a failed :func:`check_result`, most basic first."""
    if ref_tok.dim() and bool(_invalid_reference(ref_tok).any()):
        pos = _checks.first_position(_invalid_reference(ref_tok.reshape(labels.shape)))
        return (f"ref_logp is {float(ref_tok.reshape(labels.shape)[pos])} at supervised position {pos} "
                f"(a log-probability is a number <= 0)")
    if ref_seq is not None:
        bad = _invalid_reference(ref_seq) & mask2.any(dim=1)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            return (f"ref_logp is {float(ref_seq[r])} for row {r} (a row with supervised tokens; a log-probability "
                    f"is a number <= 0)")
    why = _checks.explain_token_stats(stats.logp, stats.lse, stats.entropy, labels, head.softcap, head.temperature)
    if why:
        return why
    shape = mask2.shape
    rows = Rows(stats.logp.detach().reshape(shape), stats.lse.detach().reshape(shape), mask2, ref_tok, ref_seq)
    order = row_order(spec, shape[0], mask2.device)
    why = spec.explain(rows if order is None else rows.select(order))
    if why:
        return why
    if bool(_checks.all_finite((loss,))):
        return ("the loss is finite but a derivative of it with respect to the token statistics is not (NaN/inf "
                "coefficient); please report this input")
    return f"the loss is {loss.detach().reshape(-1)[0].item() if loss.numel() else loss} (not finite)"


def _announce(msg: str) -> None:
    if msg not in _announced:
        _announced.add(msg)
        logger.info("fdiv_kernels: %s", msg)

"""The fused loss: logits GEMM -> stats -> closed-form coefficients -> gradient GEMMs, all in forward.

For a loss spec (:mod:`fdiv_kernels.specs`), :func:`fused_forward` processes the supervised
tokens in chunks of *complete rows* (any tokens for token-local specs; both rows of a DPO pair
together). Per chunk, with the backend's chunk kernels (``ChunkKernels``,
:mod:`fdiv_kernels.kernels.backends`):

1. ``stats``: ``z = h W^T`` (one GEMM), per-token ``logp``, ``lse`` (and entropy);
2. the spec's terms of the chunk and its closed-form coefficients ``g = dL/dlogp``,
   ``k = dL/dlse`` (and the references' gradients), O(rows) numbers (:meth:`LossSpec.coefficients`);
3. ``grads``: the coefficient ``dL/dz`` from the chunk's logits (kept from step 1, never
   recomputed), ``grad_h = coef W`` and ``grad_W = beta grad_W + alpha coef^T h`` (two GEMMs).

Three GEMMs in all, no autograd anywhere (so the same function runs inside a ``torch.library``
custom op, :mod:`fdiv_kernels.compiled`); :class:`FusedLossFunction`'s backward only multiplies
the gradients stored at the forward by ``grad_output``. Batch-coupled aggregates stay exact in
one pass: means divide by counts read off the labels first, and the log-mean-exp of KL /
squared Hellinger, ``L = logsumexp_c A_c - log n`` over the chunks' local log-sum-exps ``A_c``,
is accumulated by :class:`~fdiv_kernels.specs.LogSumExpAccumulator`: chunk ``c``'s coefficients
are those of ``A_c``; ``grad_W`` is kept in the frame of the running total ``L_c``
(``alpha = exp(A_c - L_c)``, ``beta = exp(L_{c-1} - L_c)``), so it is exact after the last chunk;
each chunk's ``grad_h`` rows (and reference gradients) get ``exp(A_c - L)``. (This reads ``A_c`` on
the host once per chunk.) The finiteness of every chunk's statistics and coefficients is folded
into one flag on the device, which the data check reads once (:func:`fdiv_kernels.checks.check_loss_data`).

When a row (or DPO pair) alone exceeds the backend's chunk, the same function runs in two
passes: the backend's forward over all rows, the spec's coefficients on the whole batch, the
backend's backward. If the outputs ``logp``/``lse``/``entropy`` are used in another
differentiable expression, their gradients are added in the backward by the same chunk kernels,
recomputing each chunk's logits with the forward's GEMM shapes (so they have its bits and
``p <= 1`` with the stored ``lse``).

With a vocabulary-parallel head (``head.vocab``), the chunk kernels run on this rank's shard and
each chunk's statistics are combined across the group after ``stats`` (two all-reduces of O(rows)
numbers), so that the spec sees the whole head's; ``grads`` takes the global ``lse`` and the
shard's split of ``g, k``, and ``grad_h`` is summed over the group once, after the last chunk
(:mod:`.vocab_parallel`). Every rank plans the same chunks (the budget is that of the largest shard).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import checks
from ..kernels.backends import Backend, resolve_backend
from ..specs import Coefficients, HeadSpec, LogSumExpAccumulator, LossSpec, Rows, Terms
from .class_options import MeanLogitGrads, token_weights, with_class_options
from .predicted import argmax_rows, has_argmax, predicted_tokens, scatter_predictions
from .token_stats import backend_options_kw, scatter_tokens, valid_grads, valid_rows
from .vocab_parallel import combine, kernel_labels, split_coefficients, sum_over_shards

__all__ = ["FusedLossFunction", "FusedParams", "Needs", "Plan", "flat_rows", "fused_forward", "plan_chunks",
           "prepare", "row_order", "stats_grads"]

logger = logging.getLogger("fdiv_kernels")
_announced: set = set()


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

    ``order``: processing order of the rows (``None``: as given); ``tok_idx``: flat indices (into
    ``labels``) of the supervised tokens in processing order (``None``: every token, as given);
    ``grid_idx``: their flat indices in the ``[rows, T]`` grid of the rows in processing order.
    """

    order: Optional[torch.Tensor]
    tok_idx: Optional[torch.Tensor]
    grid_idx: Optional[torch.Tensor]
    chunks: Tuple[Chunk, ...]
    num_tokens: int


def flat_rows(labels: torch.Tensor) -> Tuple[int, int]:
    """``(rows, T)`` of ``labels [..., T]`` (a 1-D ``labels`` is one row; ``T`` may be 0)."""
    return (1, labels.shape[0]) if labels.dim() == 1 else (math.prod(labels.shape[:-1]), labels.shape[-1])


def row_order(spec: LossSpec, num_rows: int, device) -> Optional[torch.Tensor]:
    """The rows in the order the spec wants them chunked (``None``: as given)."""
    groups = spec.row_groups(num_rows)
    return None if groups is None else torch.argsort(groups, stable=True).to(device)


def plan_chunks(spec: LossSpec, mask2: torch.Tensor, budget: int) -> Optional[Plan]:
    """Chunks of at most ``budget`` supervised tokens; ``None`` when a row (or DPO pair) alone
    exceeds it and the spec is not token-local (the two-pass form then runs). Two host reads:
    the per-row counts and, unless every token is supervised, the token positions."""
    r, t = mask2.shape
    order = row_order(spec, r, mask2.device)
    m_ord = mask2 if order is None else mask2.index_select(0, order)
    counts = m_ord.sum(dim=1).tolist()
    n = int(sum(counts))
    grid_idx = tok_idx = None
    if n != r * t:
        grid_idx = m_ord.reshape(-1).nonzero().squeeze(1)
    if order is not None:
        grid = grid_idx if grid_idx is not None else torch.arange(r * t, device=mask2.device)
        tok_idx = order[grid // max(t, 1)] * t + grid % max(t, 1)
    else:
        tok_idx = grid_idx
    if spec.token_local:
        chunks = tuple(Chunk(0, r, t0, min(n, t0 + budget)) for t0 in range(0, n, budget))
        return Plan(order, tok_idx, grid_idx, chunks, n)
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
    return Plan(order, tok_idx, grid_idx, tuple(chunks), n)


# ---------------------------------------------------------------------------------------------
# Parameters, inputs and outputs of one call
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedParams:
    """Everything :func:`fused_forward` needs besides tensors (saved on ``ctx``). ``plan`` is
    ``None`` when the call runs in two passes (a row longer than the backend's chunk)."""

    spec: LossSpec
    head: HeadSpec
    backend: Backend
    plan: Optional[Plan]
    shape: Tuple[int, int]          # (rows, T) of the labels
    ignore_index: int
    return_entropy: bool
    return_predicted: bool = False  # the predicted tokens (:mod:`.predicted`), from the kept logits


class Needs(NamedTuple):
    """Which gradients the caller needs: ``hidden``, ``weight``, ``bias``, ``ref_tok``, ``ref_seq``."""

    hidden: bool
    weight: bool
    bias: bool
    ref_tok: bool = False
    ref_seq: bool = False


class Grads(NamedTuple):
    """Gradients of the loss at ``grad_output = 1``, in the compute dtype: ``hidden`` (shape of
    ``hidden``), ``weight``, ``bias``, ``ref_tok`` ``[R, T]``, ``ref_seq`` ``[R]`` (None where not needed)."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    ref_tok: Optional[torch.Tensor]
    ref_seq: Optional[torch.Tensor]


class FusedResult(NamedTuple):
    """What :func:`fused_forward` returns: the loss, the statistics (shape of ``labels``; ``entropy``
    None unless asked for), ``finite`` (0-d bool: every statistic and coefficient finite), the
    :class:`Grads`, and for :func:`stats_grads` the supervised ``lse_v``/``ent_v`` in processing
    order with their flat indices ``tok_idx`` (None: every token, in order); ``predicted``: with
    ``params.return_predicted`` the predicted tokens (shape of ``labels``, -1 where ignored)."""

    loss: torch.Tensor
    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    finite: torch.Tensor
    grads: Grads
    lse_v: torch.Tensor
    ent_v: Optional[torch.Tensor]
    tok_idx: Optional[torch.Tensor]
    predicted: Optional[torch.Tensor] = None


def prepare(spec: LossSpec, head: HeadSpec, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            ignore_index: int, return_entropy: bool, return_predicted: bool = False) -> FusedParams:
    """The backend and chunk plan of a call (the plan's host reads happen here)."""
    backend = resolve_backend(head.backend, hidden)
    shape = flat_rows(labels)
    plan = None
    if backend.single_pass is not None:
        mask2 = (labels != ignore_index).reshape(shape)
        rows = weight.shape[0] if head.vocab is None else max(head.vocab.sizes)  # the same plan on every rank
        budget = backend.chunk_tokens(rows, weight.shape[1], hidden.dtype)
        plan = plan_chunks(spec, mask2, budget)
        if plan is None:
            _announce(f"a row of {int(mask2.sum(1).max())} supervised tokens exceeds the {backend.name} backend's "
                      f"chunk of {budget} tokens: two passes")
    else:
        _announce(f"backend {backend.name!r} has no single-pass kernels: two passes")
    return FusedParams(spec, head, backend, plan, shape, ignore_index, return_entropy, return_predicted)


def _announce(msg: str) -> None:
    if msg not in _announced:
        _announced.add(msg)
        logger.info("fdiv_kernels: %s", msg)


# ---------------------------------------------------------------------------------------------
# The forward: one pass over the chunks (or two passes)
# ---------------------------------------------------------------------------------------------

def _chunk_rows(spec: LossSpec, c: Chunk, plan: Plan, t: int, logp, lse, m_ord, ref_tok_ord, ref_seq_ord,
                ref_flat) -> Tuple[Rows, Optional[torch.Tensor]]:
    """The spec's view of one chunk (``[rows, T]`` tensors, or one flat row for token-local
    specs) and the chunk tokens' flat positions in that view (None: the flat row itself)."""
    if spec.token_local:
        mask = torch.ones((1, logp.shape[0]), dtype=torch.bool, device=logp.device)
        ref = ref_flat if ref_flat.dim() == 0 else ref_flat[c.tok0:c.tok1][None]
        return Rows(logp[None], lse[None], mask, ref, None), None
    mask = m_ord[c.row0:c.row1]
    local = None if plan.grid_idx is None else plan.grid_idx[c.tok0:c.tok1] - c.row0 * t
    ref_tok = ref_tok_ord if ref_tok_ord.dim() == 0 else ref_tok_ord[c.row0:c.row1]
    ref_seq = None if ref_seq_ord is None else ref_seq_ord[c.row0:c.row1]
    return Rows(_to_grid(logp, local, mask), _to_grid(lse, local, mask), mask, ref_tok, ref_seq, c.row0), local


def _to_grid(v: torch.Tensor, local: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-token values ``v`` at their positions of the ``[rows, T]`` grid of ``mask`` (0 elsewhere)."""
    if local is None:
        return v.reshape(mask.shape)
    return v.new_zeros(mask.numel()).index_copy_(0, local, v).reshape(mask.shape)


def _from_grid(x: torch.Tensor, local: Optional[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`_to_grid`: the grid's values at the chunk's tokens, in order."""
    flat = x.reshape(-1)
    return flat if local is None else flat.index_select(0, local)


class _ChunkLoop:
    """The state of one :func:`fused_forward` over the chunks of its plan (a class only to keep
    each step short; one instance per call)."""

    def __init__(self, hidden, weight, bias, labels, ref_tok, ref_seq, class_weight, params: FusedParams,
                 needs: Needs):
        spec, plan = params.spec, params.plan
        self.spec, self.plan, self.params = spec, plan, params
        r, self.t = params.shape
        mask2 = (labels.reshape(-1) != params.ignore_index).view(r, self.t)
        self.norms = spec.normalizers(mask2)
        order = plan.order
        self.m_ord = mask2 if order is None else mask2.index_select(0, order)
        self.hv, self.yv = valid_rows(hidden, labels, plan.tok_idx)
        self.vocab = params.head.vocab
        self.yk, self.owner = kernel_labels(self.yv, self.vocab)  # the kernels' labels: this shard's ids
        ref_tok, ref_seq = ref_tok.detach(), None if ref_seq is None else ref_seq.detach()
        self.ref_tok_ord = ref_tok if (ref_tok.dim() == 0 or order is None) else ref_tok.index_select(0, order)
        self.ref_seq_ord = ref_seq if (ref_seq is None or order is None) else ref_seq.index_select(0, order)
        self.ref_flat = ref_tok if ref_tok.dim() == 0 else ref_tok.reshape(-1)
        if spec.token_local and ref_tok.dim() and plan.tok_idx is not None:
            self.ref_flat = self.ref_flat.index_select(0, plan.tok_idx)
        self.kern = params.backend.single_pass(
            weight.contiguous(), None if bias is None else bias.contiguous(), params.head,
            return_entropy=params.return_entropy, need_h=needs.hidden, need_w=needs.weight,
            need_b=needs.bias and bias is not None)
        n, cdt, dev = plan.num_tokens, self.kern.dtype, hidden.device
        # the predicted tokens, off the kept logits where the kernels read them (else in result())
        self.pred_v = None
        if params.return_predicted and has_argmax(self.kern):
            self.pred_v = torch.empty(n, dtype=torch.long, device=dev)
        self.weight, self.bias = weight, bias
        self.logp_v = torch.empty(n, dtype=cdt, device=dev)
        self.lse_v = torch.empty_like(self.logp_v)
        self.ent_v = torch.empty_like(self.logp_v) if params.return_entropy else None
        self.gh_v = torch.empty((n, self.hv.shape[1]), dtype=cdt, device=dev) if needs.hidden else None
        self.g_ref_tok = torch.zeros(n, dtype=cdt, device=dev) if needs.ref_tok and ref_tok.dim() else None
        self.g_ref_seq = torch.zeros(r, dtype=cdt, device=dev) if needs.ref_seq and ref_seq is not None else None
        self.linear = self.logp_v.new_zeros(())
        self.c = None if class_weight is None else class_weight.to(cdt)
        self.mean_grads = None
        if self.c is not None:  # the cross-entropy options (token-local specs): the weights' sum, the GEMV
            self.norms = self.norms._replace(weight=token_weights(self.c, mask2, labels.reshape(r, self.t)).sum())
            if checks.class_smoothing(spec):
                self.mean_grads = MeanLogitGrads(self.c, weight, bias, params.head, cdt)
        self.acc = LogSumExpAccumulator()
        self.lme_chunks: List[Tuple[Chunk, float]] = []
        self.finite = torch.ones((), dtype=torch.bool, device=dev)
        self.host_finite = True
        self.checks = checks.data_checks_enabled()

    def chunk(self, c: Chunk) -> None:
        has_tokens = c.tok1 > c.tok0
        sl = slice(c.tok0, c.tok1)
        hc, yc = self.hv[sl], self.yk[sl]
        owner = None if self.owner is None else self.owner[sl]
        en = None
        if has_tokens:
            lp, ls, en = combine(*self.kern.stats(hc, yc), owner, self.vocab)
            if self.pred_v is not None:  # read off the kept logits, before grads overwrites them
                self.pred_v[sl] = self.kern.argmax()
            self.logp_v[sl], self.lse_v[sl] = lp, ls
            if self.ent_v is not None:
                self.ent_v[sl] = en
            if self.checks:
                self.finite = self.finite & checks.all_finite((lp, ls, en))
        else:
            lp = ls = self.logp_v[:0]
        rows, local = _chunk_rows(self.spec, c, self.plan, self.t, lp, ls, self.m_ord, self.ref_tok_ord,
                                  self.ref_seq_ord, self.ref_flat)
        if self.c is not None:  # token-local: one flat row of the chunk's tokens
            ml = None if self.mean_grads is None else self.mean_grads.values(hc)[None]
            rows = with_class_options(rows, self.norms, self.spec, self.c, self.yv[sl][None], ml)[0]
        terms = self.spec.terms(rows, self.norms)
        self.linear = self.linear + terms.linear
        alpha = beta = 1.0
        if self.spec.uses_lme:
            a = float(terms.lme)
            self.host_finite = self.host_finite and not (math.isnan(a) or a == math.inf)
            if not math.isfinite(a):  # -inf: nothing to add; NaN/+inf: non-finite stats, reported by the check
                self._no_gradient(sl)
                return
            beta, alpha = self.acc.add(a)
            self.lme_chunks.append((c, a))
        coef = self.spec.coefficients(rows, self.norms)
        self._reference_grads(c, coef, local)
        if not has_tokens:
            return
        g, k = _from_grid(coef.logp, local), _from_grid(coef.lse, local)
        if self.checks:
            self.finite = self.finite & checks.all_finite((g, k))
        g, k = split_coefficients(g, k, owner)
        ghc = self.kern.grads(hc, yc, ls, en if self.ent_v is not None else None, g, k, None, alpha=alpha, beta=beta)
        if self.mean_grads is not None:
            self.mean_grads.add(_from_grid(coef.mean_logit, local), hc, ghc)
        if self.gh_v is not None:
            self.gh_v[sl] = ghc

    def _no_gradient(self, sl: slice) -> None:
        """A chunk whose tokens add nothing to the gradients (``grad_h`` rows are written, not added)."""
        if self.gh_v is not None:
            self.gh_v[sl] = 0

    def _reference_grads(self, c: Chunk, coef: Coefficients, local: Optional[torch.Tensor]) -> None:
        if self.g_ref_tok is not None and coef.ref_tok is not None:
            self.g_ref_tok[c.tok0:c.tok1] = _from_grid(coef.ref_tok, local)
        if self.g_ref_seq is not None and coef.ref_seq is not None:
            self.g_ref_seq[c.row0:c.row1] = coef.ref_seq

    def result(self, labels: torch.Tensor) -> FusedResult:
        spec, plan, norms = self.spec, self.plan, self.norms
        lme = None
        if spec.uses_lme:
            self._final_lme_weights()
            lme = self.logp_v.new_tensor(self.acc.total)
        loss = spec.finish(Terms(self.linear, lme), norms)
        grad_w, grad_b = self.kern.results()
        if self.mean_grads is not None:
            self.mean_grads.apply(grad_w, grad_b)
        idx, shape = plan.tok_idx, labels.shape
        gh_v = sum_over_shards(self.gh_v, self.vocab)
        grad_h = None if gh_v is None else scatter_tokens(gh_v, idx, shape)
        g_ref_tok = None if self.g_ref_tok is None else scatter_tokens(self.g_ref_tok, idx, self.params.shape)
        g_ref_seq = self.g_ref_seq
        if g_ref_seq is not None and plan.order is not None:
            g_ref_seq = torch.zeros_like(g_ref_seq).index_copy_(0, plan.order, g_ref_seq)
        ent = None if self.ent_v is None else scatter_tokens(self.ent_v, idx, shape)
        finite = self.finite & self.host_finite
        pred = None
        if self.params.return_predicted:
            pred_v = self.pred_v
            if pred_v is None:  # kernels without argmax(): one more logits pass (module predicted)
                pred_v = argmax_rows(self.params.backend, self.hv, self.yv, self.weight, self.bias, self.params.head)
            pred = scatter_predictions(pred_v, idx, labels)
        return FusedResult(loss, scatter_tokens(self.logp_v, idx, shape), scatter_tokens(self.lse_v, idx, shape), ent,
                           finite, Grads(grad_h, grad_w, grad_b, g_ref_tok, g_ref_seq), self.lse_v, self.ent_v, idx,
                           pred)

    def _final_lme_weights(self) -> None:
        """Each chunk's ``grad_h`` rows and reference gradients times their final weight
        ``exp(A_c - L)`` (``grad_W`` is already in the frame of the total)."""
        for c, a in self.lme_chunks:
            w = self.acc.weight(a)
            if self.gh_v is not None:
                self.gh_v[c.tok0:c.tok1] *= w
            if self.g_ref_tok is not None:
                self.g_ref_tok[c.tok0:c.tok1] *= w
            if self.g_ref_seq is not None:
                self.g_ref_seq[c.row0:c.row1] *= w


def _two_passes(hidden, weight, bias, labels, ref_tok, ref_seq, class_weight, params: FusedParams,
                needs: Needs) -> FusedResult:
    """:func:`fused_forward` without a chunk plan: the backend's forward over every supervised
    row, the spec's coefficients on the whole batch, the backend's backward."""
    spec, head, backend = params.spec, params.head, params.backend
    options = backend.options() if backend.options is not None else None
    y = labels.reshape(-1)
    valid = y != params.ignore_index
    idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    hv, yv = valid_rows(hidden, labels, idx)
    yk, owner = kernel_labels(yv, head.vocab)
    w_c, b_c = weight.contiguous(), None if bias is None else bias.contiguous()
    logp_v, lse_v, ent_v = backend.forward(hv, w_c, b_c, yk, head=head,
                                           return_entropy=params.return_entropy, **backend_options_kw(options))
    logp_v, lse_v, ent_v = combine(logp_v, lse_v, ent_v if params.return_entropy else None, owner, head.vocab)
    shape2 = params.shape
    mask2 = valid.view(shape2)
    logp, lse = scatter_tokens(logp_v, idx, labels.shape), scatter_tokens(lse_v, idx, labels.shape)
    ref_tok, ref_seq = ref_tok.detach(), None if ref_seq is None else ref_seq.detach()
    rows = Rows(logp.reshape(shape2), lse.reshape(shape2), mask2, ref_tok, ref_seq)
    norms = spec.normalizers(mask2)
    mean_grads = None
    if class_weight is not None:  # the cross-entropy options (token-local specs: no row order)
        c = class_weight.to(lse_v.dtype)
        if checks.class_smoothing(spec):
            mean_grads = MeanLogitGrads(c, weight, bias, head, lse_v.dtype)
            ml = scatter_tokens(mean_grads.values(hv), idx, labels.shape).reshape(shape2)
        rows, norms = with_class_options(rows, norms, spec, c, labels.reshape(shape2),
                                         ml if mean_grads is not None else None)
    order = row_order(spec, shape2[0], mask2.device)
    rows_ord = rows if order is None else rows.select(order)
    loss = spec.finish(spec.terms(rows_ord, norms), norms)
    coef = spec.coefficients(rows_ord, norms)
    if order is not None:
        coef = Coefficients(*(None if x is None else torch.zeros_like(x).index_copy_(0, order, x) for x in coef))
    g, k, _ = valid_grads(idx, lse_v, None, coef.logp, coef.lse, None)
    finite = checks.all_finite((logp_v, lse_v, ent_v, g, k))
    gh = gw = gb = None
    if needs.hidden or needs.weight or (needs.bias and bias is not None):
        gh_v, gw, gb = backend.backward(hv, w_c, b_c, yk, lse_v, None, *split_coefficients(g, k, owner), None,
                                        head=head, **backend_options_kw(options))
        if mean_grads is not None:
            a = coef.mean_logit.reshape(-1)
            mean_grads.add(a if idx is None else a.index_select(0, idx), hv, gh_v)
            mean_grads.apply(gw, gb)
        gh = scatter_tokens(sum_over_shards(gh_v, head.vocab), idx, labels.shape) if needs.hidden else None
        gw = gw if needs.weight else None
        gb = gb if (needs.bias and bias is not None) else None
    grads = Grads(gh, gw, gb, coef.ref_tok if needs.ref_tok else None, coef.ref_seq if needs.ref_seq else None)
    ent = None if ent_v is None else scatter_tokens(ent_v, idx, labels.shape)
    pred = None
    if params.return_predicted:  # no kept logits here: the chunk kernels' stats again (module predicted)
        pred = predicted_tokens(backend, hidden, weight, bias, labels, head, params.ignore_index)
    return FusedResult(loss, logp, lse, ent, finite, grads, lse_v, ent_v, idx, pred)


def fused_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                  ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], params: FusedParams,
                  needs: Needs, class_weight: Optional[torch.Tensor] = None) -> FusedResult:
    """The loss of ``params.spec``, the token statistics and the gradients at ``grad_output = 1``
    (module docstring). ``ref_tok``: ``[R, T]`` masked reference log-probs or a 0-d zero;
    ``ref_seq``: ``[R]`` or None (natural row order); ``class_weight``: the cross-entropy options'
    class weights ``c [V]`` (:func:`.class_options.class_vector`; None: off). No autograd, no
    checks: plain tensors in, plain tensors out."""
    with torch.no_grad():
        if params.plan is None:
            return _two_passes(hidden, weight, bias, labels, ref_tok, ref_seq, class_weight, params, needs)
        loop = _ChunkLoop(hidden, weight, bias, labels, ref_tok, ref_seq, class_weight, params, needs)
        for c in params.plan.chunks:
            loop.chunk(c)
        return loop.result(labels)


# ---------------------------------------------------------------------------------------------
# Gradients of the statistics outputs (used outside the loss)
# ---------------------------------------------------------------------------------------------

def stats_grads(params: FusedParams, hidden, weight, bias, labels, lse_v, ent_v, tok_idx, grad_logp, grad_lse,
                grad_ent, needs: Needs):
    """``(grad_hidden, grad_weight, grad_bias)`` of gradients of the ``logp``/``lse``/``entropy``
    outputs, in the compute dtype: chunk by chunk with the forward's own chunk kernels (each
    chunk's logits recomputed by the very GEMM shapes and transform of the forward, so they have
    its bits and ``p = exp(z - lse) <= 1`` with the stored ``lse``), or by the backend's backward
    after a two-pass forward."""
    with torch.no_grad():
        hv, yv = valid_rows(hidden, labels, tok_idx)
        vocab = params.head.vocab
        yv, owner = kernel_labels(yv, vocab)
        g, k, e = valid_grads(tok_idx, lse_v, ent_v, grad_logp, grad_lse, grad_ent)
        checks.check_coefficients("fk.loss backward (logp/lse/entropy outputs)", grad_logp=g, grad_lse=k,
                                  grad_entropy=e)
        g, k = split_coefficients(g, k, owner)
        w_c, b_c = weight.contiguous(), None if bias is None else bias.contiguous()
        need_b = needs.bias and bias is not None
        if params.plan is None:
            backend = params.backend
            options = backend.options() if backend.options is not None else None
            gh, gw, gb = backend.backward(hv, w_c, b_c, yv, lse_v, ent_v if e is not None else None, g, k, e,
                                          head=params.head,
                                          **backend_options_kw(options))
        else:
            kern = params.backend.single_pass(w_c, b_c, params.head, return_entropy=False, need_h=needs.hidden,
                                              need_w=needs.weight, need_b=need_b)
            gh = torch.zeros((hv.shape[0], hv.shape[1]), dtype=kern.dtype, device=hv.device) if needs.hidden else None
            for c in params.plan.chunks:
                if c.tok1 == c.tok0:
                    continue
                sl = slice(c.tok0, c.tok1)
                kern.stats(hv[sl], yv[sl])
                ghc = kern.grads(hv[sl], yv[sl], lse_v[sl], None if e is None else ent_v[sl], g[sl], k[sl],
                                 None if e is None else e[sl])
                if gh is not None:
                    gh[sl] = ghc
            gw, gb = kern.results()
        gh = scatter_tokens(sum_over_shards(gh, vocab), tok_idx, labels.shape) if needs.hidden else None
        return gh, (gw if needs.weight else None), (gb if need_b else None)


# ---------------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------------

def _hand_out(t: Optional[torch.Tensor], s: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t * s`` in ``dtype``, in at most one pass; ``t`` itself when ``s == 1`` and the dtype
    matches (the caller then gives up its reference: no returned gradient shares storage with
    anything the function keeps)."""
    if t is None:
        return None
    if s == 1.0 and t.dtype == dtype:
        return t
    return torch.mul(t, s, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a + b.to(a.dtype)


class FusedLossFunction(torch.autograd.Function):
    """``FusedLossFunction.apply(hidden, weight, bias, labels, ref_tok, ref_seq, params, class_weight) ->
    (loss, logp, lse, entropy, finite, predicted)``; see the module docstring. ``ref_tok`` is ``[R, T]``
    (masked) or a 0-d zero, ``ref_seq`` ``[R]`` or ``None``, both in the natural row order (their
    gradients are returned when they require grad); ``class_weight``: the cross-entropy options'
    ``c [V]`` or None (no gradient); ``entropy`` is an empty tensor unless
    ``params.return_entropy``; ``finite`` is the 0-d flag for the data check; ``predicted`` the
    predicted tokens (int64, shape of ``labels``) with ``params.return_predicted``, else empty.

    The gradients computed in the forward are handed out by the first backward (the function
    keeps no reference to them afterwards); a second backward through the same graph
    (``retain_graph=True``) computes them again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_tok, ref_seq, params: FusedParams, class_weight=None):
        ctx.set_materialize_grads(False)
        needs = Needs(*ctx.needs_input_grad[:3], ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        res = fused_forward(hidden, weight, bias, labels, ref_tok, ref_seq, params, needs, class_weight)
        ent = res.entropy if res.entropy is not None else res.lse.new_empty(0)
        if res.entropy is None:
            ctx.mark_non_differentiable(ent)
        pred = res.predicted if res.predicted is not None else labels.new_empty(0, dtype=torch.long)
        ctx.mark_non_differentiable(res.finite, pred)
        ctx.save_for_backward(hidden, weight, bias, labels, ref_tok, ref_seq, res.lse_v, res.ent_v, res.tok_idx,
                              class_weight)
        ctx.params, ctx.needs, ctx.grads = params, needs, res.grads
        return res.loss, res.logp, res.lse, ent, res.finite, pred

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_lse, grad_ent, grad_finite, grad_pred):
        hidden, weight, bias, labels, ref_tok, ref_seq, lse_v, ent_v, tok_idx, class_weight = ctx.saved_tensors
        params, needs = ctx.params, ctx.needs
        gh = gw = gb = g_rt = g_rs = None
        if grad_loss is not None:
            grads = ctx.grads
            if grads is None:  # a second backward (retain_graph=True): the first one handed them out
                grads = fused_forward(hidden, weight, bias, labels, ref_tok, ref_seq, params, needs, class_weight).grads
            ctx.grads = None
            # one host read of grad_output (the loss's backward runs first, so nothing waits): the
            # usual loss.backward() (grad_output = 1) hands out the stored gradients without a pass
            s = float(grad_loss)
            gh = _hand_out(grads.hidden, s, hidden.dtype) if needs.hidden else None
            gw = _hand_out(grads.weight, s, weight.dtype) if needs.weight else None
            gb = _hand_out(grads.bias, s, bias.dtype) if (needs.bias and bias is not None) else None
            g_rt = _hand_out(grads.ref_tok, s, ref_tok.dtype) if needs.ref_tok else None
            g_rs = _hand_out(grads.ref_seq, s, ref_seq.dtype) if (needs.ref_seq and ref_seq is not None) else None
        if grad_logp is not None or grad_lse is not None or grad_ent is not None:
            eh, ew, eb = stats_grads(params, hidden, weight, bias, labels, lse_v, ent_v, tok_idx, grad_logp,
                                     grad_lse, grad_ent, needs)
            gh = _add(gh, None if eh is None else eh.to(hidden.dtype))
            gw = _add(gw, None if ew is None else ew.to(weight.dtype))
            gb = _add(gb, None if eb is None else eb.to(bias.dtype))
        return gh, gw, gb, None, g_rt, g_rs, None, None

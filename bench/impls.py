"""The implementations each suite compares, behind one small interface.

An :class:`Impl` builds, for a :class:`~bench.common.Case` and its inputs, a ``loss()`` callable
returning the scalar loss (its forward); :func:`runner` turns it into the timed call of the
case's mode (``fwd``: the loss; ``fwdbwd``: the loss and its backward into ``hidden.grad`` and
``weight.grad``). Peers that cannot run here say why in ``available`` (missing package, no CUDA)
and the suites report them as SKIPPED with that reason.

Suites and what "loss" means in each (like with like):

* ``ce``: mean NLL over non-ignored tokens of ``softmax(hidden @ weight.T)``.
* ``div``: ``fk.loss(..., divergence=d, level="sequence", values="free")`` on rows of ``seq``
  tokens, against the same math from full logits and the paper's literal Table 4 form.
* ``dpo``: sigmoid DPO loss (beta 0.1) of summed chosen/rejected log-probs; rows ``[0, B)`` are
  the chosen answers, ``[B, 2B)`` the rejected ones; reference log-probs 0 (Liger's
  ``use_ref_model=False``), so that all peers compute the same number.
* ``scaling``: the ``ce`` loss for fk backends and naive torch over token / vocabulary sweeps.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import Case, clear_grads

DPO_BETA = 0.1
DIV_BETA = 0.1


@dataclass(frozen=True)
class Impl:
    """``available(device_type) -> (ok, reason)``; ``build(case, inputs) -> loss()``.

    ``fused_backward``: computes the gradients inside its forward (Liger's chunked losses), so
    its "fwd" time already contains the backward. ``raw``: ``build`` returns the timed call for
    the case's mode itself (the GEMM floor). ``context``: a context manager factory the whole
    timed call runs in (e.g. ``triton_options(deterministic=False)``, which the backward reads
    too)."""

    name: str
    label: str
    available: Callable[[str], Tuple[bool, str]]
    build: Callable[[Case, Dict[str, torch.Tensor]], Callable[[], torch.Tensor]]
    fused_backward: bool = False
    raw: bool = False
    context: Optional[Callable[[], ContextManager]] = None


def runner(impl: Impl, case: Case, inputs: Dict[str, torch.Tensor]) -> Callable[[], object]:
    """The call that is timed: forward only, or forward + backward (grads reset first)."""
    fn = impl.build(case, inputs)
    if impl.raw or case.mode == "fwd":
        call = fn
    else:
        def call():
            clear_grads(inputs)
            loss = fn()
            loss.backward()
            return loss
    if impl.context is None:
        return call

    def in_context():
        with impl.context():
            return call()
    return in_context


# ---------------------------------------------------------------------------------------------
# availability helpers
# ---------------------------------------------------------------------------------------------

def _always(device_type: str) -> Tuple[bool, str]:
    return True, "available"


def _has_module(mod: str) -> Tuple[bool, str]:
    try:
        __import__(mod)
        return True, "available"
    except Exception as e:
        return False, f"{mod} not importable: {type(e).__name__}: {e}"


def _needs(mod: str, cuda: bool = False):
    def check(device_type: str) -> Tuple[bool, str]:
        if cuda and device_type != "cuda":
            return False, "needs a CUDA device"
        return _has_module(mod)
    return check


def fk_backends(device_type: str) -> Dict[str, str]:
    """All registered fk backends -> "available" or the reason they are not (dynamic)."""
    import fdiv_kernels as fk
    return fk.available_backends(device_type)


# ---------------------------------------------------------------------------------------------
# ce suite
# ---------------------------------------------------------------------------------------------

def _n_valid(labels: torch.Tensor) -> torch.Tensor:
    return (labels != -100).sum().clamp(min=1)


def naive_ce(hidden, weight, labels):
    """Full logits, float32 log-softmax, gather, masked mean (what an unfused trainer does)."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1)
    safe = labels.clamp(min=0)
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return -(tok * (labels != -100)).sum() / _n_valid(labels)


def _build_fk_ce(backend: str):
    def build(case, x):
        import fdiv_kernels as fk
        h, w, y = x["hidden"], x["weight"], x["labels"]
        return lambda: fk.loss(h, w, y, backend=backend).loss  # divergence="sft": the mean NLL
    return build


def _build_naive(case, x):
    return functools.partial(naive_ce, x["hidden"], x["weight"], x["labels"])


@functools.lru_cache(maxsize=None)
def _compiled_naive():
    return torch.compile(naive_ce, dynamic=False)


def _build_naive_compiled(case, x):
    return functools.partial(_compiled_naive(), x["hidden"], x["weight"], x["labels"])


def _build_cce(case, x):
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if case.device == "cuda" else "torch_compile"
    h, w, y = x["hidden"], x["weight"], x["labels"]
    return lambda: linear_cross_entropy(h, w, y, ignore_index=-100, reduction="mean", impl=impl)


@functools.lru_cache(maxsize=None)
def _liger_chunked_ce_fn():
    """Liger's chunked torch machinery (``LigerFusedLinearDistillationBase``: chunks of rows (see
    :func:`liger_chunk_rows`),
    ``torch.func.grad_and_value`` + ``torch.compile`` per chunk, gradients formed in the forward)
    reduced to its hard (cross-entropy) loss: ``weight_hard_loss=1``, ``weight_soft_loss=0``, and a
    1-wide dummy teacher so that no teacher GEMM is done. liger_kernel has no plain CE outside
    Triton; this is the code path its CPU users get for chunked losses."""
    from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase

    class LigerChunkedCE(LigerFusedLinearDistillationBase):
        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, **kwargs):
            return student_logits.new_zeros(())

        @classmethod
        def forward(cls, ctx, hidden, weight, labels, teacher_hidden, teacher_weight, chunk_size):
            return super().forward(cls=cls, ctx=ctx, student_input=hidden, student_weight=weight,
                                   teacher_input=teacher_hidden, teacher_weight=teacher_weight, target=labels,
                                   chunk_size=chunk_size, weight_hard_loss=1.0, weight_soft_loss=0.0,
                                   compiled=True)

        @staticmethod
        def backward(ctx, grad_output):
            g = LigerFusedLinearDistillationBase.backward(ctx, grad_output)
            return g[0], g[1], None, None, None, None

    return LigerChunkedCE


def _build_liger_ce(case, x):
    h, w, y = x["hidden"], x["weight"], x["labels"]
    if case.device == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        return lambda: mod(w, h, y)
    fn = _liger_chunked_ce_fn()
    th = h.new_zeros(h.shape[0], 1)
    tw = w.new_zeros(1, 1)
    return lambda: fn.apply(h, w, y, th, tw, liger_chunk_rows(h.shape[0]))


def liger_chunk_rows(n: int) -> int:
    """Liger's default chunk is 1024 rows; the CPU shapes have a quarter of the design doc's
    tokens, so use ``min(1024, n // 4)`` to keep at least 4 chunks, as at shape A (4096 tokens)."""
    return max(1, min(1024, n // 4))


def _build_gemm(case, x):
    """The floor: forward = one GEMM producing the logits; fwd+bwd = that GEMM plus the two of
    the backward (grad_hidden = G @ W, grad_weight = G.T @ H) with a fixed logit gradient G, all
    of the same shape as the loss's ([N, H] x [H, V]), no epilogue. Row batches are flattened."""
    h, w = x["hidden"].detach(), x["weight"].detach()
    h = h.reshape(-1, h.shape[-1])
    if case.mode == "fwd":
        return lambda: h @ w.T
    g = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device).normal_()

    def three():
        z = h @ w.T
        return z, g @ w, g.T @ h
    return three


@contextlib.contextmanager
def _two_pass(deterministic: bool = True):
    """The two-pass path (``fk.token_stats`` + recompute backward): the Triton flash kernels."""
    from fdiv_kernels import config as fk_config
    from fdiv_kernels.kernels.triton_backend import triton_options
    with fk_config(single_pass=False), triton_options(deterministic=deterministic):
        yield


def fk_impls(device_type: str, label: str, build_for: Callable[[str], Callable]) -> List[Impl]:
    """One ``fk[<backend>]`` per registered backend (available or with the registry's reason: the
    one-pass path where the backend has chunk kernels), plus where triton runs on CUDA its
    two-pass (flash, recompute) kernels: ``fk[triton-flash]`` (deterministic backward) and
    ``fk[triton-flash-atomic]`` (the atomics backward)."""
    out = []
    for name, status in fk_backends(device_type).items():
        available = (lambda s: (lambda d: (s == "available", s)))(status)
        out.append(Impl(f"fk[{name}]", f"{label}, backend={name!r}", available=available, build=build_for(name)))
        if name == "triton" and device_type == "cuda":
            out.append(Impl("fk[triton-flash]", f"{label}, backend='triton', two-pass (flash kernels, deterministic)",
                            available=available, build=build_for(name), context=_two_pass))
            out.append(Impl("fk[triton-flash-atomic]", f"{label}, backend='triton', two-pass, atomics backward",
                            available=available, build=build_for(name),
                            context=functools.partial(_two_pass, deterministic=False)))
    return out


GEMM_FLOOR = Impl("gemm", "bare GEMM floor (fwd: 1 matmul; fwd+bwd: 3 matmuls, no epilogue)", _always, _build_gemm,
                  raw=True)
"""The ``gemm`` row of every suite: what "x GEMM floor" in the reports divides by."""


def ce_impls(device_type: str) -> List[Impl]:
    out = fk_impls(device_type, "fk.loss fused (sft)", _build_fk_ce)
    liger_label = ("Liger LigerFusedLinearCrossEntropyLoss (Triton)" if device_type == "cuda" else
                   "Liger chunked torch (FusedLinearDistillationBase, hard loss only, compiled)")
    cce_label = "cut-cross-entropy impl='cce' (Triton)" if device_type == "cuda" else \
        "cut-cross-entropy impl='torch_compile'"
    out += [
        Impl("naive", "naive eager torch: full logits + log_softmax + gather", _always, _build_naive),
        Impl("naive+compile", "torch.compile of naive", _always, _build_naive_compiled),
        Impl("liger", liger_label, _needs("liger_kernel"), _build_liger_ce, fused_backward=device_type != "cuda"),
        Impl("cce", cce_label, _needs("cut_cross_entropy"), _build_cce),
        GEMM_FLOOR,
    ]
    return out


# ---------------------------------------------------------------------------------------------
# div suite (sequence level, rows of case.seq tokens)
# ---------------------------------------------------------------------------------------------

def _ref_rows(case: Case, x) -> torch.Tensor:
    """Per-row reference log-probs: a plausible value (about -2 nats per supervised token)."""
    rows = x["labels"].shape[0]
    g = torch.Generator().manual_seed(1)
    sup = (x["labels"] != -100).sum(1).float().cpu()
    return (-2.0 * sup + torch.randn(rows, generator=g)).to(x["labels"].device)


def _build_fk_div(backend: str):
    def build(case, x):
        import fdiv_kernels as fk
        ref = _ref_rows(case, x)
        d = case.extra["divergence"]
        return lambda: fk.loss(x["hidden"], x["weight"], x["labels"], divergence=d, ref_logp=ref, beta=DIV_BETA,
                               level="sequence", values="free", backend=backend).loss
    return build


def _build_fk_div_logits(case, x):
    import fdiv_kernels as fk
    ref = _ref_rows(case, x)
    d = case.extra["divergence"]
    return lambda: fk.loss(logits=x["hidden"] @ x["weight"].T, labels=x["labels"], divergence=d, ref_logp=ref,
                           beta=DIV_BETA, level="sequence", values="free").loss


def paper_form_for(divergence: str):
    """``(fn, label)`` of the literal form for ``divergence`` or ``(None, reason)``."""
    try:
        from fdiv_kernels.reference import paper_forms as pf
    except Exception as e:
        return None, f"fdiv_kernels.reference.paper_forms not importable ({type(e).__name__}: {e})"
    import fdiv_kernels as fk
    name = fk.get_divergence(divergence).name
    if name in pf.PAPER_FORMS:
        return pf.PAPER_FORMS[name], f"paper Table 4 form ({name}), literal torch"
    if name in getattr(pf, "NAIVE_FORMS", {}):
        return pf.NAIVE_FORMS[name], f"naive literal form ({name}), no Table 4 row"
    return None, f"the paper gives no Table 4 form for {name!r} (and paper_forms has no naive one)"


def _build_paper_div(case, x):
    fn, _ = paper_form_for(case.extra["divergence"])
    ref = _ref_rows(case, x)
    h, w, y = x["hidden"], x["weight"], x["labels"]
    mask = y != -100
    t = torch.arange(y.shape[1], device=y.device)
    first = torch.where(mask, t, y.shape[1]).amin(1)
    last = torch.where(mask, t, -1).amax(1)

    def loss():
        logits = (h @ w.T).float()
        logp_all = torch.log_softmax(logits, -1)
        lse = torch.logsumexp(logits, -1)
        logp = (logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)
        v_s0 = lse.gather(1, first[:, None]).squeeze(1)
        v_st = lse.gather(1, last[:, None]).squeeze(1)
        return fn(logp, ref, v_s0, v_st, DIV_BETA).mean()
    return loss


def div_impls(device_type: str, divergence: str) -> List[Impl]:
    out = fk_impls(device_type, "fk.loss fused", _build_fk_div)
    fn, why = paper_form_for(divergence)
    out += [
        Impl("fk(logits)", "fk.loss(logits=h @ W.T): same math, unfused", _always, _build_fk_div_logits),
        Impl("paper", why, (lambda d: (fn is not None, why)), _build_paper_div),
        GEMM_FLOOR,
    ]
    return out


# ---------------------------------------------------------------------------------------------
# dpo suite
# ---------------------------------------------------------------------------------------------

def _build_fk_dpo(backend: str):
    def build(case, x):
        import fdiv_kernels as fk
        zero = torch.zeros(x["labels"].shape[0], device=x["labels"].device)  # reference log-probs 0
        mod = fk.nn.FusedLinearDPOLoss(beta=DPO_BETA, loss_type="sigmoid", backend=backend)
        return lambda: mod(x["hidden"], x["weight"], x["labels"], ref_logp=zero)
    return build


def _build_trl_dpo(case, x):
    """TRL's DPOTrainer path: full logits -> selective_log_softmax (log_softmax + gather) ->
    masked sum per row -> -logsigmoid(beta * margin)."""
    from trl.trainer.utils import selective_log_softmax
    h, w, y = x["hidden"], x["weight"], x["labels"]
    b = y.shape[0] // 2
    mask = y != -100

    def loss():
        logits = h @ w.T
        logps = (selective_log_softmax(logits, y.clamp(min=0)) * mask).sum(-1)
        margin = (logps[:b] - logps[b:])
        return -F.logsigmoid(DPO_BETA * margin).mean()
    return loss


def _build_liger_dpo(case, x):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    mod = LigerFusedLinearDPOLoss(ignore_index=-100, beta=DPO_BETA, compute_nll_loss=False, compiled=True,
                                  use_ref_model=False, average_log_prob=False, chunk_size=1, loss_type="sigmoid")
    h, w, y = x["hidden"], x["weight"], x["labels"]
    return lambda: mod(w, h, y)[0]


def dpo_impls(device_type: str) -> List[Impl]:
    out = fk_impls(device_type, "fk.nn.FusedLinearDPOLoss", _build_fk_dpo)
    out += [
        GEMM_FLOOR,
        Impl("trl", "TRL way: full logits, selective_log_softmax, sum, sigmoid loss", _needs("trl"), _build_trl_dpo),
        Impl("liger", "Liger LigerFusedLinearDPOLoss (chunked torch, compiled)", _needs("liger_kernel"),
             _build_liger_dpo, fused_backward=True),
    ]
    return out


def scaling_impls(device_type: str) -> List[Impl]:
    keep = {"naive"}
    return [i for i in ce_impls(device_type) if i.name.startswith("fk[") or i.name in keep]


def impls_for(case: Case) -> List[Impl]:
    if case.suite == "ce":
        return ce_impls(torch.device(case.device).type)
    if case.suite == "scaling":
        return scaling_impls(torch.device(case.device).type)
    if case.suite == "div":
        return div_impls(torch.device(case.device).type, case.extra["divergence"])
    if case.suite == "dpo":
        return dpo_impls(torch.device(case.device).type)
    raise ValueError(f"unknown suite {case.suite!r}")


def get_impl(case: Case) -> Impl:
    for impl in impls_for(case):
        if impl.name == case.impl:
            return impl
    raise KeyError(f"no implementation {case.impl!r} in suite {case.suite!r}")

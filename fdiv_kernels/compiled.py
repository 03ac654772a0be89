"""The compile layer: the autograd layer's steps as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the API layer (:mod:`fdiv_kernels.api`)
keeps its Python code (option checks, spec building, the spec's math on the two-pass path: all
traced into the graph) and takes its primitives from :data:`OPS` instead of the eager
:data:`fdiv_kernels.autograd.evaluate.EAGER`. Each op wraps a plain function of the autograd
layer at the implementation boundary (flash-attention's pattern), with a registered backward
that calls another plain function; no op body needs autograd, so none touches torch internals:

* ``fdiv_kernels::fused_loss``: :func:`fdiv_kernels.autograd.fused.fused_forward` (chunk planning,
  backend resolution, the label and data checks included): the loss, the token statistics and the
  gradients at ``grad_output = 1``; its backward multiplies them by ``grad_output``. When the
  ``logp``/``lse``/``entropy`` outputs have gradients too, ``fused_loss_stats_backward`` adds theirs
  (:func:`fdiv_kernels.autograd.fused.stats_grads`).
* ``fdiv_kernels::token_stats``: :func:`fdiv_kernels.autograd.token_stats.token_stats_forward`
  (``fk.token_stats``, ``fk.sequence_logp``, the two-pass specs and every no-grad call); backward
  ``token_stats_backward`` (the backend's backward kernels).
* ``fdiv_kernels::distill_loss``: :func:`fdiv_kernels.autograd.distill.distill_forward` (backend
  resolution and the data check included): the distillation loss, its per-token values and the
  student's gradients at ``grad_output = 1``, scaled by ``grad_output`` in its backward; for
  ``reduction="none"`` the backward is ``distill_loss_backward`` (the pass again, each token weighted
  by its ``grad_output``).
* ``check_labels``, ``check_token_stats``, ``check_loss``, ``check_pairs``, ``check_class_data``: the data checks of
  :mod:`fdiv_kernels.checks` on the traced paths. Each returns a copy of what it checked, which
  the rest of the graph uses, so the check can neither be removed as dead code nor reordered after
  its use (the labels are checked before the ``gather`` that reads them).

So under compile every data check of eager mode still runs, with the same messages. Specs reach
the ops as a string (:func:`encode_spec`): the ``repr`` of the spec's class name and its fields,
registry entries by name, decoded once per string (cached). Head options are scalar arguments;
the backend is resolved inside the ops, at run time, exactly as in eager mode. Knobs
(:mod:`fdiv_kernels.knobs`) that choose a path are read when the graph is traced.
"""

from __future__ import annotations

import ast
import functools
from typing import Optional, Tuple

import torch

from . import checks, specs
from .autograd.distill import DistillNeeds, distill_forward, explain_distill, prepare_distill
from .autograd.evaluate import Primitives, explain_loss
from .autograd.fused import Needs, flat_rows, fused_forward, prepare, stats_grads
from .autograd.token_stats import (TokenStatsParams, TokenStatsSaved, supervised_index, token_stats_backward,
                                   token_stats_forward)
from .formulas.divergences import Divergence, get_divergence
from .formulas.preference import explain_pair
from .formulas.primal import PrimalLoss
from .kernels.backends import resolve_backend

__all__ = ["NAMESPACE", "OPS", "compiling", "decode_spec", "encode_spec"]

NAMESPACE = "fdiv_kernels"
_SCALARS = (str, int, float, bool, type(None))


def compiling() -> bool:
    """True while dynamo traces (the API layer then takes :data:`OPS`)."""
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# Specs as strings
# ---------------------------------------------------------------------------------------------

def encode_spec(spec) -> str:
    """``repr((class name, ((field, value), ...)))`` of a frozen spec dataclass (scalars and tuples of
    scalars: a DPO spec's loss types and weights, KTO's desirable flags); registry entries
    (a :class:`~fdiv_kernels.Divergence` or primal loss) by their ``name``. Traceable by dynamo."""
    items = []
    for name in spec.__dataclass_fields__:
        value = getattr(spec, name)
        if not (isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))):
            value = _registered_name(name, value)
        items.append((name, value))
    return repr((type(spec).__name__, tuple(items)))


def _registered_name(field: str, entry) -> str:
    """The registry name of a spec's divergence / primal loss; an object that the registry does not
    hold under that name cannot be passed by name, so it is refused (never silently replaced)."""
    if isinstance(entry, Divergence):
        registered = get_divergence(entry.name, entry.supports[0]) if entry.supports else None
    elif isinstance(entry, PrimalLoss):
        registered = get_divergence(entry.name, "primal").primal
    else:
        registered = None
    if registered is not entry:
        raise ValueError(f"{field}={entry!r} is not a registered entry: under torch.compile specs reach the kernels "
                         f"by name; register it first (fk.register_divergence)")
    return entry.name


@functools.cache
def decode_spec(text: str):
    """The spec :func:`encode_spec` wrote (validated again by its constructor)."""
    cls_name, items = ast.literal_eval(text)
    return getattr(specs, cls_name)(**dict(items))


def _head(softcap: Optional[float], temperature: float, backend: str) -> specs.HeadSpec:
    return specs.HeadSpec(softcap, temperature, backend)


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stat_like(labels: torch.Tensor, hidden: torch.Tensor, present: bool = True) -> torch.Tensor:
    """An output of the statistics' shape (shape of ``labels``, the compute dtype), or ``[0]``."""
    shape = labels.shape if present else (0,)
    return torch.empty(shape, dtype=_compute_dtype(hidden), device=labels.device)


def _or_empty(t: Optional[torch.Tensor], device) -> torch.Tensor:
    return _empty(device) if t is None else t


def _given(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``None`` for the ``[0]`` placeholder of an absent tensor."""
    return None if t.numel() == 0 and t.dim() == 1 else t


# ---------------------------------------------------------------------------------------------
# The fused loss
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::fused_loss", mutates_args=())
def fused_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                  ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], spec: str, softcap: Optional[float],
                  temperature: float, backend: str, ignore_index: int, return_entropy: bool, need_h: bool,
                  need_w: bool, need_b: bool, need_ref_tok: bool, need_ref_seq: bool,
                  class_weight: Optional[torch.Tensor] = None) -> Tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor]:
    """``(loss, logp, lse, entropy | [0], grad_hidden, grad_weight, grad_bias, grad_ref_tok,
    grad_ref_seq)`` (each gradient at ``grad_output = 1`` or ``[0]``): the fused loss with its label
    and data checks (``class_weight``: the cross-entropy options' ``c [V]`` or None)."""
    checks.check_label_values(labels, weight.shape[0], ignore_index)
    loss_spec, head = decode_spec(spec), _head(softcap, temperature, backend)
    params = prepare(loss_spec, head, hidden, weight, labels, ignore_index, return_entropy)
    needs = Needs(need_h, need_w, need_b and bias is not None, need_ref_tok, need_ref_seq and ref_seq is not None)
    res = fused_forward(hidden, weight, bias, labels, ref_tok, ref_seq, params, needs, class_weight)
    mask2 = (labels != ignore_index).reshape(flat_rows(labels))
    checks.check_loss_data(res.loss, res.logp, res.lse, res.entropy, labels, mask2, ref_tok, ref_seq, head,
                           explain_loss(loss_spec, res.logp, res.lse, mask2, ref_tok, ref_seq), res.finite)
    dev = labels.device
    return (res.loss.clone(), res.logp, res.lse, _or_empty(res.entropy, dev)) + tuple(
        _or_empty(g, dev) for g in res.grads)


def _grad_like(t: Optional[torch.Tensor], need: bool, device, dtype=None) -> torch.Tensor:
    if not need or t is None:
        return _empty(device)
    return torch.empty(t.shape, dtype=dtype or _compute_dtype(t), device=t.device)


@fused_loss_op.register_fake
def _(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend, ignore_index,
      return_entropy, need_h, need_w, need_b, need_ref_tok, need_ref_seq, class_weight=None):
    dev, cdt = labels.device, _compute_dtype(hidden)
    return (torch.empty((), dtype=cdt, device=dev), _stat_like(labels, hidden), _stat_like(labels, hidden),
            _stat_like(labels, hidden, return_entropy), _grad_like(hidden, need_h, dev, cdt),
            _grad_like(weight, need_w, dev, cdt), _grad_like(bias, need_b, dev, cdt),
            _grad_like(ref_tok if ref_tok.dim() else None, need_ref_tok, dev, cdt),
            _grad_like(ref_seq, need_ref_seq, dev, cdt))


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ref_tok, ref_seq = inputs[:6]
    _, _, lse, ent, gh, gw, gb, g_rt, g_rs = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(gh, gw, gb, g_rt, g_rs)
    if not inputs[11]:  # return_entropy
        ctx.mark_non_differentiable(ent)
    ctx.save_for_backward(hidden, weight, bias, labels, ref_tok, ref_seq, lse, ent, gh, gw, gb, g_rt, g_rs)
    ctx.options = inputs[6:12]


def _scaled(g: torch.Tensor, like: Optional[torch.Tensor], need: bool, g_loss: Optional[torch.Tensor]):
    """``g * grad_output`` in ``like``'s dtype (None where not needed)."""
    if not need or like is None or g_loss is None:
        return None
    return (g * g_loss).to(like.dtype)


def _fused_backward(ctx, g_loss, g_logp, g_lse, g_ent, *_):
    hidden, weight, bias, labels, ref_tok, ref_seq, lse, ent, gh, gw, gb, g_rt, g_rs = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [_scaled(g, t, n, g_loss) for g, t, n in zip((gh, gw, gb, g_rt, g_rs),
                                                        (hidden, weight, bias, ref_tok, ref_seq),
                                                        (needs[0], needs[1], needs[2], needs[4], needs[5]))]
    if g_logp is not None or g_lse is not None or g_ent is not None:
        extra = fused_loss_stats_backward(hidden, weight, bias, labels, lse, ent, g_logp, g_lse, g_ent,
                                          *ctx.options, needs[0], needs[1], needs[2])
        for i, (e, t) in enumerate(zip(extra, (hidden, weight, bias))):
            if needs[i] and t is not None:
                e = e.to(t.dtype)
                grads[i] = e if grads[i] is None else grads[i] + e
    gh_out, gw_out, gb_out, g_rt_out, g_rs_out = grads
    return (gh_out, gw_out, gb_out, None, g_rt_out, g_rs_out) + (None,) * 12


fused_loss_op.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op(f"{NAMESPACE}::fused_loss_stats_backward", mutates_args=())
def fused_loss_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                              grad_logp: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                              grad_entropy: Optional[torch.Tensor], spec: str, softcap: Optional[float],
                              temperature: float, backend: str, ignore_index: int, return_entropy: bool,
                              need_h: bool, need_w: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """The gradients of :func:`fused_loss_op`'s ``logp``/``lse``/``entropy`` outputs (compute dtype,
    ``[0]`` where not needed): :func:`fdiv_kernels.autograd.fused.stats_grads` with the call's plan."""
    params = prepare(decode_spec(spec), _head(softcap, temperature, backend), hidden, weight, labels, ignore_index,
                     return_entropy)
    tok_idx = params.plan.tok_idx if params.plan is not None else supervised_index(labels, ignore_index)

    def pick(t):
        flat = t.reshape(-1)
        return flat if tok_idx is None else flat.index_select(0, tok_idx)

    ent_v = pick(entropy) if return_entropy else None
    needs = Needs(need_h, need_w, need_b and bias is not None)
    grads = stats_grads(params, hidden, weight, bias, labels, pick(lse), ent_v, tok_idx, grad_logp, grad_lse,
                        grad_entropy if return_entropy else None, needs)
    return tuple(_or_empty(g, labels.device) for g in grads)


@fused_loss_stats_backward.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy, spec, softcap, temperature,
      backend, ignore_index, return_entropy, need_h, need_w, need_b):
    dev, cdt = labels.device, _compute_dtype(hidden)
    return _grad_like(hidden, need_h, dev, cdt), _grad_like(weight, need_w, dev, cdt), _grad_like(bias, need_b, dev, cdt)


def fused_loss(spec, hidden, weight, bias, labels, ref_tok, ref_seq, head: specs.HeadSpec, ignore_index: int,
               return_entropy: bool, class_weight: Optional[torch.Tensor] = None, return_predicted: bool = False):
    """The :class:`~fdiv_kernels.autograd.evaluate.Primitives` ``fused_loss`` through the op (no
    predicted tokens: ``return_token_accuracy`` is refused under compile by the API's check)."""
    out = fused_loss_op(hidden, weight, bias, labels, ref_tok, ref_seq, encode_spec(spec), head.softcap,
                        head.temperature, head.backend, ignore_index, bool(return_entropy), hidden.requires_grad,
                        weight.requires_grad, bias is not None and bias.requires_grad, ref_tok.requires_grad,
                        ref_seq is not None and ref_seq.requires_grad, class_weight)
    loss, logp, lse, ent = out[:4]
    return loss, logp, lse, (ent if return_entropy else None), None


# ---------------------------------------------------------------------------------------------
# The token statistics
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::token_stats", mutates_args=())
def token_stats_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                   softcap: Optional[float], temperature: float, backend: str, ignore_index: int,
                   return_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy | [0])`` of :func:`fdiv_kernels.autograd.token_stats.token_stats_forward`."""
    params = TokenStatsParams(_head(softcap, temperature, backend), ignore_index, return_entropy)
    logp, lse, ent, _ = token_stats_forward(hidden, weight, bias, labels, params)
    return logp, lse, _or_empty(ent, labels.device)


@token_stats_op.register_fake
def _(hidden, weight, bias, labels, softcap, temperature, backend, ignore_index, return_entropy):
    return _stat_like(labels, hidden), _stat_like(labels, hidden), _stat_like(labels, hidden, return_entropy)


def _token_stats_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    if not inputs[8]:
        ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*inputs[:4], output[1], output[2])
    ctx.options = inputs[4:]


def _token_stats_backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = token_stats_backward_op(hidden, weight, bias, labels, lse, ent, g_logp, g_lse, g_ent, *ctx.options,
                                    *needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 6


token_stats_op.register_autograd(_token_stats_backward, setup_context=_token_stats_setup)


@torch.library.custom_op(f"{NAMESPACE}::token_stats_backward", mutates_args=())
def token_stats_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                            grad_logp: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                            grad_entropy: Optional[torch.Tensor], softcap: Optional[float], temperature: float,
                            backend: str, ignore_index: int, return_entropy: bool, need_h: bool, need_w: bool,
                            need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`token_stats_op`: the backend's backward kernels (the backend and its
    options resolved again here)."""
    head = _head(softcap, temperature, backend)
    params = TokenStatsParams(head, ignore_index, return_entropy)
    idx = supervised_index(labels, ignore_index)

    def pick(t):
        flat = t.reshape(-1)
        return flat if idx is None else flat.index_select(0, idx)

    chosen = resolve_backend(backend, hidden)
    options = chosen.options() if chosen.options is not None else None
    saved = TokenStatsSaved(idx, pick(lse), pick(entropy) if return_entropy else None, chosen, options)
    grads = token_stats_backward(hidden, weight, bias, labels, saved, params, grad_logp, grad_lse,
                                 grad_entropy if return_entropy else None, (need_h, need_w, need_b))
    return tuple(_or_empty(g, labels.device) for g in grads)


@token_stats_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy, softcap, temperature, backend,
      ignore_index, return_entropy, need_h, need_w, need_b):
    dev = labels.device
    return (_grad_like(hidden, need_h, dev, hidden.dtype), _grad_like(weight, need_w, dev, weight.dtype),
            _grad_like(bias, need_b, dev, None if bias is None else bias.dtype))


def token_stats(hidden, weight, bias, labels, params: TokenStatsParams):
    """The :class:`~fdiv_kernels.autograd.evaluate.Primitives` ``token_stats`` through the op."""
    head = params.head
    logp, lse, ent = token_stats_op(hidden, weight, bias, labels, head.softcap, head.temperature, head.backend,
                                    params.ignore_index, bool(params.return_entropy))
    return logp, lse, (ent if params.return_entropy else None)


# ---------------------------------------------------------------------------------------------
# Data checks of the traced paths (each returns a copy of what it checked)
# ---------------------------------------------------------------------------------------------

def _identity_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)


def _pass_through(n_grads: int, n_inputs: int):
    """The backward of a check: the gradients of the first ``n_grads`` inputs pass unchanged."""
    def backward(ctx, *grads):
        return tuple(grads[:n_grads]) + (None,) * (n_inputs - n_grads)
    return backward


@torch.library.custom_op(f"{NAMESPACE}::check_labels", mutates_args=())
def check_labels_op(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """:func:`fdiv_kernels.checks.check_label_values`; returns a copy of ``labels``."""
    checks.check_label_values(labels, vocab_size, ignore_index)
    return labels.clone()


@check_labels_op.register_fake
def _(labels, vocab_size, ignore_index):
    return torch.empty_like(labels)


@torch.library.custom_op(f"{NAMESPACE}::check_class_data", mutates_args=())
def check_class_data_op(c: torch.Tensor, bias: Optional[torch.Tensor], smoothing: float) -> torch.Tensor:
    """:func:`fdiv_kernels.checks.check_class_data`; returns a copy of ``c``."""
    checks.check_class_data(c, bias, smoothing)
    return c.clone()


@check_class_data_op.register_fake
def _(c, bias, smoothing):
    return torch.empty_like(c)


@torch.library.custom_op(f"{NAMESPACE}::check_token_stats", mutates_args=())
def check_token_stats_op(logp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, labels: torch.Tensor,
                         softcap: Optional[float], temperature: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """:func:`fdiv_kernels.checks.check_token_stats`; returns copies of the statistics."""
    checks.check_token_stats(logp, lse, _given(entropy), labels, _head(softcap, temperature, "auto"))
    return logp.clone(), lse.clone(), entropy.clone()


@check_token_stats_op.register_fake
def _(logp, lse, entropy, labels, softcap, temperature):
    return torch.empty_like(logp), torch.empty_like(lse), torch.empty_like(entropy)


check_token_stats_op.register_autograd(_pass_through(3, 6), setup_context=_identity_setup)


@torch.library.custom_op(f"{NAMESPACE}::check_loss", mutates_args=())
def check_loss_op(loss: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                  labels: torch.Tensor, ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], spec: str,
                  softcap: Optional[float], temperature: float, ignore_index: int) -> torch.Tensor:
    """:func:`fdiv_kernels.checks.check_loss_data`; returns a copy of ``loss``."""
    mask2 = (labels != ignore_index).reshape(flat_rows(labels))
    checks.check_loss_data(loss, logp, lse, _given(entropy), labels, mask2, ref_tok, ref_seq,
                           _head(softcap, temperature, "auto"), explain_loss(decode_spec(spec), logp, lse, mask2, ref_tok, ref_seq))
    return loss.clone()


@check_loss_op.register_fake
def _(loss, logp, lse, entropy, labels, ref_tok, ref_seq, spec, softcap, temperature, ignore_index):
    return torch.empty_like(loss)


check_loss_op.register_autograd(_pass_through(1, 11), setup_context=_identity_setup)


@torch.library.custom_op(f"{NAMESPACE}::check_pairs", mutates_args=())
def check_pairs_op(losses: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor],
                   rr: Optional[torch.Tensor], spec: str) -> torch.Tensor:
    """:func:`fdiv_kernels.checks.check_pairs`; returns a copy of ``losses``."""
    options = decode_spec(spec)
    refs = (("ref_chosen", rc), ("ref_rejected", rr)) if options.needs_reference else ()
    checks.check_pairs(losses, refs, lambda: explain_pair(pc, pr, rc, rr, losses, options))
    return losses.clone()


@check_pairs_op.register_fake
def _(losses, pc, pr, rc, rr, spec):
    return torch.empty_like(losses)


check_pairs_op.register_autograd(_pass_through(1, 6), setup_context=_identity_setup)


def _entropy_arg(entropy: Optional[torch.Tensor], lse: torch.Tensor) -> torch.Tensor:
    return lse.new_empty(0) if entropy is None else entropy


def _check_token_stats(logp, lse, entropy, labels, head):
    logp, lse, ent = check_token_stats_op(logp, lse, _entropy_arg(entropy, lse), labels, head.softcap,
                                          head.temperature)
    return logp, lse, (None if entropy is None else ent)


def _check_loss(spec, loss, logp, lse, entropy, labels, ref_tok, ref_seq, head, ignore_index):
    return check_loss_op(loss, logp, lse, _entropy_arg(entropy, lse), labels, ref_tok, ref_seq, encode_spec(spec),
                         head.softcap, head.temperature, ignore_index)


def _check_pairs(spec, losses, pc, pr, rc, rr):
    return check_pairs_op(losses, pc, pr, rc, rr, encode_spec(spec))


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::distill_loss", mutates_args=())
def distill_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                    teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                    teacher_bias: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor], spec: str,
                    backend: str, ignore_index: int, need_h: bool, need_w: bool,
                    need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """``(loss, div, nll, grad_hidden, grad_weight, grad_bias)`` (gradients at ``grad_output = 1`` or
    ``[0]``; none for ``reduction="none"``, whose backward is :func:`distill_loss_backward_op`): the
    distillation loss with its data check."""
    dspec = decode_spec(spec)
    params = prepare_distill(dspec, _head(None, 1.0, backend), hidden, ignore_index)
    res = distill_forward(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                          params, DistillNeeds(need_h, need_w, need_b and bias is not None))
    checks.check_distill_data(res.loss, res.finite, explain_distill(
        dspec, hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, res.div,
        res.nll, ignore_index))
    dev = labels.device
    return (res.loss.clone(), res.div, res.nll, _or_empty(res.grad_hidden, dev), _or_empty(res.grad_weight, dev),
            _or_empty(res.grad_bias, dev))


def _distill_fake(hidden, weight, bias, labels, spec, need_h, need_w, need_b, with_grads: bool):
    dev, cdt = labels.device, _compute_dtype(hidden)
    return (_grad_like(hidden, with_grads and need_h, dev, cdt), _grad_like(weight, with_grads and need_w, dev, cdt),
            _grad_like(bias, with_grads and need_b, dev, cdt))


@distill_loss_op.register_fake
def _(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, spec, backend,
      ignore_index, need_h, need_w, need_b):
    per_token = decode_spec(spec).reduction == "none"
    loss = _stat_like(labels, hidden) if per_token else torch.empty((), dtype=_compute_dtype(hidden),
                                                                    device=labels.device)
    return (loss, _stat_like(labels, hidden), _stat_like(labels, hidden)) + _distill_fake(
        hidden, weight, bias, labels, spec, need_h, need_w, need_b, not per_token)


def _distill_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*inputs[:8], *output[3:])
    ctx.options = inputs[8:]


def _distill_backward(ctx, g_loss, *_):
    saved = ctx.saved_tensors
    hidden, weight, bias = saved[:3]
    needs = ctx.needs_input_grad
    if g_loss is None:
        return (None,) * 14
    spec, backend, ignore_index, need_h, need_w, need_b = ctx.options
    if decode_spec(spec).reduction == "none":
        grads = distill_loss_backward_op(*saved[:8], g_loss, spec, backend, ignore_index, need_h, need_w, need_b)
        grads = tuple(g.to(t.dtype) if n and t is not None else None for g, t, n in zip(grads, (hidden, weight, bias),
                                                                                       needs[:3]))
    else:
        grads = tuple(_scaled(g, t, n, g_loss) for g, t, n in zip(saved[8:], (hidden, weight, bias), needs[:3]))
    return grads + (None,) * 11


distill_loss_op.register_autograd(_distill_backward, setup_context=_distill_setup)


@torch.library.custom_op(f"{NAMESPACE}::distill_loss_backward", mutates_args=())
def distill_loss_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             labels: torch.Tensor, teacher_hidden: Optional[torch.Tensor],
                             teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                             teacher_logits: Optional[torch.Tensor], grad_tokens: torch.Tensor, spec: str, backend: str,
                             ignore_index: int, need_h: bool, need_w: bool,
                             need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of a per-token (``reduction="none"``) :func:`distill_loss_op`: the student's
    gradients of ``sum(grad_tokens * loss)`` (compute dtype, ``[0]`` where not needed)."""
    params = prepare_distill(decode_spec(spec), _head(None, 1.0, backend), hidden, ignore_index)
    res = distill_forward(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                          params, DistillNeeds(need_h, need_w, need_b and bias is not None), grad_tokens=grad_tokens)
    return tuple(_or_empty(g, labels.device) for g in (res.grad_hidden, res.grad_weight, res.grad_bias))


@distill_loss_backward_op.register_fake
def _(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, grad_tokens, spec,
      backend, ignore_index, need_h, need_w, need_b):
    return _distill_fake(hidden, weight, bias, labels, spec, need_h, need_w, need_b, True)


def distill_loss(spec, head: specs.HeadSpec, hidden, weight, bias, labels, teacher_hidden, teacher_weight,
                 teacher_bias, teacher_logits, ignore_index: int):
    """The :class:`~fdiv_kernels.autograd.evaluate.Primitives` ``distill_loss`` through the op."""
    grad = torch.is_grad_enabled()
    out = distill_loss_op(hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                          encode_spec(spec), head.backend, ignore_index, grad and hidden.requires_grad,
                          grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    return out[0], out[1], out[2]


#: the autograd layer's primitives as custom ops (what the API layer uses under ``torch.compile``)
OPS = Primitives(fused_loss=fused_loss, token_stats=token_stats, check_labels=check_labels_op,
                 check_token_stats=_check_token_stats, check_loss=_check_loss, check_pairs=_check_pairs,
                 distill_loss=distill_loss, check_class_data=check_class_data_op)

"""``torch.compile`` support: the package's data-dependent steps as ``torch.library`` custom ops.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the entry points keep their Python
code (option checks, spec building, the spec's reward math: all traced into the graph) and
route every step that reads tensor values on the host into one of the opaque custom ops below,
whose eager bodies are the package's ordinary eager code:

* ``fdiv_kernels::fused_loss``: the whole fused loss of a single-pass spec
  (:func:`fdiv_kernels.ops.fused.evaluate` with its chunk planning, backend resolution and data
  checks). Its eager body computes the loss, the token statistics and, in the same pass, the
  gradients with respect to ``hidden``/``weight``/``bias`` at ``grad_output = 1`` (that is what
  :class:`~fdiv_kernels.ops.fused.FusedLossFunction` does); the registered backward multiplies
  them by ``grad_output``. When the ``logp``/``lse``/``entropy`` outputs also have gradients
  (used in another differentiable expression), ``fused_loss_backward`` re-runs the eager call
  under autograd with all the gradients (eager's arithmetic; skipped at run time when those
  gradients are all zero).
* ``fdiv_kernels::token_stats``: :func:`fdiv_kernels.token_stats` (``fk.token_stats``,
  ``fk.sequence_logp``, the two-pass specs and every no-grad call); backward
  ``token_stats_vjp`` recomputes the forward under autograd (one extra logits GEMM).
* ``check_labels``, ``check_stats``, ``check_loss``, ``check_dpo``: the data checks of the
  paths that stay traced (``logits=``, two-pass specs, ``fk.dpo_loss``). Each returns a copy of
  what it checked, which the rest of the graph uses, so the check can neither be removed as dead
  code nor reordered after its use (the labels are checked before the ``gather`` that reads them).

So under compile every data check of eager mode still runs, with the same messages: the labels
range check, the NaN/inf checks of the statistics, the loss, the references and the backward
coefficients (``FDIV_CHECK_FINITE=0`` turns them off, read at every call, as in eager).

Specs reach the ops as a string (:func:`encode_spec`): the ``repr`` of the spec's class name and
its fields, registry entries (divergences, primal losses) by name. It is a compile-time constant
built by plain Python that dynamo traces, and the op decodes it once (cached). Head options
(``softcap``, ``temperature``, ``backend`` name) are plain scalar arguments; the backend is
resolved inside the ops, at run time, exactly as in eager mode.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence

import torch

from .. import _checks
from ..divergences import Divergence, get_divergence
from ..primal import PrimalLoss, get_primal

NAMESPACE = "fdiv_kernels"
_SCALARS = (str, int, float, bool, type(None))


def compiling() -> bool:
    """True while dynamo traces (the entry points then take the custom-op route)."""
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# Specs as strings
# ---------------------------------------------------------------------------------------------

def encode_spec(spec) -> str:
    """``repr((class name, ((field, value), ...)))`` of a frozen spec dataclass; registry entries
    (a :class:`~fdiv_kernels.Divergence` or primal loss) by their ``name``. Traceable by dynamo."""
    items = []
    for name in spec.__dataclass_fields__:
        value = getattr(spec, name)
        if not isinstance(value, _SCALARS):
            value = _registered_name(name, value)
        items.append((name, value))
    return repr((type(spec).__name__, tuple(items)))


def _registered_name(field: str, entry) -> str:
    """The registry name of a spec's divergence / primal loss; an object that the registry does not
    hold under that name cannot be passed by name, so it is refused (never silently replaced)."""
    lookup = get_divergence if isinstance(entry, Divergence) else get_primal if isinstance(entry, PrimalLoss) else None
    if lookup is None or lookup(entry.name) is not entry:
        raise ValueError(f"{field}={entry!r} is not a registered entry: under torch.compile specs reach the kernels "
                         f"by name; register it first (fk.register_divergence)")
    return entry.name


@functools.cache
def decode_spec(text: str):
    """The spec :func:`encode_spec` wrote (validated again by its constructor)."""
    from .. import specs
    cls_name, items = ast.literal_eval(text)
    cls = getattr(specs, cls_name)
    return cls(**dict(items))


def _head(softcap, temperature, backend):
    from ..specs import HeadSpec
    return HeadSpec(softcap, temperature, backend)


# ---------------------------------------------------------------------------------------------
# Eager autograd inside an op body
# ---------------------------------------------------------------------------------------------

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)


def _eager_autograd():
    """A context in which autograd records again: op bodies run below the autograd dispatch key,
    but the package's eager code differentiates the spec's terms (and we differentiate it)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _leaves(tensors: Sequence[torch.Tensor | None], needs: Sequence[bool]):
    return [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]


def _grads_or_empty(outputs, grad_outputs, leaves, needs, device) -> tuple[torch.Tensor, ...]:
    """``d(outputs . grad_outputs) / d leaf`` for the needed leaves (zeros when unused), an empty
    tensor for the others."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [leaf for leaf, n in zip(leaves, needs) if n and leaf is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
    out = []
    for leaf, n in zip(leaves, needs):
        if n and leaf is not None:
            g = next(got)
            out.append(torch.zeros(leaf.shape, dtype=leaf.dtype, device=leaf.device) if g is None else g.contiguous())
        else:
            out.append(_empty(device))
    return tuple(out)


def _all_zero(grads) -> bool:
    return all(g is None or not bool(g.any()) for g in grads)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stat_like(labels: torch.Tensor, like: torch.Tensor, present: bool = True) -> torch.Tensor:
    shape = labels.shape if present else (0,)
    return torch.empty(shape, dtype=_compute_dtype(like), device=labels.device)


def _grad_like(t: torch.Tensor | None, need: bool, device) -> torch.Tensor:
    """A gradient of ``t`` as the op bodies return it (contiguous), or an empty tensor."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device) if (need and t is not None) else _empty(device)


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


# ---------------------------------------------------------------------------------------------
# fused_loss: the single-pass loss, its statistics and its gradients
# ---------------------------------------------------------------------------------------------

def _run_fused(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend, ignore_index,
               return_entropy, needs):
    """The eager ``evaluate`` on leaves needing ``needs`` (inside :func:`_eager_autograd`)."""
    from .fused import evaluate
    _checks.check_labels(labels, weight.shape[0], ignore_index)
    h, w, b = _leaves((hidden, weight, bias), needs)
    with torch.enable_grad():
        ev = evaluate(decode_spec(spec), hidden=h, weight=w, labels=labels, bias=b, ref_tok=ref_tok, ref_seq=ref_seq,
                      head=_head(softcap, temperature, backend), ignore_index=ignore_index,
                      return_entropy=return_entropy)
    return ev, (h, w, b)


@torch.library.custom_op(f"{NAMESPACE}::fused_loss", mutates_args=())
def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               ref_tok: torch.Tensor, ref_seq: torch.Tensor | None, spec: str, softcap: float | None,
               temperature: float, backend: str, ignore_index: int, return_entropy: bool, need_h: bool,
               need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logp, lse, entropy | [0], grad_hidden | [0], grad_weight | [0], grad_bias | [0])``:
    the loss of ``spec`` and its gradients at ``grad_output = 1`` (module docstring)."""
    needs = (need_h, need_w, need_b and bias is not None)
    with _eager_autograd():
        ev, leaves = _run_fused(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend,
                                ignore_index, return_entropy, needs)
        grads = _grads_or_empty((ev.loss,), (torch.ones_like(ev.loss),), leaves, needs, labels.device)
    ent = ev.stats.entropy.detach() if return_entropy else _stat_like(labels, hidden, False)
    return (ev.loss.detach().clone(), ev.stats.logp.detach(), ev.stats.lse.detach(), ent) + grads


@fused_loss.register_fake
def _(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend, ignore_index,
      return_entropy, need_h, need_w, need_b):
    dev = labels.device
    loss = torch.empty((), dtype=_compute_dtype(hidden), device=dev)
    return (loss, _stat_like(labels, hidden), _stat_like(labels, hidden), _stat_like(labels, hidden, return_entropy),
            _grad_like(hidden, need_h, dev), _grad_like(weight, need_w, dev), _grad_like(bias, need_b, dev))


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ref_tok, ref_seq = inputs[:6]
    _, _, _, ent, gh, gw, gb = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(gh, gw, gb)
    if not inputs[11]:  # return_entropy
        ctx.mark_non_differentiable(ent)
    ctx.save_for_backward(hidden, weight, bias, labels, ref_tok, ref_seq, gh, gw, gb)
    ctx.options = inputs[6:12]


def _scaled(saved, inputs, needs, g_loss):
    """The stored gradients times ``grad_output`` (None where not needed)."""
    return [None if not (n and t is not None) or g_loss is None else (g * g_loss).to(t.dtype)
            for g, t, n in zip(saved, inputs, needs)]


def _fused_backward(ctx, g_loss, g_logp, g_lse, g_ent, *_):
    hidden, weight, bias, labels, ref_tok, ref_seq, gh, gw, gb = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if g_logp is None and g_lse is None and g_ent is None:  # the usual loss.backward()
        grads = _scaled((gh, gw, gb), (hidden, weight, bias), needs, g_loss)
    else:
        grads = fused_loss_backward(hidden, weight, bias, labels, ref_tok, ref_seq, gh, gw, gb, g_loss, g_logp,
                                    g_lse, g_ent, *ctx.options, *needs)
        grads = [g if n else None for g, n in zip(grads, needs)]
    return (*grads,) + (None,) * 12


fused_loss.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op(f"{NAMESPACE}::fused_loss_backward", mutates_args=())
def fused_loss_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, ref_tok: torch.Tensor, ref_seq: torch.Tensor | None,
                        saved_h: torch.Tensor, saved_w: torch.Tensor, saved_b: torch.Tensor,
                        grad_loss: torch.Tensor | None, grad_logp: torch.Tensor | None, grad_lse: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None, spec: str, softcap: float | None,
                        temperature: float, backend: str, ignore_index: int, return_entropy: bool, need_h: bool,
                        need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`fused_loss` when its ``logp``/``lse``/``entropy`` outputs have
    gradients: the eager call re-run under autograd with every output's gradient (eager's
    rounding); when those gradients are all zero, the stored gradients times ``grad_loss``."""
    needs = (need_h, need_w, need_b and bias is not None)
    given = (grad_logp, grad_lse, grad_entropy if return_entropy else None)
    if _all_zero(given):
        scaled = _scaled((saved_h, saved_w, saved_b), (hidden, weight, bias), needs, grad_loss)
        return tuple(_empty(labels.device) if not n else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                     if g is None else g for g, t, n in zip(scaled, (hidden, weight, bias), needs))
    with _eager_autograd():
        ev, leaves = _run_fused(hidden, weight, bias, labels, ref_tok, ref_seq, spec, softcap, temperature, backend,
                                ignore_index, return_entropy, needs)
        outs = (ev.loss, ev.stats.logp, ev.stats.lse, ev.stats.entropy if return_entropy else None)
        grads = (grad_loss,) + given
        return _grads_or_empty([o for o in outs if o is not None], [g for g, o in zip(grads, outs) if o is not None],
                               leaves, needs, labels.device)


@fused_loss_backward.register_fake
def _(hidden, weight, bias, labels, ref_tok, ref_seq, saved_h, saved_w, saved_b, grad_loss, grad_logp, grad_lse,
      grad_entropy, spec, softcap, temperature, backend, ignore_index, return_entropy, need_h, need_w, need_b):
    dev = labels.device
    return _grad_like(hidden, need_h, dev), _grad_like(weight, need_w, dev), _grad_like(bias, need_b, dev)


def evaluate_fused(spec, *, hidden, weight, labels, bias, ref_tok, ref_seq, head, ignore_index, return_entropy):
    """``(loss, logp, lse, entropy | None)`` of a single-pass spec through :func:`fused_loss`."""
    loss, logp, lse, ent, *_ = fused_loss(
        hidden, weight, bias, labels, ref_tok, ref_seq, encode_spec(spec), head.softcap, head.temperature,
        head.backend, ignore_index, return_entropy, hidden.requires_grad, weight.requires_grad,
        bias is not None and bias.requires_grad)
    return loss, logp, lse, (ent if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# token_stats: fk.token_stats and the two-pass path
# ---------------------------------------------------------------------------------------------

def _run_token_stats(hidden, weight, bias, labels, ignore_index, softcap, temperature, return_entropy, backend,
                     needs):
    from .token_stats import token_stats as eager_token_stats
    h, w, b = _leaves((hidden, weight, bias), needs)
    with torch.enable_grad() if any(needs) else torch.no_grad():
        stats = eager_token_stats(h, w, labels, bias=b, ignore_index=ignore_index, softcap=softcap,
                                  temperature=temperature, return_entropy=return_entropy, backend=backend)
    return stats, (h, w, b)


@torch.library.custom_op(f"{NAMESPACE}::token_stats", mutates_args=())
def token_stats_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   ignore_index: int, softcap: float | None, temperature: float, return_entropy: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fdiv_kernels.token_stats` (with its checks): ``(logp, lse, entropy | [0])``."""
    stats, _ = _run_token_stats(hidden, weight, bias, labels, ignore_index, softcap, temperature, return_entropy,
                                backend, (False, False, False))
    return stats.logp, stats.lse, (stats.entropy if return_entropy else _stat_like(labels, hidden, False))


@token_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, temperature, return_entropy, backend):
    return _stat_like(labels, hidden), _stat_like(labels, hidden), _stat_like(labels, hidden, return_entropy)


def _token_stats_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    if not inputs[7]:
        ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _token_stats_backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, bias, labels = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = token_stats_vjp(hidden, weight, bias, labels, g_logp, g_lse, g_ent, *ctx.options, *needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 6


token_stats_op.register_autograd(_token_stats_backward, setup_context=_token_stats_setup)


@torch.library.custom_op(f"{NAMESPACE}::token_stats_vjp", mutates_args=())
def token_stats_vjp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    grad_logp: torch.Tensor | None, grad_lse: torch.Tensor | None,
                    grad_entropy: torch.Tensor | None, ignore_index: int, softcap: float | None,
                    temperature: float, return_entropy: bool, backend: str, need_h: bool, need_w: bool,
                    need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`token_stats_op` (the forward recomputed under autograd)."""
    needs = (need_h, need_w, need_b and bias is not None)
    given = (grad_logp, grad_lse, grad_entropy if return_entropy else None)
    with _eager_autograd():
        stats, leaves = _run_token_stats(hidden, weight, bias, labels, ignore_index, softcap, temperature,
                                         return_entropy, backend, needs)
        outs = [o for o in stats if o is not None]
        return _grads_or_empty(outs, given[:len(outs)], leaves, needs, labels.device)


@token_stats_vjp.register_fake
def _(hidden, weight, bias, labels, grad_logp, grad_lse, grad_entropy, ignore_index, softcap, temperature,
      return_entropy, backend, need_h, need_w, need_b):
    dev = labels.device
    return _grad_like(hidden, need_h, dev), _grad_like(weight, need_w, dev), _grad_like(bias, need_b, dev)


def token_stats(hidden, weight, labels, *, bias, ignore_index, softcap, temperature, return_entropy, backend):
    """``(logp, lse, entropy | None)`` of :func:`fdiv_kernels.token_stats` through the op."""
    logp, lse, ent = token_stats_op(hidden, weight, bias, labels, ignore_index, softcap, float(temperature),
                                    bool(return_entropy), backend)
    return logp, lse, (ent if return_entropy else None)


# ---------------------------------------------------------------------------------------------
# Data checks of the traced paths (each returns a copy of what it checked)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::check_labels", mutates_args=())
def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """:func:`fdiv_kernels._checks.check_labels`; returns a copy of ``labels``."""
    _checks.check_labels(labels, vocab_size, ignore_index)
    return labels.clone()


@check_labels.register_fake
def _(labels, vocab_size, ignore_index):
    return torch.empty_like(labels)


def _identity_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)


def _identity_backward(n_grads: int, n_inputs: int):
    def backward(ctx, *grads):
        return tuple(grads[:n_grads]) + (None,) * (n_inputs - n_grads)
    return backward


@torch.library.custom_op(f"{NAMESPACE}::check_stats", mutates_args=())
def check_stats(logp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None, labels: torch.Tensor,
                softcap: float | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fdiv_kernels._checks.check_token_stats`; returns copies of the statistics."""
    _checks.check_token_stats(logp, lse, entropy, labels, softcap, temperature)
    return logp.clone(), lse.clone(), (lse.new_empty(0) if entropy is None else entropy.clone())


@check_stats.register_fake
def _(logp, lse, entropy, labels, softcap, temperature):
    return torch.empty_like(logp), torch.empty_like(lse), (lse.new_empty(0) if entropy is None else torch.empty_like(entropy))


def _check_stats_backward(ctx, g_logp, g_lse, g_ent):
    return g_logp, g_lse, g_ent, None, None, None


check_stats.register_autograd(_check_stats_backward, setup_context=_identity_setup)


@torch.library.custom_op(f"{NAMESPACE}::check_loss", mutates_args=())
def check_loss(loss: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
               labels: torch.Tensor, ref_tok: torch.Tensor, ref_seq: torch.Tensor | None, spec: str,
               softcap: float | None, temperature: float, ignore_index: int) -> torch.Tensor:
    """:func:`fdiv_kernels.ops.fused.check_result`; returns a copy of ``loss``."""
    from .fused import _flat_rows, check_result
    from .token_stats import TokenStats
    mask2 = (labels != ignore_index).reshape(_flat_rows(labels))
    check_result(decode_spec(spec), loss, TokenStats(logp, lse, entropy), labels, mask2, ref_tok, ref_seq,
                 _head(softcap, temperature, "auto"))
    return loss.clone()


@check_loss.register_fake
def _(loss, logp, lse, entropy, labels, ref_tok, ref_seq, spec, softcap, temperature, ignore_index):
    return torch.empty_like(loss)


check_loss.register_autograd(_identity_backward(1, 11), setup_context=_identity_setup)


@torch.library.custom_op(f"{NAMESPACE}::check_dpo", mutates_args=())
def check_dpo(losses: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None,
              rr: torch.Tensor | None, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """The finite check of :func:`fdiv_kernels.dpo_loss`; returns a copy of ``losses``."""
    from ..dpo import explain_pair
    if _checks.finite_checks_enabled() and not bool(torch.isfinite(losses).all()):
        raise ValueError(explain_pair(pc, pr, rc, rr, losses, loss_type=loss_type, label_smoothing=label_smoothing))
    return losses.clone()


@check_dpo.register_fake
def _(losses, pc, pr, rc, rr, loss_type, label_smoothing):
    return torch.empty_like(losses)


check_dpo.register_autograd(_identity_backward(1, 7), setup_context=_identity_setup)


def checked_stats(stats, labels, softcap=None, temperature=1.0):
    """``stats`` (a :class:`~fdiv_kernels.TokenStats` or ``LogpLse``) after :func:`check_stats`."""
    from .token_stats import _result
    logp, lse, ent = check_stats(stats.logp, stats.lse, stats.entropy, labels, softcap, float(temperature))
    return _result(logp, lse, None if stats.entropy is None else ent)


def checked_loss(spec, loss, stats, labels, ref_tok, ref_seq, head, ignore_index):
    """``loss`` after :func:`check_loss`."""
    return check_loss(loss, stats.logp, stats.lse, stats.entropy, labels, ref_tok, ref_seq, encode_spec(spec),
                      head.softcap, head.temperature, ignore_index)

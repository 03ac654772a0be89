"""Every check of the package's inputs and results, in one module.

Every check raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad dtypes) with a
message that names the argument, what was expected and what was given.

Three kinds, and where they run (``docs/design.md``, "Checks"):

* **option checks** (:func:`check_choice`, :func:`check_beta`, :func:`check_head_options`, ...):
  host-side, no device sync; the specs run them when they are built;
* **input checks** (:func:`check_head`, :func:`check_logits`, :func:`check_reference`, ...): shapes,
  dtypes and devices, plus the label range (:func:`check_label_values`, one device sync). The API
  layer (:mod:`fdiv_kernels.api`) runs them once per call; everything below it trusts its inputs;
* **data checks** (:func:`check_loss_data`, :func:`check_token_stats`, :func:`check_pairs`): after
  the computation, one device sync per call: a NaN/inf result or reference raises a
  ``ValueError`` saying which input is the cause. They are on by default; the knob
  ``check_finite`` (``FDIV_CHECK_FINITE=0``, or ``fk.config(check_finite=False)``) turns them off
  (not the label-range check: the native kernels index the weight by the label), and then a non-finite input gives whatever the arithmetic gives.
  The contract (input class -> value, limit or error) is the table in ``docs/math.md``.

The explanations that need a loss's math (which reward overflowed, which pair) come from the
spec, passed in as a callable (:meth:`fdiv_kernels.specs.FDivSpec.explain`), so this module
imports nothing of the package but :mod:`fdiv_kernels.knobs`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import knobs

__all__ = ["all_finite", "check_beta", "check_choice", "check_coefficients", "check_distill_data",
           "check_distill_inputs", "check_finite_number", "check_unit_interval",
           "check_floating", "check_head", "check_head_options", "check_label_values", "check_labels_dtype",
           "check_logits", "check_loss_data", "check_pairs", "check_reference", "check_rows", "check_same_device",
           "check_token_stats", "data_checks_enabled", "explain_token_stats", "first_position", "invalid_reference",
           "is_real"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
Explain = Callable[[], Optional[str]]


# ---------------------------------------------------------------------------------------------
# Option checks (host side)
# ---------------------------------------------------------------------------------------------

def is_real(x) -> bool:
    """Whether ``float(x)`` works."""
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(choices)}")


def check_beta(beta: float) -> None:
    if not (is_real(beta) and math.isfinite(float(beta)) and float(beta) > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_finite_number(name: str, value, *, minimum: Optional[float] = None) -> None:
    """``value`` is a finite real number (``>= minimum`` when given)."""
    ok = is_real(value) and math.isfinite(float(value)) and (minimum is None or float(value) >= minimum)
    if not ok:
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_unit_interval(name: str, value) -> None:
    """``value`` is a real number in ``[0, 1]``."""
    if not (is_real(value) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_head_options(head) -> None:
    """The logit transform of a :class:`~fdiv_kernels.specs.HeadSpec`: ``softcap`` None or finite > 0,
    ``temperature`` finite > 0."""
    softcap, temperature = head.softcap, head.temperature
    if softcap is not None and not (is_real(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if softcap is not None and not math.isfinite(softcap):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap} (softcap=None means no cap)")
    if not (is_real(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


# ---------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices; the label range)
# ---------------------------------------------------------------------------------------------

def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}")


def check_labels_dtype(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int32 or int64), got {labels.dtype}")


def check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels lie in ``[0, vocab_size)`` or equal ``ignore_index`` (one device sync; always on: the
    native kernels index the weight by the label)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = first_position(bad)
        raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {int(labels[pos])} at position {pos}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


def check_rows(labels: torch.Tensor) -> None:
    """Losses read rows off ``labels``: at least one dimension (a 1-D ``labels`` is one row)."""
    if labels.dim() == 0:
        raise ValueError("labels must have at least one dimension (a row of tokens), got a 0-d tensor; "
                         "pass labels[None] with hidden[None] for a single token")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               bias: Optional[torch.Tensor]) -> None:
    """Shapes, dtypes and devices of a fused LM-head call (no device sync; the label range is
    :func:`check_label_values`)."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    check_labels_dtype(labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary (shape {tuple(weight.shape)}): softmax needs V >= 1")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal weight's H: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)} (expected weight [V, H] as in nn.Linear(H, V).weight)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Shapes, dtypes and devices of a call with ``logits [..., V]``."""
    check_floating("logits", logits)
    check_labels_dtype(labels)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    check_same_device(logits=logits, labels=labels)


def check_reference(ref_logp: torch.Tensor, labels: torch.Tensor, allowed: Sequence[str]) -> str:
    """``"token"`` when ``ref_logp`` has ``labels``' shape, ``"row"`` when it has one value per row
    (``labels.shape[:-1]``), if that form is ``allowed``; else a ``ValueError`` naming the shapes."""
    check_floating("ref_logp", ref_logp)
    check_same_device(ref_logp=ref_logp, labels=labels)
    row_shape = tuple(labels.shape[:-1]) if labels.dim() > 1 else ()
    if "token" in allowed and tuple(ref_logp.shape) == tuple(labels.shape):
        return "token"
    if "row" in allowed and tuple(ref_logp.shape) == row_shape:
        return "row"
    expect = " or ".join(f"{tuple(labels.shape)} per token" if a == "token" else f"{row_shape} per row"
                         for a in allowed)
    raise ValueError(f"ref_logp must have shape {expect}, got {tuple(ref_logp.shape)}")


def check_distill_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
                         teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                         teacher_logits: Optional[torch.Tensor]) -> None:
    """Shapes, dtypes and devices of a distillation call: the student's head (:func:`check_head`)
    and one teacher, ``(teacher_hidden [..., T, H_t], teacher_weight [V, H_t], teacher_bias [V] |
    None)`` (``H_t`` may differ from the student's ``H``) or ``teacher_logits [..., T, V]``, over the
    student's vocabulary ``V`` and positions."""
    check_head(hidden, weight, labels, bias)
    v = weight.shape[0]
    by_head = teacher_hidden is not None or teacher_weight is not None
    if teacher_logits is not None and (by_head or teacher_bias is not None):
        raise ValueError("pass the teacher either as teacher_logits= or as (teacher_hidden=, teacher_weight=[, "
                         "teacher_bias=]), not both")
    if teacher_logits is None and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("distillation needs a teacher: teacher_hidden= and teacher_weight= (its LM head), or "
                         "teacher_logits=")
    if teacher_logits is not None:
        check_floating("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != tuple(labels.shape) + (v,):
            raise ValueError(f"teacher_logits must have shape {tuple(labels.shape) + (v,)} (labels' shape and the "
                             f"student's vocabulary V={v}), got {tuple(teacher_logits.shape)}")
        check_same_device(hidden=hidden, teacher_logits=teacher_logits)
        return
    check_floating("teacher_hidden", teacher_hidden)
    check_floating("teacher_weight", teacher_weight)
    if teacher_weight.dim() != 2:
        raise ValueError(f"teacher_weight must have shape [V, H_t], got {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != v:
        raise ValueError(f"teacher_weight has a vocabulary of {teacher_weight.shape[0]} but the student's weight one of "
                         f"{v}: distillation compares two distributions over one vocabulary (pad or slice the heads "
                         f"to the shared tokenizer)")
    if teacher_hidden.dtype != teacher_weight.dtype:
        raise TypeError(f"teacher_hidden and teacher_weight must share a dtype, got {teacher_hidden.dtype} and "
                        f"{teacher_weight.dtype}")
    if tuple(teacher_hidden.shape) != tuple(labels.shape) + (teacher_weight.shape[1],):
        raise ValueError(f"teacher_hidden must have shape {tuple(labels.shape) + (teacher_weight.shape[1],)} (labels' "
                         f"shape and teacher_weight's H_t), got {tuple(teacher_hidden.shape)}")
    if teacher_bias is not None:
        check_floating("teacher_bias", teacher_bias)
        if tuple(teacher_bias.shape) != (v,):
            raise ValueError(f"teacher_bias must have shape [V]=({v},), got {tuple(teacher_bias.shape)}")
    check_same_device(hidden=hidden, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                      teacher_bias=teacher_bias)


# ---------------------------------------------------------------------------------------------
# Data checks (one device sync per call; the check_finite knob turns them off)
# ---------------------------------------------------------------------------------------------

def data_checks_enabled() -> bool:
    """Whether the data checks run (knob ``check_finite``, default on; :mod:`fdiv_kernels.knobs`)."""
    return bool(knobs.get("check_finite"))


def first_position(bad: torch.Tensor) -> Tuple[int, ...]:
    """Index (a tuple) of the first True entry of ``bad`` (which has one)."""
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def all_finite(tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """0-d bool tensor (no sync): every given tensor is finite everywhere."""
    flag = None
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        f = torch.isfinite(t).all()
        flag = f if flag is None else flag & f
    return torch.ones((), dtype=torch.bool) if flag is None else flag


def invalid_reference(ref: torch.Tensor) -> torch.Tensor:
    """NaN or +inf: not a log-probability (-inf, pi_ref = 0, is one: the losses take its limit)."""
    return torch.isnan(ref) | (ref == math.inf)


def explain_token_stats(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                        labels: torch.Tensor, head=None) -> Optional[str]:
    """Why the per-token statistics (shape of ``labels``, 0 where ignored) are not finite, or None.

    ``lse = -inf``: every logit of that token is -inf (a vocabulary masked through the bias);
    ``lse`` NaN/+inf: the logits themselves are not finite (NaN/inf in hidden, weight or bias, or
    ``|z|`` beyond float32); ``logp = -inf`` with a finite ``lse``: the label's logit is -inf.
    ``head``: the call's :class:`~fdiv_kernels.specs.HeadSpec` (named in the message), or None.
    """
    logp, lse = logp.detach(), lse.detach()
    entropy = None if entropy is None else entropy.detach()
    lse_bad = ~torch.isfinite(lse)
    if bool(lse_bad.any()):
        pos = first_position(lse_bad)
        if float(lse[pos]) == -math.inf:
            return (f"every logit at position {pos} is -inf (the whole vocabulary is masked, e.g. by a bias of -inf): "
                    f"softmax is undefined there; set labels{list(pos)} to ignore_index")
        transform = "" if head is None else f" with temperature={head.temperature:g}" + (
            "" if head.softcap is None else f", softcap={head.softcap:g}")
        return (f"the logits at position {pos} are not finite (log-sum-exp = {float(lse[pos])}): hidden, weight "
                f"or bias hold NaN/inf, or the logits overflow float32{transform}")
    lp_bad = ~torch.isfinite(logp)
    if bool(lp_bad.any()):
        pos = first_position(lp_bad)
        y = int(labels[pos])
        if float(logp[pos]) == -math.inf:
            return (f"labels{list(pos)} = {y} is a masked token (its logit is -inf, e.g. through bias), so "
                    f"log pi(label) = -inf; mask that position (ignore_index) or unmask the token")
        return f"the logit of labels{list(pos)} = {y} is not finite (log-prob {float(logp[pos])})"
    if entropy is not None and entropy.numel():
        ent_bad = ~torch.isfinite(entropy)
        if bool(ent_bad.any()):
            pos = first_position(ent_bad)
            return f"the entropy at position {pos} is not finite ({float(entropy[pos])})"
    return None


def check_token_stats(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                      labels: torch.Tensor, head=None) -> None:
    """The data check of :func:`fdiv_kernels.token_stats`: ``ValueError`` (explained) when the
    statistics are not finite (one sync)."""
    if not data_checks_enabled() or bool(all_finite((logp, lse, entropy))):
        return
    why = explain_token_stats(logp, lse, entropy, labels, head)
    raise ValueError(why or "the token statistics are not finite")


def _reference_problem(ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor], mask2: torch.Tensor,
                       labels_shape) -> Optional[str]:
    """A supervised reference that is not a log-probability (NaN, +inf), or None."""
    if ref_tok.dim():
        bad = invalid_reference(ref_tok.detach().reshape(labels_shape))
        if bool(bad.any()):
            pos = first_position(bad)
            return (f"ref_logp is {float(ref_tok.reshape(labels_shape)[pos])} at supervised position {pos} "
                    f"(a log-probability is a number <= 0)")
    if ref_seq is not None:
        bad = invalid_reference(ref_seq.detach()) & mask2.any(dim=1)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            return (f"ref_logp is {float(ref_seq[r])} for row {r} (a row with supervised tokens; a log-probability "
                    f"is a number <= 0)")
    return None


def check_loss_data(loss: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                    labels: torch.Tensor, mask2: torch.Tensor, ref_tok: torch.Tensor, ref_seq: Optional[torch.Tensor],
                    head, explain_loss: Explain, finite: Optional[torch.Tensor] = None) -> None:
    """The data check of a loss call (one device sync): the loss, the token statistics, the fused
    pass's coefficients (``finite``, folded on the device) and the supervised references
    (``ref_tok [R, T]`` masked or 0-d, ``ref_seq [R]`` or None) are finite / valid, or a
    ``ValueError`` says which input is the cause, most basic first (``explain_loss``: the spec's
    explanation of its own non-finite value)."""
    if not data_checks_enabled():
        return
    flag = all_finite((loss, logp, lse, entropy)).to(loss.device)
    if finite is not None:
        flag = flag & finite
    if ref_tok.dim():
        flag = flag & ~invalid_reference(ref_tok.detach()).any()
    if ref_seq is not None:
        flag = flag & ~(invalid_reference(ref_seq.detach()) & mask2.any(dim=1)).any()
    if bool(flag):
        return
    why = (_reference_problem(ref_tok, ref_seq, mask2, labels.shape)
           or explain_token_stats(logp, lse, entropy, labels, head) or explain_loss())
    if why is None and bool(all_finite((loss,))):
        why = ("the loss is finite but a derivative of it with respect to the token statistics is not (NaN/inf "
               "coefficient); please report this input")
    raise ValueError(why or f"the loss is {loss.detach().reshape(-1)[0].item() if loss.numel() else loss} (not finite)")


def check_pairs(losses: torch.Tensor, refs: Sequence[Tuple[str, Optional[torch.Tensor]]], explain: Explain) -> None:
    """The data check of the DPO family (one device sync): every reference (``(name, [B])``) is a
    log-probability (not NaN, not +inf) and every pair loss is finite; else a ``ValueError``
    naming the argument and the pair."""
    if not data_checks_enabled():
        return
    present = [(n, r) for n, r in refs if r is not None]
    flag = all_finite((losses,))
    for _, r in present:
        flag = flag & ~invalid_reference(r.detach()).any()
    if bool(flag):
        return
    for name, r in present:
        bad = invalid_reference(r.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"pair {i}: {name} = {float(r[i])} is not a log-probability (a number <= 0)")
    raise ValueError(explain() or "the pair losses are not finite")


def check_coefficients(where: str, **grads: Optional[torch.Tensor]) -> None:
    """The per-token loss derivatives handed to a backward kernel are finite (a safety net: no
    NaN/inf may reach the gradients unnoticed)."""
    if not data_checks_enabled():
        return
    present = {k: v for k, v in grads.items() if v is not None and v.numel()}
    if not present or bool(all_finite(tuple(present.values()))):
        return
    for name, g in present.items():
        bad = ~torch.isfinite(g)
        if bool(bad.any()):
            raise ValueError(f"{where}: the loss's derivative {name} is not finite ({float(g.reshape(-1)[bad.reshape(-1)][0])}) "
                             f"at token {first_position(bad)}: the loss built on these statistics has a non-finite "
                             f"gradient there")


def check_distill_data(loss: torch.Tensor, finite: torch.Tensor, explain: Explain) -> None:
    """The data check of :func:`fdiv_kernels.distill_loss` (one device sync): the loss, the per-token
    values and the student's gradients are finite (``finite``, folded on the device by the
    kernels' loop), else a ``ValueError`` with the spec's explanation (which divergence, where, why)."""
    if not data_checks_enabled():
        return
    if bool(finite & all_finite((loss,)).to(finite.device)):
        return
    raise ValueError(explain() or f"the distillation loss is not finite ({loss.detach().reshape(-1)[:1].tolist()})")

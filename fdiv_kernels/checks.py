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
import sys
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import knobs

__all__ = ["all_finite", "check_beta", "check_choice", "check_coefficients", "check_distill_data",
           "check_distill_inputs", "check_finite_number", "check_unit_interval",
           "check_floating", "check_head", "check_head_options", "check_label_values", "check_labels_dtype",
           "check_logits", "check_loss_data", "check_loss_types", "check_pairs", "check_reference", "check_rows",
           "check_same_device", "check_shift", "check_scalar_tensor", "check_token_stats", "check_vocab_layout", "check_vocab_shard",
           "check_vocab_shards", "data_checks_enabled", "explain_token_stats", "first_position", "invalid_reference",
           "is_dtensor", "is_real", "SHARD_FACTS", "shard_facts",
           "check_class_data", "check_class_options", "check_token_accuracy", "class_options_refusal",
           "class_smoothing"]

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


def check_loss_types(loss_type, loss_weights, choices) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """``loss_type`` (a name or a sequence of names in ``choices``) and ``loss_weights`` (None: 1.0
    each, or one finite number per name, as TRL's ``loss_weights``): ``(names, weights)`` as tuples."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type) if isinstance(loss_type, (list, tuple)) \
        else None
    if not names:
        raise ValueError(f"loss_type must be a name or a non-empty list of names, got {loss_type!r}")
    for name in names:
        check_choice("loss_type", name, choices)
    if loss_weights is None:
        return names, (1.0,) * len(names)
    weights = (loss_weights,) if is_real(loss_weights) and not isinstance(loss_weights, (list, tuple)) \
        else tuple(loss_weights) if isinstance(loss_weights, (list, tuple)) else None
    if weights is None or len(weights) != len(names):
        raise ValueError(f"loss_weights must give one weight per loss_type ({len(names)}: {list(names)}), "
                         f"got {loss_weights!r}")
    for w in weights:
        check_finite_number("loss_weights", w)
    return names, tuple(float(w) for w in weights)


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


def class_options_refusal(name: str, spec) -> str:
    """The error of a cross-entropy option (``class_weight``, ``label_smoothing``) given to a loss it
    does not apply to."""
    what = type(spec).__name__
    if hasattr(spec, "level"):
        what = (f"divergence={spec.divergence.name!r}, level={spec.level!r}, values={spec.values!r}")
    return (f"{name} applies to per-token losses averaged over tokens: fk.loss with level='token', values='drop' "
            f"and a divergence other than kl / squared_hellinger (log-mean-exp), e.g. divergence='sft'; got {what}")


def class_smoothing(spec) -> float:
    """The label smoothing of a spec's cross-entropy options (``FDivSpec.label_smoothing``); 0 for a
    spec that does not take them (``takes_class_options``; DPO's ``label_smoothing`` is another option)."""
    return float(spec.label_smoothing) if getattr(spec, "takes_class_options", False) else 0.0


def check_class_options(spec, class_weight: Optional[torch.Tensor], vocab_size: int, head,
                        device: torch.device) -> None:
    """The cross-entropy options of a call, no device sync: ``class_weight`` None or a floating
    ``[V]`` tensor on the labels' device, given to a spec that takes it (``takes_class_options``);
    with either option no vocabulary-parallel head, and with label smoothing no soft-cap (its mean
    logit is linear in ``h`` only without one; ``docs/math.md`` section 3). Their values:
    :func:`check_class_data`."""
    smoothing = class_smoothing(spec)
    if class_weight is None and not smoothing:
        return
    which = "class_weight" if class_weight is not None else "label_smoothing"
    if not getattr(spec, "takes_class_options", False):
        raise ValueError(class_options_refusal(which, spec))
    if head.vocab is not None:
        raise ValueError(f"{which} is not supported with a vocabulary-parallel head (vocab_group= or a sharded "
                         f"DTensor weight) yet; compute the loss on the whole head")
    if smoothing and head.softcap is not None:
        raise ValueError(f"label_smoothing={smoothing:g} needs each token's mean logit, which is linear in the hidden "
                         f"state only without a soft-cap; softcap={head.softcap:g} is not supported with it")
    if class_weight is None:
        return
    check_floating("class_weight", class_weight)
    if tuple(class_weight.shape) != (vocab_size,):
        raise ValueError(f"class_weight must have shape [V]=({vocab_size},) (one weight per vocabulary entry), "
                         f"got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight must be on the labels' device {device}, got {class_weight.device}")


def check_class_data(c: torch.Tensor, bias: Optional[torch.Tensor], smoothing: float) -> None:
    """The values of a call's class weights ``c [V]`` (ones when only label smoothing is asked):
    finite and >= 0; with label smoothing, no ``-inf`` (masked) ``bias`` column of weight > 0
    (its ``U_t`` would be infinite). One device sync."""
    bad = ~torch.isfinite(c) | (c < 0)
    masked = None
    if smoothing and bias is not None:
        masked = (bias == -math.inf) & (c != 0)
        bad = torch.cat([bad, masked])
    if not bool(bad.any()):
        return
    v = int(bad.nonzero()[0])
    if v < c.shape[0]:
        raise ValueError(f"class_weight must hold finite numbers >= 0, got {float(c[v])} at index {v}")
    v -= c.shape[0]
    raise ValueError(f"label_smoothing={smoothing:g} puts mass on every vocabulary entry, but bias[{v}] = -inf masks "
                     f"column {v} (class weight > 0), so the smoothed loss is infinite; give the masked columns "
                     f"class_weight 0, or use label_smoothing=0")


def check_token_accuracy(head, compiling: bool) -> None:
    """``return_token_accuracy=True`` of a call: not under ``torch.compile``, not with a
    vocabulary-parallel head (each rank's argmax is of its shard), yet."""
    if compiling:
        raise ValueError("return_token_accuracy is not supported under torch.compile yet; call the loss outside the "
                         "compiled region or compute the accuracy separately")
    if head.vocab is not None:
        raise ValueError("return_token_accuracy is not supported with a vocabulary-parallel head (vocab_group= or a "
                         "sharded DTensor weight) yet")


# ---------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices; the label range)
# ---------------------------------------------------------------------------------------------

def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}")


def check_shift(shift) -> int:
    """The causal-LM shift of an entry point as an int ``k >= 0``: ``False``/``True`` are 0/1, an int
    is the number of positions (cut-cross-entropy's ``shift``)."""
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a bool or an int >= 0 (positions: x[..., :T-k] predicts labels[..., k:]), "
                         f"got {shift!r}")
    return shift


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


def check_scalar_tensor(name: str, t: torch.Tensor) -> None:
    """``t`` is a one-element floating-point tensor holding a finite number (one host read)."""
    check_floating(name, t)
    if t.numel() != 1 or not math.isfinite(float(t)):
        raise ValueError(f"{name} must be a finite number (a float or a one-element tensor), got {t!r}")


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
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
                    ("teacher_logits", teacher_logits)):
        if is_dtensor(t):
            raise ValueError(f"{name} is a DTensor: distillation takes whole heads (a vocabulary-parallel head is "
                             f"not supported by fk.distill_loss yet); pass {name}.full_tensor()")
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
# Vocabulary-parallel heads (docs/design.md, "Vocabulary parallelism")
# ---------------------------------------------------------------------------------------------

def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (never imports that module, which
    takes ~0.6 s: without it no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return t is not None and module is not None and isinstance(t, module.DTensor)


def check_vocab_shard(index: int, sizes: Tuple[int, ...]) -> None:
    """A :class:`~fdiv_kernels.specs.VocabShard`'s layout: every shard holds at least one row, and
    ``index`` names one of them (host only)."""
    if not sizes:
        raise ValueError("a vocabulary-parallel head needs at least one shard")
    if not 0 <= index < len(sizes):
        raise ValueError(f"shard index {index} is not one of the {len(sizes)} shards")
    empty = [i for i, s in enumerate(sizes) if s < 1]
    if empty:
        raise ValueError(f"the shards of the vocabulary do not tile it: shard {empty[0]} holds {sizes[empty[0]]} rows "
                         f"(sizes {list(sizes)}); every rank of the vocabulary group must hold at least one row of "
                         f"the head")


def check_vocab_layout(hidden, weight, bias, logits, vocab_group, compiling: bool) -> None:
    """A vocabulary-parallel call (``vocab_group=`` given or a ``DTensor`` weight): a ``DTensor``
    weight (and bias) placed ``Shard(0)`` on a one-dimensional device mesh (what ``ColwiseParallel``
    makes), or plain local shards with ``vocab_group`` a process group; ``hidden`` a plain tensor
    (the same on every rank); not under ``torch.compile``; not with ``logits=``."""
    dtensor = is_dtensor(weight)
    if vocab_group is None and not dtensor and not is_dtensor(bias):
        return
    if compiling:
        raise RuntimeError("a vocabulary-parallel head (vocab_group= or a DTensor weight) cannot run under "
                           "torch.compile: its all-reduces take a process group, which a custom op cannot; call the "
                           "loss outside the compiled region (docs/performance.md, \"Vocabulary parallelism\")")
    if logits is not None:
        raise ValueError("vocab_group= applies to (hidden, weight): logits= are already whole rows")
    if is_dtensor(hidden):
        raise TypeError(f"hidden is a DTensor (placements {tuple(hidden.placements)}): a vocabulary-parallel head takes "
                        f"the plain hidden states every rank of the group holds (e.g. hidden.full_tensor())")
    if vocab_group is not None and not isinstance(vocab_group, torch.distributed.ProcessGroup):
        raise TypeError(f"vocab_group must be a torch.distributed process group, got {type(vocab_group).__name__}")
    if not dtensor:
        if is_dtensor(bias):
            raise TypeError("bias is a DTensor but weight is not: pass both as DTensors placed Shard(0) on one mesh, "
                            "or both as this rank's plain shards with vocab_group=")
        return
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor weight must be placed Shard(0) on a one-dimensional device mesh (ColwiseParallel on "
                         f"the LM head), got placements {tuple(weight.placements)} on a mesh of shape "
                         f"{tuple(mesh.shape)}; a head sharded by FSDP2 is gathered with "
                         f"fdiv_kernels.hf.full_tensor(weight) first")
    if bias is not None and not (is_dtensor(bias) and bias.device_mesh == mesh and tuple(bias.placements) == (Shard(0),)):
        raise TypeError("with a DTensor weight, bias must be a DTensor placed Shard(0) on the weight's mesh (as "
                        "ColwiseParallel places it)")
    if vocab_group is not None and vocab_group != mesh.get_group():
        raise ValueError("vocab_group= names another process group than the DTensor weight's device mesh; pass the "
                         "DTensor alone (its mesh is the group)")


#: what each rank of a vocabulary group tells the others once per call (one all-gather of int64s):
#: its shard index, the shard's rows, H, the dtype, the bias rows (-1: none), the labels' size and
#: two checksums, which inputs need gradients (bits: hidden, weight, bias, grad mode), and the rows of
#: the whole head when the weight knows them (a DTensor; else -1)
SHARD_FACTS = ("index", "rows", "hidden_size", "dtype", "bias_rows", "tokens", "labels_sum", "labels_moment",
               "needs_grad", "global_rows")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def shard_facts(index: int, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, global_rows: int) -> torch.Tensor:
    """This rank's :data:`SHARD_FACTS` as an int64 tensor on ``hidden``'s device (no host read)."""
    y = labels.reshape(-1).long()
    pos = torch.arange(y.numel(), device=y.device) % 65521 + 1
    grad = torch.is_grad_enabled()
    needs = (int(grad and hidden.requires_grad) | int(grad and weight.requires_grad) << 1
             | int(grad and bias is not None and bias.requires_grad) << 2)
    dtype = _FLOAT_DTYPES.index(weight.dtype) if weight.dtype in _FLOAT_DTYPES else -1
    head = [index, weight.shape[0] if weight.dim() == 2 else -1, weight.shape[-1] if weight.dim() else -1, dtype,
            -1 if bias is None else bias.shape[0] if bias.dim() == 1 else -2, y.numel()]
    fixed = torch.tensor(head, dtype=torch.int64, device=hidden.device)
    sums = torch.stack([y.sum(), (y * pos).sum()]).to(hidden.device) if y.numel() else fixed.new_zeros(2)
    tail = torch.tensor([needs, global_rows], dtype=torch.int64, device=hidden.device)
    return torch.cat([fixed, sums, tail])


def check_vocab_shards(table: torch.Tensor) -> Tuple[int, ...]:
    """The shards of a vocabulary group tile the vocabulary and every rank passes the same call:
    ``table [W, len(SHARD_FACTS)]`` holds every rank's :func:`shard_facts` (group rank order; one
    host read). Returns the shard sizes in vocabulary order. Every rank reads the same table, so
    every rank raises the same error."""
    rows = [dict(zip(SHARD_FACTS, r)) for r in table.tolist()]
    world = len(rows)
    if sorted(r["index"] for r in rows) != list(range(world)):
        raise ValueError(f"the shard indices of the vocabulary group's {world} ranks are "
                         f"{[r['index'] for r in rows]}, not one each of 0..{world - 1}")
    for name, what in (("hidden_size", "the hidden size H of the weight shard"), ("dtype", "the weight's dtype"),
                       ("needs_grad", "which of hidden, weight and bias require gradients (and the grad mode)")):
        values = [r[name] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(f"{what} differs across the ranks of the vocabulary group (rank order: {values}); every "
                             f"rank's shard must match the others")
    labels = [(r["tokens"], r["labels_sum"], r["labels_moment"]) for r in rows]
    if len(set(labels)) > 1:
        other = next(i for i, x in enumerate(labels) if x != labels[0])
        raise ValueError(f"labels differ across the ranks of the vocabulary group (rank {other}'s from rank 0's: "
                         f"{labels[other][0]} and {labels[0][0]} tokens, or other ids): every rank of a "
                         f"tensor-parallel group passes the same batch "
                         f"(hidden and labels); a head sharded for data parallelism (FSDP2) is gathered with "
                         f"fdiv_kernels.hf.full_tensor(weight) instead")
    by_index = sorted(rows, key=lambda r: r["index"])
    sizes = tuple(r["rows"] for r in by_index)
    for rank, r in enumerate(rows):
        if r["bias_rows"] != -1 and r["bias_rows"] != r["rows"]:
            raise ValueError(f"rank {rank}'s bias shard has {r['bias_rows']} rows but its weight shard {r['rows']}: "
                             f"each rank passes the bias rows of its own weight rows")
    if len({r["bias_rows"] == -1 for r in rows}) > 1:
        raise ValueError("some ranks of the vocabulary group pass a bias and others do not")
    check_vocab_shard(0, sizes)
    claimed = {r["global_rows"] for r in rows} - {-1}
    if claimed and claimed != {sum(sizes)}:
        raise ValueError(f"the shards hold {sum(sizes)} rows ({list(sizes)}) but the DTensor weight has {claimed.pop()}")
    return sizes


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

"""``torch.nn`` modules: drop-in replacements for a trainer's loss.

* :class:`FDivLoss`: from logits, like ``nn.CrossEntropyLoss`` (``loss_fn(logits, labels)``).
* :class:`FusedLinearFDivLoss`: from hidden states and the LM head, never building the
  ``[N, V]`` logits (``loss_fn(hidden, lm_head.weight, labels)`` or ``loss_fn(hidden, lm_head, labels)``).
* :class:`FusedLinearDPOLoss`: DPO-family loss from concatenated chosen/rejected hidden states;
  :class:`FusedLinearCPOLoss` and :class:`FusedLinearORPOLoss` the same module with the options of
  TRL's CPO and ORPO trainers (:func:`~fdiv_kernels.specs.cpo_spec`, :func:`~fdiv_kernels.specs.orpo_spec`).
* :class:`FusedLinearKTOLoss`: KTO from unpaired rows, each desirable or not.
* :class:`FusedLinearDistillLoss`: distillation of a teacher into the student with any
  f-divergence, fused with both LM heads.

Each module holds one validated loss spec (``.spec``: :class:`~fdiv_kernels.specs.FDivSpec`,
:class:`~fdiv_kernels.specs.PrimalSpec` or :class:`~fdiv_kernels.specs.DPOSpec`) and, for the
fused ones, a :class:`~fdiv_kernels.specs.HeadSpec` (``.head``), given as ``spec=``/``head=`` or
built from the keywords of :func:`fdiv_kernels.loss` / :func:`fdiv_kernels.dpo_loss`; their fields
read through (``loss_fn.beta``). The modules hold no parameters and no state. ``shift_labels=True`` applies the Hugging Face
convention inside the module: ``labels[..., 1:]`` are predicted from ``hidden[..., :-1, :]``
(``logits[..., :-1, :]``), so unshifted ``labels = input_ids`` (with ``-100`` where unsupervised)
can be passed as they are (:func:`shift_for_causal_lm`, also behind ``fk.loss(shift=True)``).
The fused modules take a head split along the vocabulary across a tensor-parallel group
(``vocab_group=``, or a ``DTensor`` weight placed ``Shard(0)``: :func:`fdiv_kernels.loss`).

With ``divergence="sft"``, ``beta=1`` and no reference, :class:`FDivLoss` and
:class:`FusedLinearFDivLoss` equal ``F.cross_entropy(logits, labels, ignore_index=-100)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn as _tnn

from .api import (DistillOutput, DPOOutput, KTOOutput, LossOutput, distill_from_spec, dpo_output, kl_estimate, kto_output,
                  loss_from_spec, sequence_logp, shift_for_causal_lm)
from .autograd.fused import row_order
from .specs import DistillSpec, DPOSpec, FDivSpec, HeadSpec, KTOSpec, PrimalSpec, Rows, cpo_spec, orpo_spec

__all__ = ["FDivLoss", "FusedLinearCPOLoss", "FusedLinearDPOLoss", "FusedLinearDistillLoss", "FusedLinearFDivLoss",
           "FusedLinearKTOLoss", "FusedLinearORPOLoss", "shift_for_causal_lm"]

HeadLike = Union[torch.Tensor, _tnn.Module]
#: the head's keywords of the fused modules (the vocabulary shard is resolved per call from ``vocab_group=``)
_HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(HeadSpec) if f.name != "vocab")


def _split_head(weight: HeadLike, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Accept ``lm_head.weight`` (+ ``bias=``) or the ``nn.Linear`` head itself."""
    if isinstance(weight, _tnn.Module):
        w, b = getattr(weight, "weight", None), getattr(weight, "bias", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{type(weight).__name__} has no tensor .weight; pass the [V, H] weight tensor instead")
        if bias is not None and b is not None:
            raise ValueError("bias= given together with a head module that has its own bias")
        return w, (bias if bias is not None else b)
    return weight, bias


def _built(types, given, options: Dict[str, Any], build, what: str):
    """``given`` (an instance of ``types``) or ``build(**options)``; both at once is an error."""
    if given is None:
        return build(**options)
    if options:
        raise ValueError(f"pass the {what} either as {what}= or as keywords, not both (got {sorted(options)})")
    if not isinstance(given, types):
        names = " or ".join(k.__name__ for k in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{what} must be a {names}, got {type(given).__name__}")
    return given


def _fdiv_spec(**options) -> FDivSpec:
    """The spec of the keywords of :func:`fdiv_kernels.loss`."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FDivSpec)})
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; the options are the fields of FDivSpec "
                        f"(a primal loss: spec=fk.PrimalSpec(...))")
    return FDivSpec(**options)


class _SpecModule(_tnn.Module):
    """A loss module holding a validated spec (and a :class:`HeadSpec`); options read through."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            for holder in (self.__dict__.get("spec"), self.__dict__.get("head")):
                if holder is not None and name in {f.name for f in dataclasses.fields(holder)}:
                    return getattr(holder, name)
            raise

    def extra_repr(self) -> str:
        head = f", head={self.head}" if getattr(self, "head", None) is not None else ""
        return f"spec={self.spec}{head}, ignore_index={self.ignore_index}, shift_labels={self.shift_labels}"


class FDivLoss(_SpecModule):
    """f-divergence SFT loss from logits: ``loss_fn(logits [..., T, V], labels [..., T]) -> loss``.

    The loss is one spec: ``FDivLoss(spec=FDivSpec(...))`` (or a
    :class:`~fdiv_kernels.specs.PrimalSpec` for the primal losses of :func:`fdiv_kernels.primal_loss`),
    or the keywords of :func:`fdiv_kernels.loss` that build an ``FDivSpec`` (``divergence``,
    ``beta``, ``level``, ``reduction``, ``values``, ``z_loss``, ``length_normalize``,
    ``label_smoothing``), validated once here. Plus ``ignore_index``, ``shift_labels`` (HF causal-LM
    shift, see the module docstring), ``class_weight`` (a ``[V]`` tensor, kept as a buffer:
    ``F.cross_entropy(weight=)``, Liger's ``ce_weight``; :func:`fdiv_kernels.loss`) and
    ``return_token_accuracy`` (``out.token_accuracy``, ``out.predicted_tokens`` with ``return_output=True``).
    The spec's fields read through (``loss_fn.beta``).

    ``forward(logits, labels, *, ref_logp=None, return_output=False)``: ``ref_logp`` is the
    reference model's per-token log-probs (``[..., T]``, aligned with ``labels``) or per-row
    ones at sequence level. Returns the loss (float32; float64 for float64 logits), or the full
    :class:`fdiv_kernels.LossOutput` with ``return_output=True``. bf16/fp16 logits are upcast.
    """

    def __init__(self, spec: Optional[Union[FDivSpec, PrimalSpec]] = None, *, ignore_index: int = -100,
                 shift_labels: bool = False, class_weight: Optional[torch.Tensor] = None,
                 return_token_accuracy: bool = False, **options) -> None:
        super().__init__()
        self.spec = _built((FDivSpec, PrimalSpec), spec, options, _fdiv_spec, "spec")
        self.ignore_index, self.shift_labels = int(ignore_index), bool(shift_labels)
        self.register_buffer("class_weight", class_weight)
        self.return_token_accuracy = bool(return_token_accuracy)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *, ref_logp: Optional[torch.Tensor] = None,
                return_output: bool = False) -> Union[torch.Tensor, LossOutput]:
        if self.shift_labels:
            logits, labels, ref_logp = shift_for_causal_lm(logits, labels, ref_logp)
        out = loss_from_spec(self.spec, logits=logits, labels=labels, ref_logp=ref_logp, ignore_index=self.ignore_index,
                             class_weight=self.class_weight, return_token_accuracy=self.return_token_accuracy)
        return out if return_output else out.loss


class FusedLinearFDivLoss(_SpecModule):
    """f-divergence SFT loss fused with the LM head; the ``[N, V]`` logits are never stored.

    ``loss_fn(hidden [..., T, H], weight, labels [..., T], *, bias=None, ref_logp=None,
    return_output=False)`` where ``weight`` is the ``[V, H]`` head weight (``lm_head.weight``,
    same dtype as ``hidden``) or the head module itself (its ``.bias`` is then used). Gradients
    reach ``hidden``, ``weight`` and ``bias``.

    Options: those of :class:`FDivLoss` (``spec=`` or its keywords), plus the head:
    ``head=HeadSpec(softcap, temperature, backend)`` or those keywords (``softcap``: Gemma-2
    final-logit soft-cap; ``temperature``: logits divided by it; ``backend``: "auto", "torch",
    ...; see :func:`fdiv_kernels.available_backends`). ``vocab_group``: the process group of a
    vocabulary-parallel head (``weight`` is then this rank's shard; :func:`fdiv_kernels.loss`).
    ``class_weight``: ``[V]`` class weights, a buffer (as :class:`FDivLoss`; with the spec's
    ``label_smoothing``, Liger's ``LigerFusedLinearCrossEntropyLoss(ce_weight=, label_smoothing=)``);
    ``return_token_accuracy``: as :class:`FDivLoss` (from the fused pass's logits).
    """

    def __init__(self, spec: Optional[Union[FDivSpec, PrimalSpec]] = None, head: Optional[HeadSpec] = None, *,
                 ignore_index: int = -100, shift_labels: bool = False, vocab_group=None,
                 class_weight: Optional[torch.Tensor] = None, return_token_accuracy: bool = False,
                 **options) -> None:
        super().__init__()
        head_options = {k: options.pop(k) for k in _HEAD_FIELDS if k in options}
        self.spec = _built((FDivSpec, PrimalSpec), spec, options, _fdiv_spec, "spec")
        self.head = _built(HeadSpec, head, head_options, HeadSpec, "head")
        self.ignore_index, self.shift_labels = int(ignore_index), bool(shift_labels)
        self.vocab_group = vocab_group
        self.register_buffer("class_weight", class_weight)
        self.return_token_accuracy = bool(return_token_accuracy)

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                return_output: bool = False) -> Union[torch.Tensor, LossOutput]:
        w, b = _split_head(weight, bias)
        if self.shift_labels:
            hidden, labels, ref_logp = shift_for_causal_lm(hidden, labels, ref_logp)
        out = loss_from_spec(self.spec, hidden, w, labels, bias=b, ref_logp=ref_logp, head=self.head,
                             ignore_index=self.ignore_index, vocab_group=self.vocab_group,
                             class_weight=self.class_weight, return_token_accuracy=self.return_token_accuracy)
        return out if return_output else out.loss


class _PreferenceModule(_SpecModule):
    """What the preference modules share: a spec of sequence log-probs, the head, the reference."""

    _build = staticmethod(DPOSpec)

    def __init__(self, spec=None, head: Optional[HeadSpec] = None, *, ignore_index: int = -100,
                 shift_labels: bool = False, vocab_group=None, **options) -> None:
        super().__init__()
        head_options = {k: options.pop(k) for k in _HEAD_FIELDS if k in options}
        self.spec = _built(type(self)._spec_type, spec, options, type(self)._build, "spec")
        self.head = _built(HeadSpec, head, head_options, HeadSpec, "head")
        self.ignore_index, self.shift_labels = int(ignore_index), bool(shift_labels)
        self.vocab_group = vocab_group

    def sequence_logps(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[R]`` sequence log-probs (sum, or mean when ``length_normalize``) of ``hidden [R, T, H]``."""
        w, b = _split_head(weight, bias)
        if self.shift_labels:
            hidden, labels, _ = shift_for_causal_lm(hidden, labels)
        s = sequence_logp(hidden, w, labels, bias=b, ignore_index=self.ignore_index, softcap=self.head.softcap,
                          temperature=self.head.temperature, backend=self.head.backend, vocab_group=self.vocab_group)
        return s.mean if self.spec.length_normalize else s.sum

    def _reference(self, hidden, weight, labels, bias, ref_logp, ref_hidden, ref_weight, ref_bias):
        """``[R]`` reference sequence log-probs in the spec's normalisation, or None: ``ref_logp``
        (``[R]``), or the reference model's ``ref_hidden`` through its head under ``no_grad``."""
        if ref_logp is not None and ref_hidden is not None:
            raise ValueError("pass either ref_logp or ref_hidden, not both")
        if ref_hidden is not None:
            if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
                raise ValueError(f"ref_hidden must have hidden's shape [R, T, *] = {tuple(hidden.shape[:-1])}, "
                                 f"got {tuple(ref_hidden.shape)}")
            if ref_weight is None:  # the policy's head, with ref_bias when given
                head, head_bias = weight, (ref_bias if ref_bias is not None else bias)
            else:
                head, head_bias = ref_weight, ref_bias
            with torch.no_grad():
                return self.sequence_logps(ref_hidden, head, labels, bias=head_bias)
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight and ref_bias apply to ref_hidden (the reference model's hidden states); "
                             "with ref_logp the reference log-probs are already computed")
        if ref_logp is not None and tuple(ref_logp.shape) != (hidden.shape[0],):
            raise ValueError(f"ref_logp must have shape [R] = ({hidden.shape[0]},) (one per row), "
                             f"got {tuple(ref_logp.shape)}")
        return ref_logp

    def _fused(self, spec, hidden, w, labels, b, ref) -> LossOutput:
        if self.shift_labels:
            hidden, labels, _ = shift_for_causal_lm(hidden, labels)
        return loss_from_spec(spec, hidden, w, labels, bias=b, ref_logp=ref, head=self.head,
                              ignore_index=self.ignore_index, vocab_group=self.vocab_group)


class FusedLinearDPOLoss(_PreferenceModule):
    """DPO-family loss from concatenated chosen/rejected hidden states, fused with the LM head.

    ``loss_fn(hidden [2B, T, H], weight, labels [2B, T], *, bias=None, ref_logp=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, return_output=False)``:

    * rows ``0..B-1`` are the chosen responses, rows ``B..2B-1`` the rejected ones (TRL's layout);
      ``labels`` is ``ignore_index`` on prompt and padding tokens;
    * policy sequence log-probs are summed over supervised tokens (or averaged when
      ``length_normalize``), then the DPO formula of the spec (:func:`fdiv_kernels.dpo_loss`), and
      the ``sft`` term's NLL of the chosen tokens, all in the fused single pass;
    * the reference is either ``ref_logp`` (``[2B]`` sequence log-probs in the same layout and the
      same normalisation, or a ``(ref_chosen [B], ref_rejected [B])`` pair), or the reference
      model's ``ref_hidden [2B, T, H]`` through its head, evaluated under ``torch.no_grad()``: the
      head is ``ref_weight`` (a tensor with ``ref_bias``, or a module with its own bias) when given,
      else the policy's ``weight`` with ``ref_bias`` when given, else with the policy's bias. Loss
      types that need no reference (simpo, orpo, sft; or ``reference_free=True``) take none.

    Options: ``spec=DPOSpec(...)`` and ``head=HeadSpec(...)``, or their keywords: ``beta``,
    ``loss_type`` (a name of :data:`fdiv_kernels.DPO_LOSS_TYPES` or a list), ``loss_weights``,
    ``label_smoothing``, ``gamma`` (SimPO margin), ``discopop_tau``, ``length_normalize`` (default:
    the loss types', True for ipo, simpo, sigmoid_norm and orpo, as TRL does), ``divergence``/``alpha``
    (f-DPO scores: kl, reverse_kl, js, alpha; :mod:`fdiv_kernels.formulas.preference`),
    ``reference_free``, ``nll_tokens``; ``softcap``, ``temperature``, ``backend``. Plus
    ``ignore_index``, ``shift_labels`` and ``vocab_group`` (a vocabulary-parallel head, for the
    policy's and the reference's heads alike; :func:`fdiv_kernels.loss`).

    Returns the mean loss over pairs (float32), or the :class:`fdiv_kernels.DPOOutput` with
    ``return_output=True``.
    """

    _spec_type = DPOSpec

    def sequence_logps(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[2B]`` sequence log-probs (sum, or mean when ``length_normalize``) of ``hidden [2B, T, H]``."""
        _check_pairs(hidden)
        return super().sequence_logps(hidden, weight, labels, bias=bias)

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None,
                ref_logp: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[HeadLike] = None,
                ref_bias: Optional[torch.Tensor] = None, return_output: bool = False) -> Union[torch.Tensor, DPOOutput]:
        w, b = _split_head(weight, bias)
        _check_pairs(hidden)
        if isinstance(ref_logp, (tuple, list)):
            if len(ref_logp) != 2:
                raise ValueError("ref_logp as a sequence must be (ref_chosen, ref_rejected)")
            ref_logp = torch.cat([ref_logp[0].reshape(-1), ref_logp[1].reshape(-1)])
        ref = self._reference(hidden, weight, labels, bias, ref_logp, ref_hidden, ref_weight, ref_bias)
        if ref is None and self.spec.needs_reference:
            raise ValueError(f"loss_type={self.spec.loss_type!r} needs a reference: pass ref_logp= or ref_hidden=")
        out = self._fused(self.spec, hidden, w, labels, b, ref)
        if not return_output:
            return out.loss
        zero = out.logp.new_zeros(())
        rows = Rows(out.logp, out.lse, out.mask, zero, None if ref is None else ref.to(out.logp.dtype))
        rows = rows.select(row_order(self.spec, rows.mask.shape[0], rows.mask.device))
        pc, pr, rc, rr = self.spec._pairs(rows)
        with torch.no_grad():  # the loss was checked by the fused call
            losses = self.spec.pair_losses(rows)
        result = dpo_output(self.spec, losses, pc, pr, rc, rr, self.spec.nll_mean(rows))
        result.loss = out.loss  # the mean of these losses, with the single-pass gradients
        return result


class FusedLinearCPOLoss(FusedLinearDPOLoss):
    """:class:`FusedLinearDPOLoss` with TRL's ``CPOTrainer`` options (``CPOConfig``'s names, through
    :func:`~fdiv_kernels.specs.cpo_spec`): ``loss_type`` (sigmoid, hinge, ipo, simpo, alphapo),
    ``beta``, ``label_smoothing``, ``cpo_alpha`` (the chosen answers' NLL weight, 1.0 as in TRL and
    Liger's CPO/SimPO ``alpha``), ``simpo_gamma``, ``alpha`` (AlphaPO); no reference."""

    _build = staticmethod(cpo_spec)


class FusedLinearORPOLoss(FusedLinearDPOLoss):
    """:class:`FusedLinearDPOLoss` for ORPO (TRL's ``ORPOTrainer``, Liger's ORPO loss; through
    :func:`~fdiv_kernels.specs.orpo_spec`): ``beta`` (the odds-ratio term's weight) and
    ``compute_nll_loss`` (the chosen answers' NLL, on by default); no reference."""

    _build = staticmethod(orpo_spec)


class FusedLinearKTOLoss(_PreferenceModule):
    """KTO (TRL's ``KTOTrainer``) from ``B`` unpaired rows, fused with the LM head.

    ``loss_fn(hidden [B, T, H], weight, labels [B, T], desirable [B] bool, *, bias=None,
    ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, kl=None, return_output=False)``:
    ``desirable`` is TRL's ``label`` (Liger's ``preference_labels``); the reference as for
    :class:`FusedLinearDPOLoss` (``[B]``; none: log-probs as the log-ratios); ``kl``: the detached
    batch KL estimate of ``loss_type="kto"`` (a float or 0-d tensor, None: 0; TRL computes it from
    mismatched completions under ``no_grad``, gathered over processes and clamped at 0), which
    enters as ``u = beta (pi - ref - kl)``. The desirable flags are read on the host once per call.

    Options: ``spec=KTOSpec(...)`` or its keywords (``loss_type`` kto / apo_zero_unpaired, plus
    ``"sft"`` with ``loss_weights``; ``beta``, ``desirable_weight``, ``undesirable_weight``,
    ``length_normalize``, ``nll_tokens``), the head's, ``ignore_index`` and ``shift_labels``.
    Returns the mean loss over rows, or a :class:`fdiv_kernels.KTOOutput` with ``return_output=True``.
    """

    _spec_type = KTOSpec
    _build = staticmethod(KTOSpec)

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, desirable: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[HeadLike] = None,
                ref_bias: Optional[torch.Tensor] = None, kl: Optional[Union[float, torch.Tensor]] = None,
                return_output: bool = False) -> Union[torch.Tensor, KTOOutput]:
        w, b = _split_head(weight, bias)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [B, T, H], got {tuple(hidden.shape)}")
        if (not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool
                or tuple(desirable.shape) != (hidden.shape[0],)):
            raise ValueError(f"desirable must be a bool tensor of shape [B] = ({hidden.shape[0]},)")
        spec = dataclasses.replace(self.spec, desirable=tuple(bool(d) for d in desirable.tolist()))
        ref = self._reference(hidden, weight, labels, bias, ref_logp, ref_hidden, ref_weight, ref_bias)
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = kl_estimate(0.0 if kl is None else kl, hidden.new_zeros((), dtype=cdt)).to(hidden.device)
        shifted = ref
        if spec.uses_kl and kl is not None:  # u = beta (pi - (ref + kl)): the estimate joins the reference
            shifted = (z if ref is None else ref.to(cdt) + z).expand(hidden.shape[0])
        out = self._fused(spec, hidden, w, labels, b, shifted)
        if not return_output:
            return out.loss
        rows = Rows(out.logp, out.lse, out.mask, out.logp.new_zeros(()),
                    None if shifted is None else shifted.to(out.logp.dtype))
        with torch.no_grad():
            losses = spec.per_element(rows)
        s = spec.sequence_logps(rows)
        result = kto_output(spec, losses, s, None if ref is None else ref.to(s.dtype), desirable, z)
        result.loss = out.loss
        return result


def _check_pairs(hidden: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [2B, T, H], got {tuple(hidden.shape)}")
    if hidden.shape[0] % 2 != 0:
        raise ValueError(f"hidden's first dim must be 2B (chosen rows then rejected rows), got {hidden.shape[0]}")


def _distill_spec(**options) -> DistillSpec:
    """The spec of the keywords of :func:`fdiv_kernels.distill_loss`."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DistillSpec)})
    if unknown:
        raise TypeError(f"unknown distillation option(s) {unknown}; the options are the fields of DistillSpec")
    return DistillSpec(**options)


class FusedLinearDistillLoss(_SpecModule):
    """Knowledge distillation fused with both LM heads (:func:`fdiv_kernels.distill_loss`): neither
    model's ``[N, V]`` logits are stored.

    ``loss_fn(hidden [..., T, H], weight, labels [..., T], *, bias=None, teacher_hidden=None,
    teacher_weight=None, teacher_bias=None, teacher_logits=None, return_output=False)``: ``weight``
    and ``teacher_weight`` are ``[V, H]`` / ``[V, H_t]`` head weights or the head modules (their
    ``.bias`` is then used); or ``teacher_logits [..., T, V]``. Gradients reach the student's
    ``hidden``, ``weight`` and ``bias`` only.

    Options: ``spec=DistillSpec(...)`` or its keywords (``divergence``, ``beta``, ``alpha``,
    ``temperature``, ``hard_label_weight``, ``reduction``, ``t2_scaling``), validated once here;
    ``backend`` (or ``head=HeadSpec(backend=...)``); ``ignore_index``; ``shift_labels`` (the HF
    causal-LM shift of the module docstring, applied to the teacher's inputs too). The spec's
    fields read through (``loss_fn.beta``). Returns the loss, or the :class:`fdiv_kernels.DistillOutput`
    with ``return_output=True``.
    """

    def __init__(self, spec: Optional[DistillSpec] = None, head: Optional[HeadSpec] = None, *,
                 ignore_index: int = -100, shift_labels: bool = False, **options) -> None:
        super().__init__()
        head_options = {k: options.pop(k) for k in ("backend",) if k in options}
        self.spec = _built(DistillSpec, spec, options, _distill_spec, "spec")
        self.head = _built(HeadSpec, head, head_options, HeadSpec, "head")
        self.ignore_index, self.shift_labels = int(ignore_index), bool(shift_labels)

    def forward(self, hidden: torch.Tensor, weight: HeadLike, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
                teacher_weight: Optional[HeadLike] = None, teacher_bias: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None,
                return_output: bool = False) -> Union[torch.Tensor, DistillOutput]:
        w, b = _split_head(weight, bias)
        tw, tb = (None, teacher_bias) if teacher_weight is None else _split_head(teacher_weight, teacher_bias)
        if self.shift_labels:
            hidden, labels, _ = shift_for_causal_lm(hidden, labels)
            teacher_hidden = None if teacher_hidden is None else teacher_hidden[..., :-1, :]
            teacher_logits = None if teacher_logits is None else teacher_logits[..., :-1, :]
        out = distill_from_spec(self.spec, hidden, w, labels, bias=b, teacher_hidden=teacher_hidden,
                                teacher_weight=tw, teacher_bias=tb, teacher_logits=teacher_logits, head=self.head,
                                ignore_index=self.ignore_index)
        return out if return_output else out.loss
